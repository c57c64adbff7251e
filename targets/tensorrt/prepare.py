"""The graphs a TensorRT build hands the parser, made before any engine work (engine builds and device kits):

1. lowered for the TensorRT version that will parse them (effx.targets.lower), then held against that
   version's facts (effx.targets.compat); a blocking finding refuses the build with one line;
2. for int8 / fp8 / int4w, Q/DQ graphs calibrated on real feeds of every graph input (decoders through the
   host protocol): NVIDIA ModelOpt where installed, else ONNX Runtime's static QDQ quantizer with symmetric
   int8 (TensorRT takes zero points of 0 only). TensorRT 10.x builder flags alone (no calibrator, no Q/DQ)
   leave an engine that silently runs in higher precision, and `int4w` has no flag at all, so a precision
   that cannot be put into the graph is refused before any work.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from effx.core.errors import CapabilityError, StepFailed
from effx.core.manifest import Manifest
from effx.core.runner import Feed
from effx.targets.calib import calibration_feeds, token_batches
from effx.targets.compat import CompatReport, check_models, trt_facts
from effx.targets.lower import lower_models
from effx.targets.ort.build import INT8_OPS, fold_weight_transposes, int8_plan
from effx.targets.ort.runner import OrtRunner
from effx.targets.profiles import TargetProfile

QUANTIZED = ("int8", "fp8", "int4w")


@dataclass
class Prepared:
    folder: Path  # where the graphs TensorRT parses are (file names as in the manifest)
    compat: CompatReport
    notes: list[str] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=dict)
    calib_files: dict[str, str] = field(default_factory=dict)  # graph -> calib.<graph>.npz (every input)


def has_modelopt() -> bool:
    try:
        return importlib.util.find_spec("modelopt") is not None
    except (ImportError, ValueError):
        return False


def refuse_unquantizable(precision: str, where: str) -> None:
    """int8/fp8/int4w need Q/DQ in the graph; say so before any work where nothing here can write them."""
    if precision in ("fp8", "int4w") and not has_modelopt():
        what = "an fp32 engine (int4w has no builder flag)" if precision == "int4w" else "fp16/fp32 kernels"
        raise CapabilityError(f"--precision {precision} for TensorRT needs NVIDIA ModelOpt {where} to put Q/DQ into "
                              f"the graph (pip install 'nvidia-modelopt[onnx]'); without it TensorRT would silently "
                              f"build {what}")


def prepare_graphs(src: Path, manifest: Manifest, target: TargetProfile, tensorrt_version: str, precision: str,
                   calib: str, samples: int, dest: Path, say: Callable[[str], None],
                   quantize_here: bool = True) -> Prepared:
    """Lower, check and (for quantized precisions) Q/DQ the graphs of `src` into `dest` for TensorRT
    `tensorrt_version`. quantize_here=False (a kit without ModelOpt for fp8/int4w) leaves Q/DQ to the device
    but still writes the calibration feeds."""
    facts = trt_facts(tensorrt_version)
    models = {name: onnx.load(str(src / g.file)) for name, g in manifest.graphs.items()}
    lowered, notes = lower_models(models, facts)  # a CapabilityError here names the node and the fix
    report = check_models(lowered, target.name, facts)
    report.lowering = notes
    if not report.ok:
        first = report.blocking[0]
        raise CapabilityError(f"TensorRT {facts.asked} would not parse {len(report.blocking)} node(s) after lowering; "
                              f"first: {first.graph}: node {first.node!r} ({first.op}): {first.message}; fix: "
                              f"{first.fix} (all: effx check {src} --target {target.name})")
    for note in notes:
        say(f"lowered {note}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, g in manifest.graphs.items():
        external = (src / g.file).with_suffix(".onnx.data").exists()
        onnx.save_model(lowered[name], str(dest / g.file), save_as_external_data=external,
                        location=Path(g.file).with_suffix(".onnx.data").name if external else None)
    prepared = Prepared(folder=dest, compat=report, notes=list(notes))
    if precision not in QUANTIZED:
        return prepared
    if all(any(n.op_type == "QuantizeLinear" for n in m.graph.node) for m in lowered.values()):
        # a device kit being built on the device: effx already put calibrated Q/DQ into its graphs
        prepared.quantization = {"method": "Q/DQ already in the graphs (quantized where the kit was written)"}
        return prepared
    if calib == "dynamic":
        raise CapabilityError("--calib dynamic is ONNX Runtime's dynamic quantization; TensorRT needs Q/DQ scales "
                              "from static calibration: use --calib random, text:FILE, FILE.npz or a token file")
    calib = "random" if calib == "auto" else calib
    say(f"calibrating on {samples} batches ({calib}) with every graph input")
    described: dict = {}
    batches = token_batches(manifest, calib, samples, folder=src, info=described)
    with OrtRunner(src, manifest) as fp32:  # decoder caches come from the fp32 graphs (host protocol)
        feeds = calibration_feeds(manifest, batches, fp32)
    for name, graph_feeds in feeds.items():
        prepared.calib_files[name] = write_calibration(dest / f"calib.{name}.npz", graph_feeds)
    np.savez(dest / "calib.npz", input_ids=np.concatenate(batches))  # what `effx build --calib` reads on device
    prepared.quantization = {"calibration": {"source": calib, "batches": len(batches),
                                             "inputs": {n: sorted(f[0]) for n, f in feeds.items()}} | described}
    if not quantize_here:
        prepared.quantization["method"] = "NVIDIA ModelOpt on the device (build_on_device.sh)"
        return prepared
    for name, g in manifest.graphs.items():
        path = dest / g.file
        if has_modelopt():
            say(f"ModelOpt {precision}: {g.file}")
            run_modelopt(path, precision, dest / prepared.calib_files[name])
            prepared.quantization["method"] = f"NVIDIA ModelOpt {precision} Q/DQ (calibrated on every graph input)"
        else:  # int8 only (refuse_unquantizable stopped fp8/int4w before any work)
            say(f"int8 Q/DQ (ONNX Runtime, symmetric): {g.file}")
            model = fold_weight_transposes(onnx.load(str(path)))
            keep_float = int8_plan(model)["float"]["lm_head"]
            quantize_static(model, str(path), _Reader(feeds[name]), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(INT8_OPS), nodes_to_exclude=keep_float,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
            prepared.quantization["method"] = ("ONNX Runtime quantize_static: QDQ, symmetric S8 weights (per channel) "
                                               "and activations (zero points 0, as TensorRT requires), MatMul/Gemm")
    return prepared


def write_calibration(path: Path, feeds: list[Feed]) -> str:
    """Every input of one graph, the calibration batches stacked on the batch axis (ModelOpt's .npz format)."""
    names = sorted(feeds[0])
    np.savez(path, **{n: np.concatenate([np.asarray(f[n]) for f in feeds], axis=0) for n in names})
    return path.name


def modelopt_command(onnx_file: str, precision: str, calib_npz: str) -> list[str]:
    """NVIDIA ModelOpt puts the precision into the graph: AutoCast for fp16/bf16, PTQ (Q/DQ) for int8/fp8/int4."""
    if precision in ("fp16", "bf16"):
        return ["python3", "-m", "modelopt.onnx.autocast", "--onnx_path", onnx_file, "--low_precision_type", precision,
                "--output_path", onnx_file]
    mode = {"int8": "int8", "fp8": "fp8", "int4w": "int4"}[precision]
    return ["python3", "-m", "modelopt.onnx.quantization", "--onnx_path", onnx_file, "--quantize_mode", mode,
            "--calibration_data_path", calib_npz, "--output_path", onnx_file]


def run_modelopt(path: Path, precision: str, calib_npz: Path | None) -> None:
    cmd = modelopt_command(path.name, precision, calib_npz.name if calib_npz else "")
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=path.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StepFailed(f"NVIDIA ModelOpt ({' '.join(cmd[1:4])}) failed on {path.name} with exit code "
                         f"{proc.returncode}: {lines[-1] if lines else 'no output'}")


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[Feed]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)
