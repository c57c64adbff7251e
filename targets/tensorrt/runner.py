"""The TensorRT runner: the engines of a build folder, with I/O in torch CUDA tensors (TensorRT 10/11
name-based API: set_input_shape, set_tensor_address, execute_async_v3). Needs tensorrt and a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from effx.core.errors import ArtifactError
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
        register_plugins()
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
                t = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
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
        return {n: outputs[n].float().cpu().numpy() for n in self.output_names(graph)}


def _torch_dtype(trt_dtype: Any):
    return {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
            "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}[str(trt_dtype).split(".")[-1]]
