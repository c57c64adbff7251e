"""The README.md every build folder carries for the device: what is in the folder and how to feed it,
generated from its manifest."""

from __future__ import annotations

from effx.core.manifest import Manifest


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
