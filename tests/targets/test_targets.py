"""Targets: the registry, capability errors, cpu builds at three precisions, device kits for TensorRT targets."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from effx.core.errors import CapabilityError
from effx.core.manifest import Manifest
from effx.exporter import export_model
from effx.models import build_model
from effx.targets.api import build
from effx.targets.profiles import TARGETS, get_target
from effx.targets.tensorrt.kit import TRTEXEC_FLAGS
from tests.exporter.ort_helpers import decode_in_ort, session
from tests.helpers import decoder_spec, encoder_spec

# fp16: 10-bit mantissa, errors ~1e-3 relative through 2 layers of LayerNorm'd activations of size ~1;
# int8: symmetric per-channel weights and per-tensor activations, ~1/127 of each tensor's range per layer.
TOLERANCE = {"fp32": {"max_abs": 1e-4, "cosine": 0.999999},
             "fp16": {"max_abs": 2e-2, "cosine": 0.9999},
             "int8": {"max_abs": 1.0, "cosine": 0.98}}  # gate mostly on cosine: int8 error scales with ranges
_EXPORTS: dict = {}


def _exported(tmp_path_factory, kind: str):
    if kind not in _EXPORTS:
        spec = (encoder_spec("linformer", {"k": 8}, n_layers=2) if kind == "encoder"
                else decoder_spec("local", "ring", {"window": 4}, n_layers=2))
        model = build_model(spec)
        out = tmp_path_factory.mktemp("onnx") / kind
        export_model(model, out)
        _EXPORTS[kind] = (model, out)
    return _EXPORTS[kind]


def _compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a, b = got.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return float(np.abs(a - b).max()), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_registry_rows_and_aliases():
    assert {"cpu", "cuda", "t4", "a100", "l4", "h100", "b200", "jetson-orin", "jetson-orin-nano", "jetson-xavier",
            "jetson-thor"} == set(TARGETS)
    assert get_target("jetson").name == "jetson-orin" and get_target("jetson").sm == 87
    assert get_target("jetson-thor").dla_cores == 0 and get_target("jetson-orin").dla_cores == 2
    with pytest.raises(CapabilityError, match="unknown target 'orin2'.*jetson-orin"):
        get_target("orin2")


@pytest.mark.parametrize("target,precision,dla,needle", [
    ("jetson-orin", "fp8", None, "not supported on target jetson-orin"),
    ("t4", "bf16", None, "not supported on target t4"),
    ("jetson-thor", "fp16", 0, "has no DLA"),
    ("jetson-orin", "fp32", 0, "fp16 or int8"),
    ("jetson-orin", "int8", 2, "DLA cores 0..1"),
    ("cpu", "fp4", None, "unknown"),
])
def test_impossible_requests_fail_before_work(target, precision, dla, needle, tmp_path):
    with pytest.raises(CapabilityError, match=needle):
        build(tmp_path / "does-not-exist", target, precision, dla_core=dla, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_cpu_encoder_builds_run_in_ort(precision, tmp_path_factory, tmp_path):
    model, src = _exported(tmp_path_factory, "encoder")
    manifest = build(src, "cpu", precision, calib_samples=4, out_dir=tmp_path / "b")
    assert manifest.stage == "build" and manifest.build.precision == precision and manifest.build.engine_built
    built = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert sum(n.domain == "effx" for n in built.graph.node) == 2 and built.functions  # custom nodes survive
    if precision == "int8":  # cpu's default: ORT's dynamic int8 on the weight products, attention in float
        assert any(n.op_type == "MatMulInteger" for n in built.graph.node)
        assert manifest.build.extra["quantization"]["scheme"].startswith("dynamic int8")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    for name in ("model.onnx", "model.ort.onnx"):
        got = session(tmp_path / "b" / name).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        max_abs, cosine = _compare(got, ref)
        assert max_abs <= TOLERANCE[precision]["max_abs"] and cosine >= TOLERANCE[precision]["cosine"], (name, max_abs, cosine)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_cpu_decoder_builds_decode_in_ort(precision, tmp_path_factory, tmp_path):
    model, src = _exported(tmp_path_factory, "decoder")
    manifest = build(src, "cpu", precision, calib_samples=2, out_dir=tmp_path / "b")
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).numpy()
    got = decode_in_ort(tmp_path / "b", Manifest.read(tmp_path / "b"), ids.numpy(), prompt=5)
    max_abs, cosine = _compare(got, ref)
    # logits are larger than hidden states (vocab projection): compare the tolerance relative to their scale
    scale = max(1.0, float(np.abs(ref).max()) / 4)
    assert max_abs <= TOLERANCE[precision]["max_abs"] * scale and cosine >= TOLERANCE[precision]["cosine"]
    assert set(manifest.build.graphs) == {"prefill", "decode"}


@pytest.mark.parametrize("target", [t for t, p in TARGETS.items() if p.backend == "tensorrt" and not p.unsupported])
def test_tensorrt_targets_get_a_kit_with_valid_flags(target, tmp_path_factory, tmp_path):
    _, src = _exported(tmp_path_factory, "decoder")
    profile = get_target(target)
    precision = "int8" if "int8" in profile.precisions else "fp32"
    dla = 0 if profile.dla_cores else None
    manifest = build(src, target, precision, dla_core=dla, calib_samples=2, out_dir=tmp_path / "kit")
    info = manifest.build
    assert not info.engine_built and "TensorRT" in info.reason and info.sm == profile.sm
    script = (tmp_path / "kit" / "build_on_device.sh").read_text()
    flags = set()
    for line in script.splitlines():
        if line.startswith("trtexec "):
            flags |= {a.split("=")[0] for a in shlex.split(line)[1:] if not a.startswith("$")}
        if line.startswith("PREC_FLAG=") or "then PREC_FLAG=" in line:  # the precision flag, per device version
            flags |= {f for f in re.findall(r'PREC_FLAG="([^"]*)"', line) if f}
    allowed = TRTEXEC_FLAGS[10] | TRTEXEC_FLAGS[11]  # the script picks by the device's TensorRT
    assert flags and flags <= allowed, flags - allowed
    assert {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes"} <= flags
    # int8 is Q/DQ in the graph (calibrated here): never trtexec --int8, which runs on dummy scales
    assert "--int8" not in flags and "--stronglyTyped" in flags
    assert ("--useDLACore" in flags) == (dla is not None)
    assert (tmp_path / "kit" / "calib.npz").exists() and (tmp_path / "kit" / "decode.onnx").exists()
    Manifest.read(tmp_path / "kit").verify_files(tmp_path / "kit")


def test_kit_shapes_cover_every_dynamic_input(tmp_path_factory, tmp_path):
    _, src = _exported(tmp_path_factory, "decoder")
    build(src, "h100", "fp32", out_dir=tmp_path / "kit")
    line = next(x for x in (tmp_path / "kit" / "build_on_device.sh").read_text().splitlines() if "decode.onnx" in x)
    shapes = dict(a.split("=", 1) for a in shlex.split(line)[1:] if "Shapes" in a)
    mins = dict(p.split(":") for p in shapes["--minShapes"].split(","))
    maxs = dict(p.split(":") for p in shapes["--maxShapes"].split(","))
    assert set(mins) == {"input_ids", "past_lengths", "past.0.key", "past.0.value", "past.1.key", "past.1.value"}
    assert mins["past.0.key"] == "1x2x4x16" and maxs["input_ids"] == "8x48"


def test_failed_build_leaves_nothing(tmp_path_factory, tmp_path, monkeypatch):
    _, src = _exported(tmp_path_factory, "encoder")
    from effx.targets.ort import build as ort_build

    monkeypatch.setattr(ort_build, "_save_optimized", lambda *a: (_ for _ in ()).throw(RuntimeError("simulated")))
    with pytest.raises(RuntimeError, match="simulated"):
        build(src, "cpu", "fp32", out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_readme_targets_table_is_generated():
    from effx.check.tables import targets_markdown
    from effx.targets.profiles import targets_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("<!-- targets:begin -->\n")[1].split("\n<!-- targets:end -->")[0]
    assert section == targets_markdown(targets_table())


def _bindings_strings() -> str | None:
    candidates = [os.environ.get("EFFX_TRT_BINDINGS_SO", ""), "/tmp/trtb/x/tensorrt_bindings/tensorrt.so"]
    for c in candidates:
        if c and Path(c).is_file():
            data = Path(c).read_bytes()
            return " ".join(s.decode() for s in re.findall(rb"[A-Za-z_][A-Za-z0-9_]{2,}", data))
    return None


def test_tensorrt_api_names_exist_in_the_bindings():
    strings = _bindings_strings()
    if strings is None:
        pytest.skip("tensorrt-cu13-bindings' tensorrt.so not found (set EFFX_TRT_BINDINGS_SO to check the names)")
    root = Path(__file__).parents[2]
    source = (root / "targets" / "tensorrt" / "build.py").read_text()
    names = set(re.findall(r"trt\.(\w+)", source)) | set(re.findall(r"(?:config|builder|parser|network|profile)\.(\w+)", source))
    runner = (root / "targets" / "tensorrt" / "runner.py").read_text()  # runtime, engine and context calls
    runner = runner[runner.index("class TrtRunner"):runner.index("def _torch_dtype")]
    names |= set(re.findall(r"(?:trt|runtime|engine|ctx)\.(\w+)", runner)) - {"_trt"}
    assert {"deserialize_cuda_engine", "set_tensor_address", "execute_async_v3", "get_tensor_mode"} <= names
    words = set(strings.split())
    missing = sorted(n for n in names if n not in words and n != "__version__")
    assert not missing, missing


def test_triton_repository_from_a_cpu_build(tmp_path_factory, tmp_path):
    import re as _re

    from effx.targets.bundle.triton import write_triton_repo

    _, src = _exported(tmp_path_factory, "encoder")
    build(src, "cpu", "fp32", out_dir=tmp_path / "b")
    names = write_triton_repo(tmp_path / "b", tmp_path / "repo")
    assert names == ["effx_model"]
    config = (tmp_path / "repo" / "effx_model" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 0" in config
    tensors = _re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', config)
    assert tensors == [("input_ids", "TYPE_INT64", "-1, -1"), ("attention_mask", "TYPE_INT64", "-1, -1"),
                       ("last_hidden_state", "TYPE_FP32", "-1, -1, 64")]
    ids = np.random.default_rng(0).integers(0, 1000, (2, 6))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = session(tmp_path / "repo" / "effx_model" / "1" / "model.onnx").run(None, feed)[0]
    assert np.array_equal(got, session(tmp_path / "b" / "model.onnx").run(None, feed)[0])
    with pytest.raises(Exception, match="not a built bundle"):
        write_triton_repo(src, tmp_path / "repo2")
