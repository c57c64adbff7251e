"""`effx build` and the runner of a build folder: one entry point over the backends (effx.targets.ort,
effx.targets.tensorrt), chosen by the target profile's `backend`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from effx.core.atomic import atomic_dir, check_output_dir
from effx.core.errors import ArtifactError
from effx.core.manifest import Manifest
from effx.core.runner import Runner
from effx.targets import ort, tensorrt
from effx.targets.bundle.readme import bundle_readme
from effx.targets.precision import check_request
from effx.targets.profiles import TARGETS, TargetProfile, get_target

# each backend package has build_target(src, manifest, profile, precision, calib, calib_samples, dla_core, out,
# say) -> BuildInfo and open_runner(folder, manifest, provider, threads) -> Runner
BACKENDS: dict[str, ModuleType] = {"ort": ort, "tensorrt": tensorrt}


def list_targets() -> list[TargetProfile]:
    return list(TARGETS.values())


def build(onnx_dir: str | Path, target: str = "cpu", precision: str = "fp32", calib: str = "auto",
          calib_samples: int = 8, dla_core: int | None = None, out_dir: str | Path = "build",
          overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Manifest:
    """Build `onnx_dir` (written by `effx export`) for `target`. Capability errors come before any work.
    TensorRT targets without TensorRT or the target's GPU here get a device build kit (engine_built=False)."""
    say = progress or (lambda _m: None)
    profile = get_target(target)
    check_request(profile, precision, dla_core)
    check_output_dir(Path(out_dir), "build", overwrite)
    src = Path(onnx_dir)
    manifest = Manifest.read(src)
    kit = manifest.stage == "build" and manifest.build is not None and not manifest.build.engine_built
    if manifest.stage != "onnx" and not kit:
        raise ArtifactError(f"{src}: already built for {manifest.build.target}; `effx build` takes the folder "
                            "`effx export` wrote (or a device kit)")
    if kit:  # building a device kit on the device: its ONNX graphs and manifest are the source
        manifest = manifest.model_copy(update={"stage": "onnx", "build": None,
                                               "files": {k: v for k, v in manifest.files.items()
                                                         if k.endswith(".onnx") or k.endswith(".onnx.data")}})
    manifest.verify_files(src)
    with atomic_dir(Path(out_dir), "build", overwrite=overwrite) as tmp:
        info = BACKENDS[profile.backend].build_target(src, manifest, profile, precision, calib, calib_samples, dla_core,
                                               tmp, say)
        built = manifest.model_copy(update={"stage": "build", "build": info})
        (tmp / "README.md").write_text(bundle_readme(built))
        built.hash_files(tmp)
        built.write(tmp)
    return built


def open_runner(folder: Path, manifest: Manifest, provider: str | None = None, threads: int = 0,
                arena: bool = True) -> Runner:
    """The runner for what `folder` holds: engines of its build's backend, or ONNX graphs for ONNX Runtime
    (`arena`: ONNX Runtime's CPU memory arena; other backends have none)."""
    backend = manifest.build.backend if manifest.build is not None else "ort"
    if backend == "ort":
        return BACKENDS[backend].open_runner(Path(folder), manifest, provider=provider, threads=threads, arena=arena)
    return BACKENDS[backend].open_runner(Path(folder), manifest, provider=provider, threads=threads)
