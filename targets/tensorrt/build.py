"""TensorRT engines, built where `tensorrt` imports and the GPU is the target's. Written against the TensorRT
10.x / 11.x Python API (builder, OnnxParser, builder config, optimisation profiles, timing cache, runtime);
it cannot run on a machine without the TensorRT libraries, where effx writes a device kit instead."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from effx.core.errors import EffxError, StepFailed
from effx.core.lazy import lazy_import
from effx.core.manifest import BuildInfo, Manifest
from effx.targets.calib import token_batches
from effx.targets.profiles import TargetProfile
from effx.targets.tensorrt.kit import engine_name, modelopt_command, shape_flags
from effx.targets.tensorrt.plugins import register_plugins


def why_no_engine(target: TargetProfile) -> str | None:
    """None when this machine can build the target's engine, else the reason."""
    try:
        lazy_import("tensorrt", purpose="building engines")
    except Exception as exc:  # not installed, or the libraries missing behind the bindings
        return f"TensorRT is not importable here ({exc.__class__.__name__}); pip install 'effx[tensorrt]' on a GPU machine"
    try:
        if not torch.cuda.is_available():
            return "no CUDA GPU on this machine"
        major, minor = torch.cuda.get_device_capability()
    except Exception as exc:
        return f"cannot query the GPU ({exc})"
    if major * 10 + minor != target.sm:
        return f"this GPU is sm_{major}{minor}, the target {target.name} is sm_{target.sm}: engines are not portable"
    return None


def _profile_dims(manifest: Manifest, graph: str) -> dict[str, list[tuple[int, ...]]]:
    shapes = {k: v for k, v in shape_flags(manifest, graph).items()}
    out: dict[str, list[tuple[int, ...]]] = {}
    for which in ("--minShapes", "--optShapes", "--maxShapes"):
        for part in filter(None, shapes[which].split(",")):
            name, dims = part.split(":")
            out.setdefault(name, []).append(tuple(int(d) for d in dims.split("x")))
    return out


def build_engines(src: Path, manifest: Manifest, target: TargetProfile, precision: str, dla_core: int | None,
                  out: Path, say: Callable[[str], None], timing_cache: Path | None = None) -> BuildInfo:
    trt = lazy_import("tensorrt", purpose="building engines")
    logger = trt.Logger(trt.Logger.WARNING)
    register_plugins()
    major = int(trt.__version__.split(".")[0])
    if major >= 11 and precision != "fp32":
        src = _graph_precision_with_modelopt(src, manifest, precision, out, say)
    cache_path = timing_cache or out / "timing.cache"
    graphs, fallbacks = {}, {}
    for name, g in manifest.graphs.items():
        say(f"TensorRT {trt.__version__}: {g.file}")
        builder = trt.Builder(logger)
        flags = 0
        if major < 11:  # required for explicit precision on 10.x; 11.x is always strongly typed
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "fp32" else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(src / g.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EffxError(f"TensorRT could not parse {g.file}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target.workspace_gb * (1 << 30)))
        config.builder_optimization_level = 3
        if major < 11 and precision in ("fp16", "int8", "bf16", "fp8"):
            config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in _profile_dims(manifest, name).items():
            profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        if dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            fallbacks[name] = [network.get_layer(i).name for i in range(network.num_layers)
                               if not config.can_run_on_DLA(network.get_layer(i))]
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EffxError(f"TensorRT failed to build {g.file}; rerun with --debug for the builder log")
        engine_file = engine_name(name, target)
        (out / engine_file).write_bytes(bytes(plan))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        graphs[name] = g.model_copy(update={"file": engine_file})
    return BuildInfo(target=target.name, backend="tensorrt", precision=precision, engine_built=True,
                     sm=target.sm, tensorrt_version=trt.__version__, graphs=graphs,
                     plugins=[{"op": c.op_type, "plugin": c.trt_plugin} for c in manifest.custom_ops],
                     extra={"dla_core": dla_core, "dla_gpu_fallback_layers": fallbacks})


def _graph_precision_with_modelopt(src: Path, manifest: Manifest, precision: str, out: Path,
                                   say: Callable[[str], None]) -> Path:
    """TensorRT 11 is strongly typed: run ModelOpt on copies of the graphs (calibrating on random tokens)."""
    lazy_import("modelopt.onnx", extra="tensorrt", purpose=f"{precision} graphs for TensorRT 11 (nvidia-modelopt[onnx])")
    work = out / "modelopt"
    work.mkdir()
    np.savez(work / "calib.npz", input_ids=np.concatenate(token_batches(manifest, "random", 8)))
    for g in manifest.graphs.values():
        shutil.copyfile(src / g.file, work / g.file)
        say(f"ModelOpt {precision}: {g.file}")
        cmd = modelopt_command(g.file, precision)
        proc = subprocess.run([sys.executable, *cmd[1:]], cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise StepFailed(f"NVIDIA ModelOpt ({' '.join(cmd[1:4])}) failed on {g.file} with exit code "
                             f"{proc.returncode}: {lines[-1] if lines else 'no output'}")
    return work
