"""Device build kits: what `effx build --target <gpu>` writes where it cannot build the engine itself (no
TensorRT here, or not the target's GPU). The kit holds the graphs TensorRT will parse (lowered and checked for
the target's TensorRT, Q/DQ where the precision needs it), the manifest, calibration data of every graph
input, the plugin routing, `build_on_device.sh` (runs `effx build` on the device when effx is installed
there, otherwise trtexec with the flags of the TensorRT it finds) and `check_on_device.sh` (verifies the
engines: effx validate against PyTorch, polygraphy TensorRT against ONNX Runtime)."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from effx.core.manifest import BuildInfo, Manifest
from effx.core.tolerance import tolerance_for
from effx.targets.calib import calibration_feeds, token_batches
from effx.targets.compat import parse_version
from effx.targets.ort.runner import OrtRunner
from effx.targets.profiles import TargetProfile
from effx.targets.tensorrt.plugins import plugin_routing
from effx.targets.tensorrt.prepare import QUANTIZED, Prepared, has_modelopt, modelopt_command, prepare_graphs

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


def engine_name(graph: str, target: TargetProfile, tensorrt_version: str | None = None) -> str:
    """<graph>.sm<sm>.trt<major>.<minor>.engine for the TensorRT that builds it (the profile's when unknown)."""
    major, minor = parse_version(tensorrt_version) if tensorrt_version else target.tensorrt_major_minor
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


def trtexec_command(manifest: Manifest, graph: str, target: TargetProfile, dla_core: int | None) -> list[str]:
    """The trtexec line of one graph for the device's TensorRT: the engine name takes $TRT_MAJOR.$TRT_MINOR and
    the precision flag $PREC_FLAG, both set by build_on_device.sh from the TensorRT it finds."""
    cmd = ["trtexec", f"--onnx={manifest.graphs[graph].file}",
           f"--saveEngine={graph}.sm{target.sm}.trt$TRT_MAJOR.$TRT_MINOR.engine"]
    cmd += [f"{k}={v}" for k, v in shape_flags(manifest, graph).items()]
    cmd.append(f"--memPoolSize=workspace:{int(target.workspace_gb * 1024)}M")
    cmd += ["--timingCacheFile=timing.cache", "--builderOptimizationLevel=3"]
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return cmd


def precision_flag(major: int, precision: str) -> str:
    """trtexec's precision flag for TensorRT `major`: none on 11.x (strongly typed: the graph carries it),
    --fp16/--bf16 on 10.x, --stronglyTyped for fp32 and Q/DQ graphs on 10.x. Never --int8/--fp8: without a
    calibrator those run on dummy scales."""
    if major >= 11:
        return ""
    return f"--{precision}" if precision in ("fp16", "bf16") else "--stronglyTyped"


def _q(word: str) -> str:
    """Shell-quote, keeping $TRT_MAJOR/$TRT_MINOR expandable."""
    return f'"{word}"' if "$" in word else shlex.quote(word)


def write_kit(src: Path, manifest: Manifest, target: TargetProfile, precision: str, calib: str, samples: int,
              dla_core: int | None, reason: str, out: Path, say: Callable[[str], None] = lambda _m: None) -> BuildInfo:
    for name in manifest.files:
        shutil.copyfile(src / name, out / name)
    profile_version = ".".join(map(str, target.tensorrt_major_minor))
    # Q/DQ graphs travel in the kit (ModelOpt here, or ORT's symmetric QDQ for int8); fp8/int4w without ModelOpt
    # here are quantized on the device, from the calibration feeds the kit carries
    on_device = precision in ("fp8", "int4w") and not has_modelopt()
    prepared = prepare_graphs(src, manifest, target, profile_version, precision, calib, samples, out, say,
                              quantize_here=not on_device)
    marked, _ = plugin_routing(onnx.load(str(out / g.file), load_external_data=False)
                               for g in manifest.graphs.values())
    lines = ["#!/usr/bin/env bash",
             f"# effx device build kit for {target.name} (sm_{target.sm}), precision {precision}; effx lowered and "
             f"checked the graphs for TensorRT {profile_version}.",
             f"# No engine was built where this kit was made: {reason}", "set -euo pipefail",
             'cd "$(dirname "$0")"', "if command -v effx >/dev/null 2>&1; then",
             "  exec effx build . --target " + shlex.quote(target.name) + f" --precision {precision}"
             + (f" --dla-core {dla_core}" if dla_core is not None else "")
             + (" --calib calib.npz" if precision in QUANTIZED else "") + " -o engine", "fi",
             "# engine names and flags follow the TensorRT on this device, not the profile's row",
             "TRT_VERSION=\"$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)\"",
             'if [ -z "$TRT_VERSION" ]; then',
             "  v=\"$( (trtexec 2>&1 || true) | grep -o 'TensorRT v[0-9]*' | head -n1 | tr -dc 0-9)\"",
             '  if [ -n "$v" ]; then TRT_VERSION="$((v / 10000)).$(( (v / 100) % 100 ))"; fi',
             "fi",
             'if [ -z "$TRT_VERSION" ]; then echo "effx kit: no TensorRT here (python3 -c \'import tensorrt\' and '
             'trtexec both failed)" >&2; exit 2; fi',
             'TRT_MAJOR="${TRT_VERSION%%.*}"; TRT_REST="${TRT_VERSION#*.}"; TRT_MINOR="${TRT_REST%%.*}"',
             'if [ "$TRT_MAJOR" -lt 10 ]; then echo "effx kit: TensorRT $TRT_VERSION is older than 10.0; effx graphs '
             'need TensorRT >= 10 (opset >= 18, local functions)" >&2; exit 2; fi',
             'echo "TensorRT $TRT_VERSION on this device"',
             f'PREC_FLAG="{precision_flag(10, precision)}"',
             f'if [ "$TRT_MAJOR" -ge 11 ]; then PREC_FLAG="{precision_flag(11, precision)}"; fi']
    need_modelopt = "python3 -c 'import modelopt.onnx' 2>/dev/null || { echo \"effx kit: --precision " + precision + \
        " needs NVIDIA ModelOpt on this device (pip install 'nvidia-modelopt[onnx]')\" >&2; exit 2; }"
    if precision in ("fp16", "bf16"):
        lines += ['if [ "$TRT_MAJOR" -ge 11 ]; then  # strongly typed: the precision must be in the graph',
                  "  " + need_modelopt]
        lines += ["  " + " ".join(shlex.quote(a) for a in modelopt_command(g.file, precision, ""))
                  for g in manifest.graphs.values()]
        lines.append("fi")
    if on_device:
        lines.append(need_modelopt)
        lines += [" ".join(shlex.quote(a) for a in modelopt_command(g.file, precision, prepared.calib_files[name]))
                  for name, g in manifest.graphs.items()]
    for graph in manifest.graphs:
        lines.append(" ".join(_q(a) for a in trtexec_command(manifest, graph, target, dla_core)) + " $PREC_FLAG")
    lines += ["# record the TensorRT that built the engines: effx_run and effx validate read it from the manifest",
              'sed -i "s/\\"tensorrt_version\\": \\"[^\\"]*\\"/\\"tensorrt_version\\": \\"$TRT_VERSION\\"/" manifest.json',
              'echo "engines built with TensorRT $TRT_VERSION; verify them: bash check_on_device.sh"']
    script = out / "build_on_device.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    check = out / "check_on_device.sh"
    check.write_text(check_script(manifest, target, precision, check_feeds(src, manifest, out)))
    check.chmod(0o755)
    (out / "README.device.md").write_text(device_readme(target, precision, reason, prepared))
    return BuildInfo(target=target.name, backend="tensorrt", precision=precision, engine_built=False, reason=reason,
                     sm=target.sm, tensorrt_version=profile_version, graphs=dict(manifest.graphs),
                     plugins=[{"op": c.op_type, "plugin": c.trt_plugin,
                               "route": "plugin" if c.op_type in marked else "function body",
                               "fallback": "model-local ONNX function"} for c in manifest.custom_ops],
                     extra={"dla_core": dla_core, "script": "build_on_device.sh", "check": "check_on_device.sh",
                            "compat": prepared.compat.to_dict(), "quantization": prepared.quantization,
                            "calibration_files": prepared.calib_files})


# Polygraphy's data-loader hook (`--data-loader-script check_data.py:load_data`): the kit's check feeds, made
# through the host protocol (a decode step gets a real cache and lengths, which random data would not be)
CHECK_LOADER = '''"""Feeds for `polygraphy run --data-loader-script check_data.py:load_data` (written by effx)."""
import os

import numpy as np


def load_data():
    with np.load(os.environ["EFFX_CHECK_FEEDS"]) as data:
        yield {name: data[name] for name in data.files}
'''


def check_feeds(src: Path, manifest: Manifest, out: Path, seq: int = 16) -> dict[str, dict[str, list[int]]]:
    """check_feeds.<graph>.npz: one batch of real feeds per graph (decoders through the host protocol), at
    shapes inside the kit's optimisation profiles; returns graph -> input -> shape."""
    batches = token_batches(manifest, "random", 1, seq=seq, batch=1, seed=1)
    with OrtRunner(src, manifest) as fp32:
        feeds = calibration_feeds(manifest, batches, fp32)
    (out / "check_data.py").write_text(CHECK_LOADER)
    shapes = {}
    for name, graph_feeds in feeds.items():
        np.savez(out / f"check_feeds.{name}.npz", **graph_feeds[0])
        shapes[name] = {k: list(np.asarray(v).shape) for k, v in graph_feeds[0].items()}
    return shapes


def polygraphy_command(manifest: Manifest, graph: str, precision: str) -> list[str]:
    """`polygraphy run` of one kit graph: TensorRT against ONNX Runtime on the kit's check feeds, at the
    precision's tolerances (effx.core.tolerance; quantized precisions are judged on the median error, as
    effx judges them on a share of elements, not on every one)."""
    tol = tolerance_for(precision)
    stat = "elemwise" if precision in ("fp32", "fp16", "bf16") else "median"
    return ["polygraphy", "run", manifest.graphs[graph].file, "--trt", "--onnxrt",
            "--data-loader-script", "check_data.py:load_data",
            "--atol", f"{tol.atol:g}", "--rtol", f"{tol.rtol:g}", "--check-error-stat", stat]


def check_script(manifest: Manifest, target: TargetProfile, precision: str,
                 shapes: dict[str, dict[str, list[int]]]) -> str:
    """check_on_device.sh: effx validate (TensorRT against PyTorch) where effx and torch are installed, and
    polygraphy (TensorRT against ONNX Runtime) where Polygraphy is; prints PASS or FAIL, writes the report."""
    poly_prec = {"fp16": "--fp16", "bf16": "--bf16"}.get(precision, "--strongly-typed")
    lines = ["#!/usr/bin/env bash",
             f"# effx: verify the {target.name} engines of this kit on the device ({precision}; tolerance: "
             f"{tolerance_for(precision).describe()}).",
             *(f"# check feeds of {name} (check_feeds.{name}.npz): "
               + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in s.items()) for name, s in shapes.items()),
             "# usage: bash check_on_device.sh [MODEL_DIR]   (MODEL_DIR: the effx model folder, for effx validate)",
             "set -uo pipefail", 'cd "$(dirname "$0")"', "REPORT=check_on_device.report.txt", ': > "$REPORT"',
             "RESULT=PASS; RAN=0",
             'say() { echo "$*" | tee -a "$REPORT"; }',
             "DIR=.; if [ -f engine/manifest.json ]; then DIR=engine; fi",
             'if command -v effx >/dev/null 2>&1 && python3 -c "import torch" 2>/dev/null; then',
             '  RAN=1; say "effx validate $DIR (TensorRT against the PyTorch reference)"',
             '  if effx validate "$DIR" --against torch ${1:+--reference "$1"} -o check_on_device.validate --overwrite '
             '--no-plots >>"$REPORT" 2>&1; then say "effx validate: PASS"; else say "effx validate: FAIL"; RESULT=FAIL; fi',
             "fi",
             "if command -v polygraphy >/dev/null 2>&1; then",
             "  TRT_MAJOR=\"$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(\".\")[0])' 2>/dev/null || echo 0)\"",
             f'  PREC=""; if [ "$TRT_MAJOR" -lt 11 ]; then PREC="{poly_prec}"; fi']
    for name in manifest.graphs:
        cmd = " ".join(shlex.quote(a) for a in polygraphy_command(manifest, name, precision))
        lines += [f'  RAN=1; export EFFX_CHECK_FEEDS=check_feeds.{name}.npz; say "{cmd} $PREC"',
                  f'  if {cmd} $PREC >>"$REPORT" 2>&1; then say "polygraphy {name}: PASS"; '
                  f'else say "polygraphy {name}: FAIL"; RESULT=FAIL; fi']
    lines += ["fi",
              'if [ "$RAN" -eq 0 ]; then say "nothing could check the engines: install effx with torch, or polygraphy '
              '(pip install polygraphy)"; RESULT=FAIL; fi',
              'say "$RESULT"', '[ "$RESULT" = PASS ]']
    return "\n".join(lines) + "\n"


