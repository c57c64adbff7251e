"""TensorRT engines, built where `tensorrt` imports and the GPU is the target's. Written against the TensorRT
10.x / 11.x Python API (builder, OnnxParser, builder config, optimisation profiles, timing cache, runtime);
it cannot run on a machine without the TensorRT libraries, where effx writes a device kit instead.

Everything follows the TensorRT found here (its version picks the lowering, the facts the graphs are held
against, the network flags and the engine names; the manifest records it), not the profile's row. The
parsed graphs are kept in graphs/ of the build folder. Precision: 11.x is strongly typed; on 10.x fp32 and
Q/DQ graphs build strongly typed and fp16/bf16 take the builder flag, never int8/fp8 flags without Q/DQ."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from effx.core.errors import EffxError
from effx.core.lazy import lazy_import
from effx.core.manifest import BuildInfo, Manifest
from effx.plugins.trt import registered_plugins
from effx.targets.calib import calibration_feeds, token_batches
from effx.targets.compat import parse_version
from effx.targets.ort.runner import OrtRunner
from effx.targets.profiles import TargetProfile
from effx.targets.tensorrt.kit import engine_name, shape_flags
from effx.targets.tensorrt.plugins import register_plugins
from effx.targets.tensorrt.prepare import (
    QUANTIZED,
    prepare_graphs,
    refuse_unquantizable,
    run_modelopt,
    write_calibration,
)


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
                  out: Path, say: Callable[[str], None], timing_cache: Path | None = None, calib: str = "random",
                  calib_samples: int = 8) -> BuildInfo:
    trt = lazy_import("tensorrt", purpose="building engines")
    version = trt.__version__  # the device's TensorRT decides lowering, flags and names, not the profile's
    major = parse_version(version)[0]
    refuse_unquantizable(precision, "on this machine")
    if major >= 11 and precision in ("fp16", "bf16"):
        lazy_import("modelopt.onnx", extra="tensorrt", purpose=f"{precision} graphs for TensorRT 11 (nvidia-modelopt[onnx])")
    prepared = prepare_graphs(src, manifest, target, version, precision, calib, calib_samples, out / "graphs", say)
    models = {name: onnx.load(str(prepared.folder / g.file), load_external_data=False)
              for name, g in manifest.graphs.items()}
    routing = register_plugins(models.values())
    if routing.bodies and not routing.registered and _effx_plugins_already_registered():
        raise EffxError("effx plugins were registered earlier in this process and TensorRT >= 10.10 would route this "
                        "build's unmarked effx nodes to them; build in a fresh process")
    for note in routing.notes:
        say(note)
    if major >= 11 and precision in ("fp16", "bf16"):
        _graph_precision_with_modelopt(prepared.folder, manifest, precision, prepared.folder, say)
    logger = trt.Logger(trt.Logger.WARNING)
    quantized = precision in QUANTIZED  # Q/DQ graphs: the graph carries the precision
    cache_path = timing_cache or out / "timing.cache"
    graphs, fallbacks = {}, {}
    for name, g in manifest.graphs.items():
        say(f"TensorRT {version}: {g.file}")
        builder = trt.Builder(logger)
        flags = 0
        if major < 11 and (precision == "fp32" or quantized):  # 11.x is always strongly typed
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(prepared.folder / g.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EffxError(f"TensorRT {version} could not parse {g.file}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target.workspace_gb * (1 << 30)))
        config.builder_optimization_level = 3
        if major < 11 and precision in ("fp16", "bf16"):  # weakly typed 10.x: the only precisions flags can honour
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
        engine_file = engine_name(name, target, version)
        (out / engine_file).write_bytes(bytes(plan))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        graphs[name] = g.model_copy(update={"file": engine_file})
    return BuildInfo(target=target.name, backend="tensorrt", precision=precision, engine_built=True,
                     sm=target.sm, tensorrt_version=version, graphs=graphs, plugins=routing.record(),
                     extra={"dla_core": dla_core, "dla_gpu_fallback_layers": fallbacks,
                            "compat": prepared.compat.to_dict(), "plugin_notes": routing.notes,
                            "graphs_parsed": "graphs/", "quantization": prepared.quantization})


def _effx_plugins_already_registered() -> bool:
    if "tensorrt.plugin" not in sys.modules:
        return False
    return bool(registered_plugins(sys.modules["tensorrt.plugin"]))


def _graph_precision_with_modelopt(src: Path, manifest: Manifest, precision: str, out: Path,
                                   say: Callable[[str], None]) -> Path:
    """TensorRT 11 is strongly typed: ModelOpt writes the precision into copies of the graphs (AutoCast for
    fp16/bf16; Q/DQ for int8/fp8/int4w, calibrated on every graph input of real feeds)."""
    lazy_import("modelopt.onnx", extra="tensorrt", purpose=f"{precision} graphs for TensorRT 11 (nvidia-modelopt[onnx])")
    out.mkdir(parents=True, exist_ok=True)
    calib_files: dict[str, Path] = {}
    if precision in QUANTIZED:
        batches = token_batches(manifest, "random", 8)
        with OrtRunner(src, manifest) as fp32:
            feeds = calibration_feeds(manifest, batches, fp32)
        calib_files = {name: out / write_calibration(out / f"calib.{name}.npz", f) for name, f in feeds.items()}
    for name, g in manifest.graphs.items():
        if (src / g.file).resolve() != (out / g.file).resolve():
            shutil.copyfile(src / g.file, out / g.file)
        say(f"ModelOpt {precision}: {g.file}")
        run_modelopt(out / g.file, precision, calib_files.get(name))
    return out
