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
        (tmp / "README.md").write_text(bundle_readme(built))
        built.hash_files(tmp)
        built.write(tmp)
    return built


def bundle_readme(manifest: Manifest) -> str:
    """The bundle's README for the device: what is in the folder and how to feed it, from the manifest."""
    info = manifest.build
    lines = [f"# effx bundle: {manifest.family}, {manifest.spec['attention']['kind']} attention, "
             f"{info.target} ({info.backend}, {info.precision})", ""]
    if info.backend == "tensorrt" and info.engine_built:
        lines += [f"TensorRT {info.tensorrt_version} engines for sm_{info.sm}: they load only with that TensorRT "
                  "version on that GPU architecture.", "",
                  "Run: `effx_run .` (runtimes/cpp; see its README), or `effx validate .` with Python.", ""]
    elif info.backend == "tensorrt":
        lines += [f"A device build kit (no engine yet: {info.reason}). See README.device.md.", ""]
    else:
        opts = {k: v for k, v in info.session_options.items() if k != "optimized_graphs"}
        lines += ["ONNX Runtime graphs (the effx custom nodes carry standard-ONNX function bodies, so stock ONNX "
                  f"Runtime runs them). Session options: `{opts}`; `<graph>.ort.onnx` is the pre-optimised graph "
                  "for the C/C++ API.", "", "Check it against PyTorch: `effx validate .`", ""]
    lines += ["## Graphs", ""]
    for g in info.graphs.values():
        lines.append(f"- `{g.file}` ({g.role}): inputs " + ", ".join(f"`{t.name}` {t.dtype}{t.shape}" for t in g.inputs[:6])
                     + (" ..." if len(g.inputs) > 6 else "") + "; outputs "
                     + ", ".join(f"`{t.name}`" for t in g.outputs[:4]) + (" ..." if len(g.outputs) > 4 else ""))
        if g.dims:
            lines.append("  dims: " + ", ".join(f"{d} {r.min}..{r.max} (opt {r.opt})" for d, r in g.dims.items()))
    if manifest.kv_cache is not None:
        plan = manifest.kv_cache
        lines += ["", f"## KV cache: {plan.layout}", ""] + [f"{i}. {step}" for i, step in enumerate(plan.protocol, 1)]
    lines += ["", "Every file's sha256 is in manifest.json (`files`)."]
    return "\n".join(lines) + "\n"
