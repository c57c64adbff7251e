"""Models that mix attention kinds layer by layer, from the command line: `effx run` takes them end to end,
the example Gemma-3-shaped spec runs, and a layer that cannot work is refused with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from effx.core.manifest import Manifest
from effx.core.spec import RunSpec
from effx.core.spec_toml import spec_to_commented_toml
from tests.cli.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_local_full_linear_layers_run_to_pass(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mix"
    code, stdout, err = run_cli(["run", "--family", "decoder", "--kv-cache", "contiguous", "--layer-pattern",
                                 "local,full,linear", "--n-layers", "3", "--local-window", "3", "--n-kv-heads", "2",
                                 "--max-seq-len", "64", "-o", str(out)], capsys, monkeypatch)
    assert code == 0 and stdout.rstrip().endswith("PASS"), err
    assert "attention=local x1 + full x1 + linear x1" in stdout
    plan = Manifest.read(out / "build" / "cpu").kv_cache
    assert plan.layout == "hybrid" and [x.layout for x in plan.layers] == ["ring", "contiguous", "state"]
    assert [x.kind for x in plan.layers] == ["local", "full", "linear"] and plan.layers[0].params["window"] == 3


def test_the_gemma3_shaped_example_runs_to_pass(tmp_path, capsys, monkeypatch):
    example = ROOT / "examples" / "gemma3_hybrid_decoder.toml"
    spec = RunSpec.from_toml(example)
    assert spec.attention_summary() == "local x5 + full x1" and spec.model.norm_position == "sandwich"
    code, stdout, err = run_cli(["run", str(example), "--max-seq-len", "64", "-o", str(tmp_path / "g")], capsys,
                                monkeypatch)
    assert code == 0 and stdout.rstrip().endswith("PASS"), err
    plan = Manifest.read(tmp_path / "g" / "onnx").kv_cache
    assert [x.layout for x in plan.layers] == ["ring"] * 5 + ["contiguous"]


@pytest.mark.parametrize("args,needle", [
    (["--family", "decoder", "--kv-cache", "contiguous", "--layer-pattern", "local,nope"], "layer 1 is 'nope'"),
    (["--family", "decoder", "--kv-cache", "contiguous", "--layer-pattern", "full,linformer"],
     "layer 1 (linformer): attention.kind=linformer with model.family=decoder"),
    (["--layer-pattern", "full,hierarchical", "--n-layers", "2"], "hierarchical shapes the whole model"),
    (["--layer-pattern", "local*3", "--n-layers", "2"], "3 entries for model.n_layers=2"),
    (["--attn-softcap", "30", "--layer-pattern", "full,linear"], "model.attn_softcap is implemented for full, local"),
])
def test_a_layer_that_cannot_work_is_one_line_naming_it(args, needle, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["run", *args, "-o", str(tmp_path / "x")], capsys, monkeypatch)
    assert code == 2 and err.startswith("effx: error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x").exists()


def test_a_layer_schedule_round_trips_through_toml():
    spec = RunSpec.from_toml(ROOT / "examples" / "gemma3_hybrid_decoder.toml")
    again = RunSpec.parse(tomllib.loads(spec_to_commented_toml(spec)))
    assert again == spec and again.layer(5).rope_theta == 1e6 and again.layer(0).rope_theta == 1e4