def device_readme(target: TargetProfile, precision: str, reason: str, prepared: Prepared) -> str:
    compat = prepared.compat
    lowering = "".join(f"- {n}\n" for n in compat.lowering) or "- nothing needed rewriting\n"
    findings = "".join(f"- {f.line()}\n" for f in compat.findings) or "- none\n"
    quant = f"\nQuantization: {prepared.quantization.get('method', '')}\n" if prepared.quantization else ""
    return (
        f"# Build on the device\n\nTarget: {target.name} — {target.summary}.\n\nNo engine was built here: {reason}.\n\n"
        "## 1. Build\n\nCopy this folder to the device and run `bash build_on_device.sh`. It runs `effx build` where "
        "effx is installed, otherwise trtexec. Engines are tied to the GPU (sm) and the TensorRT version: the script "
        f"reads the device's TensorRT, names the engines `<graph>.sm{target.sm}.trt<major>.<minor>.engine` after "
        "it, and writes that version into manifest.json.\n\n"
        "## 2. Verify\n\nRun `bash check_on_device.sh [MODEL_DIR]`. Where effx and torch are installed it runs "
        "`effx validate` (the TensorRT engines against the PyTorch reference; MODEL_DIR is the effx model folder); "
        "where Polygraphy is installed it runs `polygraphy run <graph> --trt --onnxrt` (TensorRT against ONNX "
        f"Runtime) with this kit's shapes, at the {precision} tolerance ({tolerance_for(precision).describe()}). "
        "PASS looks like this, with exit code 0:\n\n```\npolygraphy prefill: PASS\npolygraphy decode: PASS\nPASS\n```\n\n"
        "Any FAIL line makes the last line FAIL and the exit code 1; the full log is check_on_device.report.txt.\n\n"
        f"## Compatibility check (effx check)\n\n{compat.summary()}\n\nLowered for TensorRT {compat.tensorrt_version}:\n\n"
        f"{lowering}\nFindings:\n\n{findings}\nFacts: {compat.source}\n{quant}")
