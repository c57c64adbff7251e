"""effx.targets.tensorrt: the TensorRT backend (data-center GPUs and Jetson): engine builds where TensorRT
and the target's GPU are present, device build kits everywhere else, the engine runner, plugin loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from effx.core.errors import ArtifactError
from effx.core.manifest import BuildInfo, Manifest
from effx.targets.profiles import TargetProfile
from effx.targets.tensorrt.build import build_engines, why_no_engine
from effx.targets.tensorrt.kit import write_kit
from effx.targets.tensorrt.runner import TrtRunner


def build_target(src: Path, manifest: Manifest, profile: TargetProfile, precision: str, calib: str, calib_samples: int,
          dla_core: int | None, out: Path, say: Callable[[str], None]) -> BuildInfo:
    """Engines where this machine can build them, else a device build kit (and the reason)."""
    reason = why_no_engine(profile)
    if reason is None:
        return build_engines(src, manifest, profile, precision, dla_core, out, say, calib=calib,
                             calib_samples=calib_samples)
    say("writing a device build kit")
    return write_kit(src, manifest, profile, precision, calib, calib_samples, dla_core, reason, out, say)


def open_runner(folder: Path, manifest: Manifest, provider: str | None = None, threads: int = 0) -> TrtRunner:
    if manifest.build is None or not manifest.build.engine_built:
        raise ArtifactError(f"{folder}: a device build kit, no engine yet; run build_on_device.sh on the device, "
                            "then validate the folder it writes")
    return TrtRunner(folder, manifest)


__all__ = ["TrtRunner", "build_engines", "build_target", "open_runner", "why_no_engine", "write_kit"]
