"""`effx build`: an exported ONNX folder -> a build folder for one target (atomic)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from effx.atomic import atomic_dir
from effx.errors import ArtifactError
from effx.manifest import Manifest
from effx.targets.precision import check_request
from effx.targets.profiles import TARGETS, TargetProfile, get_target


def list_targets() -> list[TargetProfile]:
    return list(TARGETS.values())


def build(onnx_dir: str | Path, target: str = "cpu", precision: str = "fp32", calib: str = "random",
          calib_samples: int = 8, dla_core: int | None = None, out_dir: str | Path = "build",
          overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Manifest:
    """Build `onnx_dir` (written by `effx export`) for `target`. Capability errors come before any work.
    TensorRT targets without TensorRT or the target's GPU here get a device build kit (engine_built=False)."""
    say = progress or (lambda _m: None)
    profile = get_target(target)
    check_request(profile, precision, dla_core)
    src = Path(onnx_dir)
    manifest = Manifest.read(src)
    kit = manifest.stage == "build" and manifest.build is not None and not manifest.build.engine_built
    if manifest.stage != "onnx" and not kit:
        raise ArtifactError(f"{src}: already built for {manifest.build.target}; `effx build` takes the folder "
                            "`effx export` wrote (or a device kit)")
    if kit:  # building a device kit on the device: its ONNX graphs and manifest are the source
        manifest = manifest.model_copy(update={"stage": "onnx", "build": None,
                                               "files": {k: v for k, v in manifest.files.items() if k.endswith(".onnx") or k.endswith(".onnx.data")}})
    manifest.verify_files(src)
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        if profile.backend == "ort":
            from effx.targets.ort_build import build_ort

            info = build_ort(src, manifest, profile, precision, calib, calib_samples, tmp, say)
        else:
            from effx.targets.tensorrt_build import build_engines, why_no_engine

            reason = why_no_engine(profile)
            if reason is None:
                info = build_engines(src, manifest, profile, precision, dla_core, tmp, say)
            else:
                from effx.targets.kit import write_kit

                say("writing a device build kit")
                info = write_kit(src, manifest, profile, precision, calib, calib_samples, dla_core, reason, tmp)
        built = manifest.model_copy(update={"stage": "build", "build": info})
        built.hash_files(tmp)
        built.write(tmp)
    return built
