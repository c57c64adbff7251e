"""The CLI: help, models, init, run, and one-line errors with exit code 2 (no traceback)."""

import json
import subprocess
import sys

import pytest

from effx.cli import main
from effx.core.spec import RunSpec


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["effx", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands(capsys, monkeypatch):
    code, out, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0 and "models" in out and "init" in out and "run" in out


def test_models_json_is_generated_from_registry(capsys, monkeypatch):
    from effx.core.spec import describe

    code, out, _ = run_cli(["models", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out) == json.loads(json.dumps(describe()))
    code, out, _ = run_cli(["models"], capsys, monkeypatch)
    assert code == 0 and "linformer" in out and "multiscale" in out and "Compatibility" in out


def test_init_writes_a_spec_that_loads(tmp_path, capsys, monkeypatch):
    path = tmp_path / "spec.toml"
    args = ["init", "-o", str(path), "--family", "decoder", "--attention", "local", "--local-window", "8",
            "--kv-cache", "ring", "--n-kv-heads", "2"]
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code == 0 and path.exists()
    spec = RunSpec.from_toml(path)
    assert (spec.attention.kind, spec.attention.window, spec.kv_cache.layout, spec.model.kv_heads) == (
        "local", 8, "ring", 2)
    assert "# " in path.read_text()  # commented
    code, _, err = run_cli(["init", "-o", str(path)], capsys, monkeypatch)
    assert code == 2 and "exists" in err


def test_kind_flag_selects_its_kind(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.toml"
    code, _, _ = run_cli(["init", "-o", str(path), "--linformer-k", "16", "--hierarchical-factors", "1,2"],
                         capsys, monkeypatch)
    assert code == 2  # two kinds at once
    code, _, _ = run_cli(["init", "-o", str(path), "--linformer-k", "16"], capsys, monkeypatch)
    assert code == 0 and RunSpec.from_toml(path).attention.k == 16


def test_run_builds_model_and_checks_decode(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["run", "-o", str(out_dir), "--family", "decoder", "--attention", "linear",
                              "--kv-cache", "state", "--seq", "8"], capsys, monkeypatch)
    assert code == 0, err
    assert (out_dir / "model" / "model.safetensors").exists() and "decode_max_abs_err" in out
    assert (out_dir / "onnx" / "prefill.onnx").exists() and (out_dir / "build" / "cpu" / "decode.onnx").exists()
    assert out.rstrip().endswith("PASS")
    err_value = float(out.split("decode_max_abs_err=")[1].split(",")[0])
    assert err_value <= 1e-5


BAD = [
    ["run", "--attention", "nope"],
    ["run", "--family", "decoder", "--attention", "linformer"],
    ["run", "--linformer-k", "0"],
    ["run", "/no/such/spec.toml"],
    ["run", "--local-window", "4", "--attention", "full"],
    ["init", "--kv-cache", "paged"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_exit_2(args, capsys, monkeypatch, tmp_path):
    code, _, err = run_cli([*args, "-o", str(tmp_path / "x")], capsys, monkeypatch)
    assert code == 2
    assert err.startswith("effx: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_unreadable_toml_via_subprocess(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    proc = subprocess.run([sys.executable, "-m", "effx", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_matrix_is_the_generated_one():
    from pathlib import Path

    from effx.check.tables import compatibility_markdown
    from effx.core.spec import describe

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("<!-- compat:begin -->\n")[1].split("\n<!-- compat:end -->")[0]
    assert section == compatibility_markdown(describe()), "regenerate the README matrix from effx.core.registry"


EXPORT_BAD = [
    (["export", "--family", "decoder", "--attention", "linformer"], "attention.kind=linformer"),
    (["export", "--opset", "17"], "--opset 17"),
    (["export", "--opset", "28"], "--opset 28"),
]


@pytest.mark.parametrize("args,needle", EXPORT_BAD, ids=lambda a: str(a))
def test_export_bad_input_is_one_line(args, needle, capsys, monkeypatch, tmp_path):
    code, _, err = run_cli([*args, "-o", str(tmp_path / "x")], capsys, monkeypatch)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_export_into_a_file_or_nonempty_folder_is_refused(capsys, monkeypatch, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    code, _, err = run_cli(["export", "-o", str(target)], capsys, monkeypatch)
    assert code == 2 and "is a file" in err and target.read_text() == "x"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("y")
    code, _, err = run_cli(["export", "-o", str(full)], capsys, monkeypatch)
    assert code == 2 and "not empty" in err and (full / "keep.txt").exists()


def test_export_cli_writes_and_reports(capsys, monkeypatch, tmp_path):
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(["export", "--attention", "linformer", "--linformer-k", "8", "--n-layers", "1",
                                 "--max-seq-len", "32", "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert (out / "model.onnx").exists() and (out / "manifest.json").exists()
    assert "1x effx::LinformerAttention" in stdout


def test_build_cpu_and_jetson_kit_from_the_cli(capsys, monkeypatch, tmp_path):
    onnx_dir = tmp_path / "onnx"
    code, _, err = run_cli(["export", "--attention", "local", "--local-window", "4", "--n-layers", "1",
                            "--max-seq-len", "32", "-o", str(onnx_dir)], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["build", str(onnx_dir), "--target", "cpu", "-o", str(tmp_path / "cpu")], capsys, monkeypatch)
    assert code == 0, err
    assert "built cpu (ort, fp32)" in out and (tmp_path / "cpu" / "model.ort.onnx").exists()
    code, out, err = run_cli(["build", str(onnx_dir), "--target", "jetson", "--precision", "fp16", "-o",
                              str(tmp_path / "jet")], capsys, monkeypatch)
    assert code == 0, err
    assert "no engine was built" in out and (tmp_path / "jet" / "build_on_device.sh").exists()
    code, _, err = run_cli(["build", str(onnx_dir), "--target", "jetson", "--precision", "fp8", "-o",
                            str(tmp_path / "bad")], capsys, monkeypatch)
    assert code == 2 and "fp8" in err and not (tmp_path / "bad").exists()
    code, out, _ = run_cli(["targets", "--json"], capsys, monkeypatch)
    assert code == 0 and {r["name"] for r in json.loads(out)} >= {"cpu", "jetson-orin", "h100"}
