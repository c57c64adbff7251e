"""Nothing lost, nothing unexplained: output folders follow one rule, every failure is one line, defaults
compose, `effx run` takes the stages' options, and the packaging gives plots."""

from __future__ import annotations

import json
import re
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tomllib

from effx.core.atomic import MARKER, read_marker
from effx.core.errors import StepFailed
from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver
from effx.core.registry import ATTENTION
from tests.cli.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "linformer_encoder.toml")
SMALL = ["--n-layers", "1", "--max-seq-len", "32", "--d-model", "32"]


def one_line(err: str) -> bool:
    return err.startswith("effx: error:") and err.count("\n") == 1 and "Traceback" not in err


# -- output folders -------------------------------------------------------------------------------------
def test_run_never_deletes_a_folder_it_did_not_write(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "thesis.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(["run", EXAMPLE, *SMALL, "-o", str(work), *extra], capsys, monkeypatch)
        assert code == 2 and one_line(err) and str(work) in err and "did not write" in err, err
        assert (work / "notes" / "thesis.txt").read_text() == "x"
    assert sorted(p.name for p in work.iterdir()) == ["notes"]


def test_an_earlier_output_is_replaced_only_with_overwrite_and_only_if_untouched(tmp_path, capsys, monkeypatch):
    out = tmp_path / "onnx"
    args = ["export", "--attention", "local", *SMALL, "-o", str(out)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    marker = read_marker(out)
    assert marker["command"] == "export" and "manifest.json" in marker["files"]
    code, _, err = run_cli(args, capsys, monkeypatch)  # the same command again: refused without --overwrite
    assert code == 2 and one_line(err) and "--overwrite" in err
    code, _, err = run_cli([*args, "--overwrite"], capsys, monkeypatch)
    assert code == 0, err
    (out / "mine.txt").write_text("keep")  # someone adds a file: effx no longer owns the whole folder
    code, _, err = run_cli([*args, "--overwrite"], capsys, monkeypatch)
    assert code == 2 and one_line(err) and "mine.txt" in err and (out / "mine.txt").read_text() == "keep"
    code, _, err = run_cli(["build", str(ROOT / "examples"), "-o", str(out)], capsys, monkeypatch)
    assert code == 2 and one_line(err)  # another command's output is never a build folder
    build = tmp_path / "build"
    (out / "mine.txt").unlink()
    code, _, err = run_cli(["build", str(out), "-o", str(build)], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["export", "--attention", "local", *SMALL, "-o", str(build), "--overwrite"], capsys,
                           monkeypatch)
    assert code == 2 and "effx build" in err and (build / "manifest.json").exists()  # never an export over a build


def test_validate_reports_follow_the_same_rule(tmp_path, capsys, monkeypatch):
    out = tmp_path / "onnx"
    code, _, err = run_cli(["export", "--attention", "linear", *SMALL, "-o", str(out)], capsys, monkeypatch)
    assert code == 0, err
    report = tmp_path / "report"
    report.mkdir()
    (report / "draft.md").write_text("mine")
    code, _, err = run_cli(["validate", str(out), "--iters", "1", "--no-plots", "-o", str(report)], capsys, monkeypatch)
    assert code == 2 and one_line(err) and (report / "draft.md").exists()
    code, _, err = run_cli(["validate", str(out), "--iters", "1", "--no-plots"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["validate", str(out), "--iters", "1", "--no-plots"], capsys, monkeypatch)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(["validate", str(out), "--iters", "1", "--no-plots", "--overwrite"], capsys, monkeypatch)
    assert code == 0, err


def test_bench_resumes_into_its_own_output_only(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text("{not json")
    code, _, err = run_cli(["bench", "--attention", "full", "--seq", "16", "--d-model", "32", "--heads", "2",
                            "-o", str(out)], capsys, monkeypatch)
    assert code == 2 and one_line(err) and "did not write" in err  # no marker: not effx's
    (out / MARKER).write_text(json.dumps({"command": "bench", "files": ["bench.json"]}))
    code, _, err = run_cli(["bench", "--attention", "full", "--seq", "16", "--d-model", "32", "--heads", "2",
                            "-o", str(out)], capsys, monkeypatch)
    assert code == 2 and one_line(err) and "bench.json" in err and "not valid JSON" in err


# -- manifests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "onnx"
    from effx.core.spec import RunSpec
    from effx.exporter import export_model
    from effx.models import build_model

    export_model(build_model(RunSpec.parse({"model": {"n_layers": 1, "max_seq_len": 32, "d_model": 32},
                                            "attention": {"kind": "full"}})), out)
    return out


def _edited_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("command", ["build", "validate"])
def test_a_manifest_pointing_outside_its_folder_is_refused_before_reading(command, exported, tmp_path, capsys,
                                                                          monkeypatch):
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.copy(exported / "model.onnx", outside / "model.onnx")  # correct hash, but outside the folder

    def escape(data):
        data["graphs"]["model"]["file"] = "../other/model.onnx"
        data["files"] = {"../other/model.onnx": data["files"]["model.onnx"]}

    bad = _edited_manifest(exported, tmp_path / "bad", escape)
    args = ["build", str(bad), "-o", str(tmp_path / "b")] if command == "build" else ["validate", str(bad)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and one_line(err) and "../other/model.onnx" in err and "inside the folder" in err, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "bad.validate").exists()


def test_a_malformed_manifest_is_one_line(exported, tmp_path, capsys, monkeypatch):
    bad = _edited_manifest(exported, tmp_path / "bad", lambda d: d["graphs"]["model"].pop("role"))
    code, _, err = run_cli(["build", str(bad), "-o", str(tmp_path / "b")], capsys, monkeypatch)
    assert code == 2 and one_line(err) and "graphs.model.role" in err


def test_external_data_outside_the_folder_is_refused(exported, tmp_path):
    import onnx

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    model = onnx.load(str(bad / "model.onnx"))
    tensor = model.graph.initializer[0]  # as if its weights lay in a file beside the folder
    (tmp_path / "weights.bin").write_bytes(onnx.numpy_helper.to_array(tensor).tobytes())
    onnx.external_data_helper.set_external_data(tensor, location="../weights.bin")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (bad / "model.onnx").write_bytes(model.SerializeToString())
    manifest = Manifest.read(bad)
    manifest.hash_files(bad)
    with pytest.raises(Exception, match=r"external data '\.\./weights\.bin'"):
        manifest.verify_files(bad)


# -- failures reach the user as one line -----------------------------------------------------------------
def test_int8_dynamic_with_onnx_attention_builds_and_validates(exported, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"
    code, stdout, err = run_cli(["build", str(exported), "--precision", "int8", "--calib", "dynamic", "-o", str(out)],
                                capsys, monkeypatch)
    assert code == 0, err
    ops = [n.op_type for n in __import__("onnx").load(str(out / "model.onnx")).graph.node]
    assert "Attention" in ops and "QAttention" not in ops and "MatMulInteger" in ops
    code, _, err = run_cli(["validate", str(out), "--iters", "1", "--no-plots"], capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize("args,needle", [
    (["run", "--nope"], "No such option: --nope"),
    (["run", "--calib-samples", "0"], "--calib-samples"),
    (["build"], "Missing argument"),
    (["export", "--opset", "x", "-o", "o"], "--opset"),
])
def test_usage_errors_are_one_line(args, needle, capsys, monkeypatch):
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and one_line(err) and needle in err, err


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import effx.exporter

    monkeypatch.setattr(effx.exporter, "export_model", lambda *a, **k: (_ for _ in ()).throw(KeyError("boom")))
    code, _, err = run_cli(["export", *SMALL, "-o", str(tmp_path / "o")], capsys, monkeypatch)
    assert code == 1 and one_line(err) and "unexpected KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        run_cli(["--debug", "export", *SMALL, "-o", str(tmp_path / "o")], capsys, monkeypatch)


def test_a_failing_modelopt_step_is_one_line_exit_1(tmp_path, monkeypatch):
    """TensorRT 11 builds run ModelOpt in a subprocess: its failure is a StepFailed (exit code 1)."""
    fake = tmp_path / "site" / "modelopt" / "onnx" / "quantization"
    fake.mkdir(parents=True)
    for d in (fake.parent.parent, fake.parent, fake):
        (d / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("import sys\nprint('calibration data has no attention_mask', file=sys.stderr)\n"
                                      "sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    from effx.core.spec import RunSpec
    from effx.exporter import export_model
    from effx.models import build_model
    from effx.targets.tensorrt.build import _graph_precision_with_modelopt

    src = tmp_path / "onnx"
    manifest = export_model(build_model(RunSpec.parse({"model": {"n_layers": 1, "max_seq_len": 16}})), src)
    (tmp_path / "out").mkdir()
    try:
        with pytest.raises(StepFailed, match="exit code 3: calibration data has no attention_mask") as info:
            _graph_precision_with_modelopt(src, manifest, "int8", tmp_path / "out", lambda _m: None)
    finally:  # the fake must not outlive the test (monkeypatch.delitem would put it back at teardown)
        for m in [m for m in sys.modules if m.startswith("modelopt")]:
            del sys.modules[m]
    assert info.value.exit_code == 1 and "\n" not in str(info.value)


# -- defaults compose; run takes every stage option --------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_every_kind_with_no_other_flag_runs_to_pass(kind, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--attention", kind, "-o", str(tmp_path / "o")], capsys, monkeypatch)
    assert code == 0 and out.rstrip().endswith("PASS"), err


def test_run_takes_the_options_of_export_and_build(capsys, monkeypatch):
    from effx.core.options import BuildOptions, ExportOptions

    code, out, _ = run_cli(["run", "--help"], capsys, monkeypatch)
    text = re.sub(r"\s+", " ", out)
    for cls in (ExportOptions, BuildOptions):
        for name in cls.model_fields:
            assert "--" + name.replace("_", "-") in text, name
    for command, cls in (("export", ExportOptions), ("build", BuildOptions)):
        _, out, _ = run_cli([command, "--help"], capsys, monkeypatch)
        assert all("--" + n.replace("_", "-") in out for n in cls.model_fields)


def test_run_int8_dynamic_and_opset_20(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "--family", "decoder", "--attention", "local", "--kv-cache", "ring", *SMALL,
                              "--precision", "int8", "--calib", "dynamic", "--opset", "20", "--trt-plugins",
                              "-o", str(tmp_path / "o")], capsys, monkeypatch)
    assert code == 0 and out.rstrip().endswith("PASS"), err
    manifest = Manifest.read(tmp_path / "o" / "build" / "cpu")
    assert manifest.opsets[""] == 20 and manifest.build.precision == "int8"
    assert manifest.build.extra["calibration"] is None  # dynamic: no calibration feeds
    feed = DecodeDriver(manifest, 1, 3).prefill_feed(np.zeros((1, 3), np.int64))  # the host's ring buffers too
    sess = ort.InferenceSession(str(tmp_path / "o" / "build" / "cpu" / "prefill.onnx"))
    assert sess.run(None, feed)[0].shape == (1, 3, 1000)


# -- packaging ----------------------------------------------------------------------------------------------
def test_plots_are_a_base_dependency_with_a_floor_the_code_needs():
    """report.py draws boxplot(orientation=...), which matplotlib has from 3.10 on."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("matplotlib")]
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split(".")[:2])
    assert floor >= (3, 10) and "orientation=" in (ROOT / "effx" / "check" / "report.py").read_text()
    assert tuple(int(x) for x in version("matplotlib").split(".")[:2]) >= floor
