"""`effx adapt` on the command line: its folder is read by `effx export` and `effx validate` like any other,
Ctrl-C leaves a checkpoint (and no output) that `--resume` continues, bad input is one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

import effx.models.adapt as adaptation
from effx.core.atomic import read_marker
from tests.cli.test_cli import run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.models.test_adapt import one_thread, write_bert, write_corpus  # noqa: E402, F401 - after the importorskips


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt_cli")
    text, tokenizer = write_corpus(root)
    return {"text": text, "bert": write_bert(root / "bert", tokenizer)}


def adapt_args(corpus, out, *extra):
    return ["adapt", "--model", f"hf:{corpus['bert']}", "--attention", "linformer", "--linformer-k", "8",
            "--max-seq-len", "32", "--seq", "32", "--lr", "1e-2", "--text", str(corpus["text"]), "-o", str(out), *extra]


def test_adapted_folder_exports_and_validates_against_itself(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "adapted"
    code, stdout, err = run_cli(adapt_args(corpus, out, "--steps", "40"), capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((out / "adapt.json").read_text())
    assert f"held-out embedding cosine {report['held_out']['before']['embedding_cosine']:.4f} -> " in stdout
    assert read_marker(out)["command"] == "adapt" and (out / "loss.png").is_file()
    assert report["stages"][0]["steps_done"] == 40 and len(report["stages"][0]["loss"]) == 40

    code, _, err = run_cli(["export", "--model", str(out), "-o", str(tmp_path / "onnx")], capsys, monkeypatch)
    assert code == 0, err
    code, stdout, err = run_cli(["validate", str(tmp_path / "onnx"), "--reference", str(out), "--seq", "32",
                                 "--no-plots", "--iters", "2", "--warmup", "0"], capsys, monkeypatch)
    assert code == 0, err
    assert "PASS" in stdout
    # an earlier output is replaced only with --overwrite
    code, _, err = run_cli(adapt_args(corpus, out, "--steps", "2"), capsys, monkeypatch)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "adapted"
    real_loss, calls = adaptation.stage1_loss, []

    def interrupt_at_step_8(*args, **kwargs):  # the 8th training step of a real run is interrupted
        calls.append(torch.is_grad_enabled())  # held-out metrics call it too, without gradients
        if sum(calls) == 8:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(adaptation, "stage1_loss", interrupt_at_step_8)
    args = adapt_args(corpus, out, "--steps", "12", "--checkpoint-every", "5", "--no-plots")
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 130 and "interrupted in attention_transfer at step 7" in err and "--resume" in err
    assert "Traceback" not in err and not out.exists()
    assert (tmp_path / "adapted.checkpoint" / "checkpoint.pt").is_file()

    monkeypatch.setattr(adaptation, "stage1_loss", real_loss)
    code, stdout, err = run_cli([*args, "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert f"resumed from {tmp_path / 'adapted.checkpoint' / 'checkpoint.pt'}" in stdout
    report = json.loads((out / "adapt.json").read_text())
    assert report["stages"][0]["steps_done"] == 12 and not (tmp_path / "adapted.checkpoint").exists()


@pytest.mark.parametrize("case", ["no_text", "no_attention", "nothing_to_adapt", "not_a_swap", "spec_flags_on_folder",
                                  "bad_schedule", "bad_init"])
def test_bad_input_is_one_line_with_exit_2(corpus, tmp_path, capsys, monkeypatch, case):
    out = str(tmp_path / "out")
    if case == "no_text":
        args = adapt_args(corpus, out)[:-4] + ["-o", out]
    elif case == "no_attention":
        args = ["adapt", "--model", f"hf:{corpus['bert']}", "--text", str(corpus["text"]), "-o", out]
    elif case == "nothing_to_adapt":
        args = ["adapt", "--model", f"hf:{corpus['bert']}", "--attention", "local", "--lora-rank", "0", "--text",
                str(corpus["text"]), "-o", out, "--seq", "32"]
    elif case == "not_a_swap":
        code, _, err = run_cli(["import", str(corpus["bert"]), "-o", str(tmp_path / "plain")], capsys, monkeypatch)
        assert code == 0, err
        args = ["adapt", "--model", str(tmp_path / "plain"), "--text", str(corpus["text"]), "-o", out]
    elif case == "bad_schedule":
        args = adapt_args(corpus, out, "--lr-schedule", "linear")
    elif case == "bad_init":
        args = adapt_args(corpus, out, "--init", "random")
    else:
        args = ["adapt", "--model", str(tmp_path), "--attention", "local", "--text", str(corpus["text"]), "-o", out]
    code, stdout, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, (stdout, err)
    if case.startswith("bad_"):
        assert ("--lr-schedule 'linear'" if case == "bad_schedule" else "--init 'random'") in err
    assert err.startswith("effx: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
