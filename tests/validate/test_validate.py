"""effx validate: passes on faithful builds, fails on a corrupted one and names the first diverging block;
the report validates against its schema; plots are real PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from effx.check.divergence import block_boundaries
from effx.check.report import ValidationReport
from effx.check.validate import ValidateOptions, validate
from effx.core.errors import ArtifactError, ValidationFailed
from effx.core.manifest import Manifest
from effx.exporter import export_model
from effx.models import build_model, save_model
from effx.targets.api import build
from tests.cli.test_cli import run_cli
from tests.helpers import decoder_spec, encoder_spec

_BUILDS: dict = {}


def check(folder, output=None, reference=None, **options):
    """effx.check.validate.validate with the options as keywords."""
    return validate(folder, ValidateOptions(**options), output=output, reference=reference)


def _built(tmp_path_factory, name: str, precision: str = "fp32") -> Path:
    """An export + cpu build, shared by the tests of this module (copied before any corruption)."""
    key = (name, precision)
    if key not in _BUILDS:
        if name not in _BUILDS:
            spec = (encoder_spec("linformer", {"k": 8}, n_layers=4) if name == "encoder"
                    else decoder_spec("local", "paged", {"window": 5}, {"block_size": 4, "num_blocks": 24}))
            root = tmp_path_factory.mktemp(name)
            export_model(build_model(spec), root / "onnx")
            _BUILDS[name] = root
        root = _BUILDS[name]
        # int8: static QDQ calibrated through the host protocol (cpu's default would be dynamic, uncalibrated)
        build(root / "onnx", "cpu", precision, calib="random", calib_samples=2, out_dir=root / precision)
        _BUILDS[key] = root / precision
    return _BUILDS[key]


def _corrupt_copy(src: Path, dst: Path, graph: str, initializer: str) -> None:
    """A copy of a build folder with one weight initializer of one block scaled (and the manifest re-hashed,
    as if the build itself had produced it)."""
    import shutil

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / graph))
    (init,) = [i for i in model.graph.initializer if i.name == initializer]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, initializer))
    onnx.save(model, str(dst / graph))
    manifest = Manifest.read(dst)
    manifest.hash_files(dst)
    manifest.write(dst)


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fp32_encoder_passes_with_schema_valid_report_and_plots(tmp_path_factory, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    report = check(_built(tmp_path_factory, "encoder"), seqs=[12, 24], batches=[1, 2], output=tmp_path / "r",
                      iters=3)
    assert report.passed and len(report.cases) == 4
    for case in report.cases:
        (out,) = case.outputs
        assert out.max_abs <= 1e-4 and out.cosine >= 0.99999 and out.share_over == 0.0
    assert report.reference["source"].startswith("seed") and report.divergence is None
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    jsonschema.validate(data, ValidationReport.model_json_schema())
    assert ValidationReport.model_validate(data) == report
    assert {x.runner for x in report.latency} == {"onnxruntime", "torch"}
    for x in report.latency:
        assert 0 < x.p50_ms <= x.p90_ms <= x.p99_ms and x.iters == 3 and x.throughput > 0
    assert report.environment["onnxruntime"] and report.environment["cpu_count"]
    assert "# effx validate: PASS" in (tmp_path / "r" / "report.md").read_text()
    assert report.plots and all(_is_png(tmp_path / "r" / p) for p in report.plots)


def test_block_boundaries_are_the_residual_stream(tmp_path_factory):
    marks = block_boundaries(_built(tmp_path_factory, "encoder") / "model.onnx")
    model = onnx.load(str(_built(tmp_path_factory, "encoder") / "model.onnx"), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert sorted(marks) == [0, 1, 2, 3]
    assert all(producers[t].op_type == "Add" for t in marks.values())  # pre-norm: x + mlp(norm2(x))


def test_corrupted_block_fails_and_is_named(tmp_path_factory, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    _corrupt_copy(_built(tmp_path_factory, "encoder"), bad, "model.onnx", "model.blocks.2.mlp.up.weight")
    code, out, err = run_cli(["validate", str(bad), "--seq", "16", "--iters", "2", "--no-plots"], capsys, monkeypatch)
    assert code == 1 and "model.blocks.2" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "FAIL" in out
    data = ValidationReport.model_validate_json((tmp_path / "bad.validate" / "report.json").read_text())
    assert not data.passed and data.divergence.block == 2
    assert len(data.divergence.probes) <= math.ceil(math.log2(4)) + 1  # bisection, not a scan
    assert {p.block: p.passed for p in data.divergence.probes}.get(1, True)  # block 1 agrees
    assert not next(p for p in data.divergence.probes if p.block == 2).passed


def test_decoder_paged_passes_steps_and_greedy(tmp_path_factory, tmp_path):
    report = check(_built(tmp_path_factory, "decoder"), seqs=[10], batches=[2], steps=6, output=tmp_path / "r",
                      iters=2, plots=False)
    (case,) = report.cases
    assert report.passed and [o.name for o in case.outputs] == ["logits (prefill)", "logits (decode steps)"]
    assert case.decode.prompt == 5 and len(case.decode.step_max_abs) == 6 and max(case.decode.step_max_abs) < 1e-4
    assert case.decode.greedy_steps == 6 and case.decode.greedy_agreement == 1.0
    assert {(x.runner, x.graph) for x in report.latency} >= {("onnxruntime", "prefill"), ("onnxruntime", "decode")}


def test_decoder_corruption_is_located_in_the_prefill_graph(tmp_path_factory, tmp_path):
    bad = tmp_path / "bad"
    _corrupt_copy(_built(tmp_path_factory, "decoder"), bad, "prefill.onnx", "model.blocks.1.attn.v_proj.weight")
    with pytest.raises(ValidationFailed, match=r"model\.blocks\.1"):
        check(bad, seqs=[10], iters=1, plots=False)


def test_int8_build_is_judged_with_int8_tolerance(tmp_path_factory, tmp_path):
    report = check(_built(tmp_path_factory, "encoder", "int8"), output=tmp_path / "r", iters=1, plots=False)
    assert report.precision == "int8" and report.tolerance["min_cosine"] == 0.98
    (out,) = report.cases[0].outputs
    assert report.passed and out.max_abs > 1e-4  # quantised: not fp32-exact, but within int8 tolerance


def test_reference_weights_must_match_the_export(tmp_path):
    spec = encoder_spec("full", n_layers=2)
    model = build_model(spec)
    with __import__("torch").no_grad():
        model.blocks[0].mlp.up.weight.mul_(1.1)  # trained weights: no longer the seeded init
    save_model(model, tmp_path / "weights")
    export_model(model, tmp_path / "onnx")
    with pytest.raises(ArtifactError, match="--reference"):
        check(tmp_path / "onnx", iters=1, plots=False)
    report = check(tmp_path / "onnx", reference=tmp_path / "weights", iters=1, plots=False)
    assert report.passed and report.reference["source"] == str(tmp_path / "weights")


def test_inputs_file_and_bad_inputs(tmp_path_factory, tmp_path, capsys, monkeypatch):
    folder = _built(tmp_path_factory, "encoder")
    ids = np.random.default_rng(0).integers(0, 1000, (3, 7))
    np.savez(tmp_path / "in.npz", input_ids=ids)
    report = check(folder, inputs=str(tmp_path / "in.npz"), output=tmp_path / "r", iters=1, plots=False)
    assert report.passed and (report.cases[0].batch, report.cases[0].seq) == (3, 7)
    for args, needle in ([["--inputs", str(tmp_path / "none.npz")], "no such file"],
                         [["--seq", "0"], "positive"], [["--seq", "999"], "max_seq_len"],
                         [["--against", "tensorflow"], "--against"], [["--provider", "tpu"], "--provider"]):
        code, _, err = run_cli(["validate", str(folder), *args], capsys, monkeypatch)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


@pytest.mark.parametrize("kind,layout,attention", [
    ("full", "contiguous", {}), ("local", "ring", {"window": 4}), ("linear", "state", {"feature_map": "elu"}),
    ("hierarchical", "multiscale", {"factors": [1, 2]}),
], ids=["full-contiguous", "local-ring", "linear-state", "hierarchical-multiscale"])
def test_every_cache_protocol_validates_in_fp16(kind, layout, attention, tmp_path):
    # fp16 also checks the build keeps present.* (returned and read in the same step) consistent in type
    model = build_model(decoder_spec(kind, layout, attention, n_layers=3))
    export_model(model, tmp_path / "onnx")
    build(tmp_path / "onnx", "cpu", "fp16", out_dir=tmp_path / "fp16")
    report = check(tmp_path / "fp16", seqs=[11], batches=[2], steps=5, iters=1, plots=False)
    (case,) = report.cases
    assert report.passed and report.precision == "fp16" and case.decode.greedy_steps == 5
    assert 0 < max(case.decode.step_max_abs) <= 0.1  # fp16: not exact, within its tolerance


def test_int8_paged_decoder_calibrates_through_the_host_protocol(tmp_path_factory, tmp_path):
    # calibration feeds for paged decoders (block tables, pools) come from the host protocol (effx.core.protocol)
    report = check(_built(tmp_path_factory, "decoder", "int8"), seqs=[10], iters=1, plots=False,
                      output=tmp_path / "r")
    assert report.passed and report.precision == "int8"
    assert all(0 < o.max_abs and o.cosine >= 0.98 for o in report.cases[0].outputs)


def test_hourglass_decoder_times_the_step_graph_the_protocol_picks(tmp_path):
    # levels 1, 3, 1: after a prompt of 10 tokens the next one (position 10, 10 % 3 != 0) completes no group, so
    # the host runs decode_fine; the general decode graph is timed on the same step as a group-completing step's cost
    spec = decoder_spec("hierarchical", "multiscale", {"factors": [1, 3]}, n_layers=3)
    export_model(build_model(spec), tmp_path / "onnx")
    report = check(tmp_path / "onnx", seqs=[11], batches=[1], steps=4, iters=2, plots=False)
    assert report.passed
    timed = [(x.runner, x.graph) for x in report.latency]
    for runner in ("onnxruntime", "torch"):
        assert [g for r, g in timed if r == runner] == ["prefill", "decode_fine", "decode"]
    assert all(x.seq == 1 and x.iters == 2 for x in report.latency if x.graph != "prefill")
