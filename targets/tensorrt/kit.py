"""Device build kits: what `effx build --target <gpu>` writes where it cannot build the engine itself (no
TensorRT here, or not the target's GPU). The kit holds the ONNX graphs, the manifest, calibration data, the
plugin list and `build_on_device.sh`, which runs `effx build` on the device when effx is installed there and
otherwise the equivalent `trtexec` lines, using only flags that exist in the target's TensorRT version."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np

from effx.core.manifest import BuildInfo, Manifest
from effx.targets.calib import token_batches
from effx.targets.profiles import TargetProfile

# trtexec flags by TensorRT major (samples/common/sampleOptions.cpp; ../shared/notes/tensorrt-facts.md §4):
# precision flags are gone in 11.x (strongly typed: precision lives in the graph), --builderOptimizationLevel
# arrived in 8.6, the plugin-loading flags --staticPlugins/--dynamicPlugins in 10.x.
_COMMON = {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--memPoolSize",
           "--timingCacheFile", "--useDLACore", "--allowGPUFallback", "--skipInference", "--verbose"}
TRTEXEC_FLAGS: dict[int, set[str]] = {
    8: _COMMON | {"--fp16", "--int8", "--best", "--plugins"},
    10: _COMMON | {"--fp16", "--int8", "--bf16", "--fp8", "--best", "--stronglyTyped", "--builderOptimizationLevel",
                   "--staticPlugins", "--dynamicPlugins", "--setPluginsToSerialize"},
    11: _COMMON | {"--builderOptimizationLevel", "--staticPlugins", "--dynamicPlugins", "--setPluginsToSerialize"},
}


def modelopt_command(onnx_file: str, precision: str, calib_npz: str = "calib.npz") -> list[str]:
    """NVIDIA ModelOpt puts the precision into the graph (TensorRT 11 takes it from nowhere else):
    AutoCast for fp16/bf16, PTQ (Q/DQ) for int8/fp8/int4 weight-only."""
    if precision in ("fp16", "bf16"):
        return ["python", "-m", "modelopt.onnx.autocast", "--onnx_path", onnx_file, "--low_precision_type", precision,
                "--output_path", onnx_file]
    mode = {"int8": "int8", "fp8": "fp8", "int4w": "int4"}[precision]
    return ["python", "-m", "modelopt.onnx.quantization", "--onnx_path", onnx_file, "--quantize_mode", mode,
            "--calibration_data_path", calib_npz, "--output_path", onnx_file]


def engine_name(graph: str, target: TargetProfile) -> str:
    major, minor = target.tensorrt_major_minor
    return f"{graph}.sm{target.sm}.trt{major}.{minor}.engine"


def shape_flags(manifest: Manifest, graph: str) -> dict[str, str]:
    """--minShapes/--optShapes/--maxShapes for every dynamic input, from the manifest's dimension ranges."""
    g = manifest.graphs[graph]
    max_seq = int(manifest.spec["model"]["max_seq_len"])
    out = {}
    for which in ("min", "opt", "max"):
        parts = []
        for t in g.inputs:
            if all(isinstance(d, int) for d in t.shape):
                continue
            dims = []
            for d in t.shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d in g.dims:
                    dims.append(getattr(g.dims[d], which))
                else:  # cache lengths of other kinds (pooled groups, tails): 0 .. max_seq_len
                    dims.append({"min": 0, "opt": 1, "max": max_seq}[which])
            parts.append(f"{t.name}:{'x'.join(map(str, dims))}")
        out[f"--{which}Shapes"] = ",".join(parts)
    return out


def trtexec_command(manifest: Manifest, graph: str, target: TargetProfile, precision: str,
                    dla_core: int | None) -> list[str]:
    major = target.tensorrt_major_minor[0]
    cmd = ["trtexec", f"--onnx={manifest.graphs[graph].file}", f"--saveEngine={engine_name(graph, target)}"]
    cmd += [f"{k}={v}" for k, v in shape_flags(manifest, graph).items()]
    cmd.append(f"--memPoolSize=workspace:{int(target.workspace_gb * 1024)}M")
    cmd.append("--timingCacheFile=timing.cache")
    if major >= 10 or target.tensorrt_major_minor >= (8, 6):
        cmd.append("--builderOptimizationLevel=3")
    if major < 11 and precision in ("fp16", "int8", "bf16", "fp8"):
        cmd.append(f"--{precision}")  # TRT <= 10 still takes builder precision flags
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return cmd


def write_kit(src: Path, manifest: Manifest, target: TargetProfile, precision: str, calib: str, samples: int,
              dla_core: int | None, reason: str, out: Path) -> BuildInfo:
    for name in manifest.files:
        shutil.copyfile(src / name, out / name)
    batches = token_batches(manifest, calib, samples) if precision in ("int8", "fp8", "int4w") else []
    if batches:  # the device calibrates with the same data (ModelOpt takes an .npz)
        np.savez(out / "calib.npz", input_ids=np.concatenate(batches))
    lines = ["#!/usr/bin/env bash", f"# effx device build kit for {target.name} (sm_{target.sm}, TensorRT "
             f"{'.'.join(map(str, target.tensorrt_major_minor))}), precision {precision}.",
             f"# No engine was built where this kit was made: {reason}", "set -euo pipefail",
             'cd "$(dirname "$0")"', "if command -v effx >/dev/null 2>&1; then",
             "  exec effx build . --target " + shlex.quote(target.name) + f" --precision {precision}"
             + (f" --dla-core {dla_core}" if dla_core is not None else "") + (" --calib calib.npz" if batches else "")
             + " -o engine", "fi"]
    major = target.tensorrt_major_minor[0]
    if major >= 11 and precision != "fp32":
        lines += ["# TensorRT 11 is strongly typed: the precision must be in the graph (NVIDIA ModelOpt)."]
        for g in manifest.graphs.values():
            lines.append(" ".join(shlex.quote(a) for a in modelopt_command(g.file, precision)))
    for graph in manifest.graphs:
        lines.append(" ".join(shlex.quote(a) for a in trtexec_command(manifest, graph, target, precision, dla_core)))
    script = out / "build_on_device.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    (out / "README.device.md").write_text(
        f"# Build on the device\n\nTarget: {target.name} — {target.summary}.\n\n"
        f"No engine was built here: {reason}.\n\nCopy this folder to the device and run `bash build_on_device.sh`. "
        "Engines are tied to the GPU (sm) and the TensorRT version; the script names them "
        f"`<graph>.sm{target.sm}.trt<major>.<minor>.engine`.\n"
    )
    return BuildInfo(target=target.name, backend="tensorrt", precision=precision, engine_built=False, reason=reason,
                     sm=target.sm, tensorrt_version=".".join(map(str, target.tensorrt_major_minor)),
                     graphs=dict(manifest.graphs),
                     plugins=[{"op": c.op_type, "plugin": c.trt_plugin, "fallback": "model-local ONNX function"}
                              for c in manifest.custom_ops],
                     extra={"dla_core": dla_core, "script": "build_on_device.sh"})
