"""The TensorRT runner: the engines of a build folder, with I/O in torch CUDA tensors (TensorRT 10/11
name-based API: set_input_shape, set_tensor_address, execute_async_v3). Needs tensorrt and a GPU.

Feeds are converted to each binding's dtype explicitly (`feed_as`): a float feed into a half binding is
rounded on purpose, an int64 feed into an int32 binding is range-checked, anything else is refused with one
line; nothing is reinterpreted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from effx.core.errors import ArtifactError, SpecError
from effx.core.lazy import lazy_import
from effx.core.manifest import Manifest
from effx.core.runner import Feed, Runner
from effx.targets.tensorrt.plugins import register_plugins


class TrtRunner(Runner):
    """TensorRT engines of a build folder, with I/O in torch CUDA tensors (TensorRT 10/11 name-based API:
    set_input_shape, set_tensor_address, execute_async_v3)."""

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)
        info = self.manifest.build
        if info is None or info.backend != "tensorrt" or not info.engine_built:
            raise ArtifactError(f"{self.folder}: no TensorRT engines here (a device kit? build it on the device)")
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}

    @property
    def graphs(self) -> list[str]:
        return list(self.manifest.build.graphs)

    def output_names(self, graph: str) -> list[str]:
        return [t.name for t in self.manifest.build.graphs[graph].outputs]

    def _load(self) -> None:
        trt = lazy_import("tensorrt", extra="tensorrt", purpose="running TensorRT engines")
        # AOT plugin engines carry their kernels; registering the plugins the build used (and only those)
        # keeps JIT-built engines loadable too. A failure here is a note: the engine says if it needs them.
        used = [p["op"] for p in self.manifest.build.plugins if p.get("route") == "plugin"]
        self.plugin_notes = register_plugins(ops=used).notes if used else []
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        for name, g in self.manifest.build.graphs.items():
            engine = runtime.deserialize_cuda_engine((self.folder / g.file).read_bytes())
            if engine is None:
                raise ArtifactError(f"{self.folder / g.file}: TensorRT could not deserialize the engine "
                                    f"(built with TensorRT {self.manifest.build.tensorrt_version}, sm_{self.manifest.build.sm})")
            self._engines[name] = engine
            self._contexts[name] = engine.create_execution_context()

    def _free(self) -> None:
        self._contexts, self._engines = {}, {}

    def environment(self) -> dict[str, Any]:
        return {"tensorrt": getattr(self, "_trt", None) and self._trt.__version__}

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        trt = self._trt
        engine, ctx = self._engines[graph], self._contexts[graph]
        keep: list[torch.Tensor] = []
        outputs: dict[str, torch.Tensor] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if name not in feed:
                    raise SpecError(f"{graph}: the engine's input {name!r} is not in the feed ({', '.join(sorted(feed))})")
                binding = _dtype_name(engine.get_tensor_dtype(name))
                t = torch.from_numpy(np.ascontiguousarray(feed_as(name, np.asarray(feed[name]), binding))).cuda()
                if binding == "BF16":  # numpy has no bfloat16: staged as float32, converted on the GPU
                    t = t.to(torch.bfloat16)
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = _torch_dtype(engine.get_tensor_dtype(name))
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
                ctx.set_tensor_address(name, t.data_ptr())
                outputs[name] = t
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed on {graph}")
        stream.synchronize()
        # floats come back as float32 (the comparators' dtype); integers and booleans keep their values
        return {n: (outputs[n].float() if outputs[n].is_floating_point() else outputs[n]).cpu().numpy()
                for n in self.output_names(graph)}


_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
          "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
_NUMPY = {"FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16), "INT64": np.dtype(np.int64),
          "INT32": np.dtype(np.int32), "BOOL": np.dtype(np.bool_), "INT8": np.dtype(np.int8), "UINT8": np.dtype(np.uint8)}


def _dtype_name(trt_dtype: Any) -> str:
    return str(trt_dtype).split(".")[-1]


def _torch_dtype(trt_dtype: Any):
    name = _dtype_name(trt_dtype)
    if name not in _TORCH:
        raise ArtifactError(f"engine tensor type {name} is not one effx binds (float, half, bf16, int64, int32, bool)")
    return _TORCH[name]


def feed_as(name: str, array: np.ndarray, binding: str) -> np.ndarray:
    """`array` in the host dtype of a binding of TensorRT type `binding` ("FLOAT", "HALF", "BF16", "INT32", ...),
    converted explicitly: floats to narrower floats (rounding, on purpose: the engine computes in them),
    integers to narrower integers only when every value fits, bool to bool. Anything else is refused."""
    if binding == "BF16":
        if array.dtype.kind != "f":
            raise SpecError(f"input {name!r}: the engine takes bf16, the feed is {array.dtype}; feed floats")
        return array.astype(np.float32, copy=False)
    want = _NUMPY.get(binding)
    if want is None:
        raise SpecError(f"input {name!r}: the engine binds TensorRT type {binding}, which effx does not feed")
    have = array.dtype
    if have == want:
        return array
    if have.kind == "f" and want.kind == "f":
        return array.astype(want)
    if have.kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise SpecError(f"input {name!r}: values {array.min()}..{array.max()} do not fit the engine's {binding}")
        return array.astype(want)
    if have.kind == "b" and want.kind == "b":
        return array
    raise SpecError(f"input {name!r}: the feed is {have}, the engine binds {binding}; convert the feed "
                    f"(effx does not reinterpret {have} as {binding})")
