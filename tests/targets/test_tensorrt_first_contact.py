"""What effx hands TensorRT on first contact (no TensorRT here: the parts that decide are tested directly, the
device scripts run against stand-ins for python3/trtexec/polygraphy): plugin routing and its fallback, the
precision a 10.x engine really gets, calibration files with every graph input, explicit feed dtypes, names
and flags from the device's TensorRT, the jetson-xavier refusal, and the on-device check script."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

import effx.targets.tensorrt.plugins as trt_plugins
import effx.targets.tensorrt.prepare as prepare
from effx.core.errors import CapabilityError, EffxError, MissingDependencyError, SpecError
from effx.core.manifest import Manifest
from effx.core.tolerance import tolerance_for
from effx.exporter.onnx_export import stamp_plugin_nodes
from effx.targets.api import build
from effx.targets.tensorrt.kit import precision_flag
from effx.targets.tensorrt.plugins import register_plugins
from effx.targets.tensorrt.runner import feed_as


@pytest.fixture(scope="module")
def kits(trt_sample_exports, tmp_path_factory):
    """jetson-orin int8 and h100 fp32 device kits of the ring-cache decoder."""
    _, src = trt_sample_exports["dec-local-ring"]
    root = tmp_path_factory.mktemp("kits")
    return {(t, p): (build(src, t, p, calib_samples=2, out_dir=root / f"{t}-{p}"), root / f"{t}-{p}")
            for t, p in (("jetson-orin", "int8"), ("h100", "fp32"))}


def _graphs(trt_sample_exports, marked: bool) -> list[onnx.ModelProto]:
    manifest, folder = trt_sample_exports["dec-local-ring"]
    models = [onnx.load(str(folder / g.file)) for g in manifest.graphs.values()]
    if marked:
        for m in models:
            stamp_plugin_nodes(m)
    return models


# -- 1, 2: plugins only for marked nodes; a registration that fails falls back -----------------------------
@pytest.mark.parametrize("error", [EffxError("this TensorRT has no ahead-of-time plugins (tensorrt.plugin.aot_impl)"),
                                   MissingDependencyError("triton is not installed; pip install 'effx[triton]'"),
                                   ImportError("libnvinfer.so.10: cannot open shared object file")])
def test_a_failing_registration_leaves_the_function_bodies(error, trt_sample_exports, monkeypatch):
    def fail(**_kw):
        raise error

    monkeypatch.setattr(trt_plugins, "register_tensorrt_plugins", fail)
    routing = register_plugins(_graphs(trt_sample_exports, marked=True))
    assert routing.registered == [] and routing.bodies == ["LocalAttention"]
    assert any("fall back to their ONNX function bodies" in n for n in routing.notes)
    assert routing.record() == [{"op": "LocalAttention", "plugin": None, "route": "function body"}]


def test_plugins_are_registered_only_for_marked_nodes(trt_sample_exports, monkeypatch):
    calls = []

    def spy(arch=None, names=None):
        calls.append(names)
        return ["effx::LocalAttention", "effx::LinformerAttention"]  # what the registry holds

    monkeypatch.setattr(trt_plugins, "register_tensorrt_plugins", spy)
    unmarked = register_plugins(_graphs(trt_sample_exports, marked=False))
    assert calls == [] and unmarked.registered == [] and unmarked.bodies == ["LocalAttention"]
    marked = register_plugins(_graphs(trt_sample_exports, marked=True))
    assert len(calls) == 1 and calls[0]("LocalAttention") and not calls[0]("LinformerAttention")
    assert marked.registered == ["effx::LocalAttention"] and marked.bodies == []
    # one graph marked, one not: TensorRT >= 10.10 would route the unmarked nodes to the plugin too
    mixed = register_plugins([_graphs(trt_sample_exports, True)[0], _graphs(trt_sample_exports, False)[0]])
    assert len(calls) == 1 and mixed.registered == [] and "not marked" in mixed.notes[0]


def test_the_runner_registers_what_the_build_recorded_and_survives_a_failure(monkeypatch):
    monkeypatch.setattr(trt_plugins, "register_tensorrt_plugins",
                        lambda **_kw: (_ for _ in ()).throw(EffxError("no AOT plugins")))
    routing = register_plugins(ops=["LocalAttention"])
    assert routing.registered == [] and "no AOT plugins" in routing.notes[0]


# -- 3: precision lives in the graph -----------------------------------------------------------------------
def test_int8_kits_carry_symmetric_qdq_graphs_and_no_int8_flag(kits):
    manifest, kit = kits[("jetson-orin", "int8")]
    for g in manifest.graphs.values():
        model = onnx.load(str(kit / g.file))
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
        zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
        assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)
    script = (kit / "build_on_device.sh").read_text()
    assert "--int8" not in script and 'PREC_FLAG="--stronglyTyped"' in script
    assert "ONNX Runtime quantize_static" in manifest.build.extra["quantization"]["method"]
    assert manifest.build.extra["compat"]["ok"] and manifest.build.extra["compat"]["tensorrt_version"] == "10.3"


def test_precision_flags_never_set_int8_or_fp8_without_qdq():
    assert [precision_flag(10, p) for p in ("fp32", "fp16", "bf16", "int8", "fp8", "int4w")] == \
        ["--stronglyTyped", "--fp16", "--bf16", "--stronglyTyped", "--stronglyTyped", "--stronglyTyped"]
    assert {precision_flag(11, p) for p in ("fp32", "fp16", "int8")} == {""}


@pytest.mark.parametrize("precision", ["fp8", "int4w"])
def test_without_modelopt_fp8_and_int4w_are_refused_in_one_line(precision, monkeypatch):
    monkeypatch.setattr(prepare, "has_modelopt", lambda: False)
    with pytest.raises(CapabilityError, match=f"--precision {precision} for TensorRT needs NVIDIA ModelOpt") as info:
        prepare.refuse_unquantizable(precision, "on this machine")
    assert "\n" not in str(info.value) and "silently" in str(info.value)
    prepare.refuse_unquantizable("int8", "on this machine")  # ORT's QDQ quantizer does int8


def test_fp8_kit_without_modelopt_quantizes_on_the_device_from_every_input(trt_sample_exports, monkeypatch, tmp_path):
    monkeypatch.setattr(prepare, "has_modelopt", lambda: False)
    import effx.targets.tensorrt.kit as kit_module

    monkeypatch.setattr(kit_module, "has_modelopt", lambda: False)
    _, src = trt_sample_exports["dec-local-ring"]
    manifest = build(src, "l4", "fp8", calib_samples=2, out_dir=tmp_path / "kit")
    script = (tmp_path / "kit" / "build_on_device.sh").read_text()
    assert "needs NVIDIA ModelOpt on this device" in script
    assert "--quantize_mode fp8 --calibration_data_path calib.decode.npz" in script
    assert manifest.build.extra["quantization"]["method"].startswith("NVIDIA ModelOpt on the device")


# -- 4: calibration data holds every graph input -------------------------------------------------------------
def test_calibration_files_hold_every_graph_input(kits):
    manifest, kit = kits[("jetson-orin", "int8")]
    for name, g in manifest.graphs.items():
        with np.load(kit / f"calib.{name}.npz") as data:
            assert set(data.files) == {t.name for t in g.inputs}, name
            assert all(data[t.name].dtype == np.dtype(t.dtype) for t in g.inputs)
    with np.load(kit / "calib.npz") as data:
        assert data.files == ["input_ids"]  # what `effx build --calib calib.npz` reads on the device


# -- 5: feeds are converted explicitly or refused ---------------------------------------------------------
def test_feeds_are_converted_explicitly_or_refused():
    x = np.linspace(-1, 1, 6, dtype=np.float32)
    assert feed_as("x", x, "HALF").dtype == np.float16 and feed_as("x", x, "BF16").dtype == np.float32
    ids = np.array([[1, 2, 3]], np.int64)
    assert feed_as("ids", ids, "INT32").dtype == np.int32 and feed_as("ids", ids, "INT64") is ids
    with pytest.raises(SpecError, match="do not fit the engine's INT32"):
        feed_as("ids", np.array([2**40]), "INT32")
    with pytest.raises(SpecError, match="the feed is float32, the engine binds INT64"):
        feed_as("ids", x, "INT64")
    with pytest.raises(SpecError, match="engine takes bf16"):
        feed_as("x", ids, "BF16")


# -- 6: names, flags and the recorded version follow the device's TensorRT --------------------------------
def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _device_path(bin_dir: Path) -> str:
    """PATH with the stand-ins first and no effx (so the scripts take their trtexec/polygraphy branches)."""
    keep = [p for p in os.environ["PATH"].split(os.pathsep)
            if p and not (Path(p) / "effx").exists() and not (Path(p) / "polygraphy").exists()]
    return os.pathsep.join([str(bin_dir), *keep])


def _run_kit_script(kit: Path, script: str, fakes: dict[str, str], tmp_path: Path):
    """Copy the kit, put stand-in commands (name -> bash body) first on PATH, run one of its scripts there."""
    work, bin_dir = tmp_path / "kit", tmp_path / "bin"
    shutil.copytree(kit, work)
    bin_dir.mkdir()
    for name, body in fakes.items():
        _fake(bin_dir, name, body)
    proc = subprocess.run(["bash", str(work / script)], capture_output=True, text=True,
                          env={**os.environ, "PATH": _device_path(bin_dir)}, timeout=60)
    return work, proc


TRTEXEC = r"""for a in "$@"; do case "$a" in --saveEngine=*) : > "${a#--saveEngine=}"; echo "flags: $*" >> trtexec.log;; esac; done
[ $# -eq 0 ] && echo "&&&& RUNNING TensorRT.trtexec [TensorRT v101300] # trtexec"
exit 0
"""


@pytest.mark.parametrize("python_says,expect", [("10.15.1.2", "10.15"), ("", "10.13")])
def test_kit_names_engines_after_the_device_tensorrt(python_says, expect, kits, tmp_path):
    _, kit = kits[("jetson-orin", "int8")]
    python3 = f'case "$*" in *tensorrt*) [ -n "{python_says}" ] && echo "{python_says}" && exit 0; exit 1;; *) exit 1;; esac\n'
    work, proc = _run_kit_script(kit, "build_on_device.sh", {"python3": python3, "trtexec": TRTEXEC}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in work.glob("*.engine")} == {f"prefill.sm87.trt{expect}.engine",
                                                       f"decode.sm87.trt{expect}.engine"}
    version = Manifest.read(work).build.tensorrt_version
    assert version.startswith(expect) and "--stronglyTyped" in (work / "trtexec.log").read_text()
    assert "--int8" not in (work / "trtexec.log").read_text()


# -- 7: jetson-xavier ------------------------------------------------------------------------------------------
def test_jetson_xavier_is_refused_before_any_work(trt_sample_exports, tmp_path):
    _, src = trt_sample_exports["dec-local-ring"]
    with pytest.raises(CapabilityError, match="jetson-xavier is not supported: TensorRT 8.5.*opset <= 17") as info:
        build(src, "jetson-xavier", "fp32", out_dir=tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


# -- device verification script ------------------------------------------------------------------------------
def test_check_script_carries_the_shapes_and_tolerances(kits):
    for (_, precision), (manifest, kit) in kits.items():
        script = (kit / "check_on_device.sh").read_text()
        assert subprocess.run(["bash", "-n", str(kit / "check_on_device.sh")]).returncode == 0
        tol = tolerance_for(precision)
        assert f"--atol {tol.atol:g} --rtol {tol.rtol:g}" in script and tol.describe() in script
        for name, g in manifest.graphs.items():
            with np.load(kit / f"check_feeds.{name}.npz") as feeds:
                assert set(feeds.files) == {t.name for t in g.inputs}
                shapes = ", ".join(f"{k} {'x'.join(map(str, feeds[k].shape))}" for k in sorted(feeds.files,
                                   key=[t.name for t in g.inputs].index))
            assert f"# check feeds of {name} (check_feeds.{name}.npz): {shapes}" in script
            assert f"polygraphy run {g.file} --trt --onnxrt --data-loader-script check_data.py:load_data" in script
        readme = (kit / "README.device.md").read_text()
        assert "bash check_on_device.sh" in readme and "PASS" in readme and "Compatibility check" in readme


@pytest.mark.parametrize("poly_exit,verdict", [(0, "PASS"), (1, "FAIL")])
def test_check_script_prints_pass_or_fail_and_writes_the_report(poly_exit, verdict, kits, tmp_path):
    _, kit = kits[("h100", "fp32")]
    fakes = {"polygraphy": f'echo "polygraphy $* feeds=$EFFX_CHECK_FEEDS"; exit {poly_exit}\n',
             "python3": "exit 1\n"}  # no torch, no tensorrt: the polygraphy branch alone
    work, proc = _run_kit_script(kit, "check_on_device.sh", fakes, tmp_path)
    assert proc.returncode == (0 if verdict == "PASS" else 1), proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == verdict
    report = (work / "check_on_device.report.txt").read_text()
    assert re.search(r"feeds=check_feeds\.decode\.npz", report) and f"polygraphy decode: {verdict}" in report


def test_a_kit_built_on_the_device_keeps_its_qdq_graphs(kits, tmp_path):
    """On the device `effx build` takes the kit as its source: its calibrated Q/DQ graphs are not quantized twice."""
    from effx.targets.profiles import get_target
    from effx.targets.tensorrt.prepare import prepare_graphs

    manifest, kit = kits[("jetson-orin", "int8")]
    source = manifest.model_copy(update={"stage": "onnx", "build": None})
    again = prepare_graphs(kit, source, get_target("jetson-orin"), "10.3.0", "int8", "random", 2, tmp_path, lambda _m: None)
    assert again.quantization["method"].startswith("Q/DQ already in the graphs") and again.compat.ok
    for g in manifest.graphs.values():
        count = lambda m: sum(n.op_type == "QuantizeLinear" for n in m.graph.node)  # noqa: E731
        assert count(onnx.load(str(tmp_path / g.file))) == count(onnx.load(str(kit / g.file)))
