"""A Triton Inference Server model repository from a build folder (`effx bundle BUILD --format triton`).

One Triton model per graph: `<name>_<graph>/config.pbtxt` + `<name>_<graph>/1/model.onnx` (ONNX Runtime
backend, `onnxruntime_onnx`) or `1/model.plan` (TensorRT backend, `tensorrt_plan`). Batch is an explicit
dimension of every effx graph, so `max_batch_size: 0` and the dims come from the manifest (-1 where
symbolic). Decoders are two models (prefill, decode): the client carries the cache between calls as the
manifest's protocol says (README.md of the repository); effx does not generate Triton ensembles.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from effx.core.atomic import atomic_dir
from effx.core.errors import ArtifactError
from effx.core.manifest import Manifest

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "int8": "TYPE_INT8"}


def _tensor(t) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape)
    return f'  {{\n    name: "{t.name}"\n    data_type: {_TYPES[t.dtype]}\n    dims: [ {dims} ]\n  }}'


def config_pbtxt(model_name: str, platform: str, graph) -> str:
    sep = ",\n"
    inputs, outputs = sep.join(_tensor(t) for t in graph.inputs), sep.join(_tensor(t) for t in graph.outputs)
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    return (f'name: "{model_name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"instance_group [ {{ count: 1, kind: {kind} }} ]\n")


def write_triton_repo(build_dir: str | Path, out: str | Path, name: str = "effx", overwrite: bool = False) -> list[str]:
    """Write the repository; returns the Triton model names."""
    src = Path(build_dir)
    manifest = Manifest.read(src)
    info = manifest.build
    if info is None or not info.engine_built:
        raise ArtifactError(f"{src}: not a built bundle (an export or a device kit); `effx build` it first, on the "
                            "device for TensorRT targets")
    manifest.verify_files(src)
    platform = "tensorrt_plan" if info.backend == "tensorrt" else "onnxruntime_onnx"
    names = []
    with atomic_dir(Path(out), "bundle", overwrite=overwrite) as tmp:
        for graph, g in info.graphs.items():
            model_name = f"{name}_{graph}"
            version = tmp / model_name / "1"
            version.mkdir(parents=True)
            if platform == "tensorrt_plan":
                shutil.copyfile(src / g.file, version / "model.plan")
            else:
                shutil.copyfile(src / g.file, version / "model.onnx")
                data = (src / g.file).with_suffix(".onnx.data")
                if data.exists():  # external weights keep the file name the graph refers to
                    shutil.copyfile(data, version / data.name)
            (tmp / model_name / "config.pbtxt").write_text(config_pbtxt(model_name, platform, g))
            names.append(model_name)
        lines = [f"# Triton model repository from {src.name} ({info.target}, {info.backend}, {info.precision})", "",
                 f"`tritonserver --model-repository {Path(out).name}`; models: " + ", ".join(names) + "."]
        if manifest.kv_cache is not None:
            lines += ["", "Decoder: call the prefill model once, then the decode model per token, feeding each "
                      "`present.*` output back as `past.*`:", ""]
            lines += [f"{i}. {step}" for i, step in enumerate(manifest.kv_cache.protocol, 1)]
        (tmp / "README.md").write_text("\n".join(lines) + "\n")
    return names
