"""The ONNX Runtime runner: sessions over the graphs of an onnx/ or build/ folder (the files its manifest
lists), on the CPU or, with onnxruntime-gpu, the CUDA execution provider.

On the CPU a graph's `aliases` (a cache buffer written by a ScatterND that is its last reader) run in place:
the host's numpy buffer is wrapped without a copy (OrtValue.ortvalue_from_numpy), bound as the input and as
the aliased output (IOBinding), and handed back updated: no cache copy in the step, none into the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from effx.core.errors import CapabilityError, SpecError
from effx.core.manifest import Manifest
from effx.core.runner import Feed, Runner


def ort_providers(preferred: str | None = None) -> list[str]:
    if preferred not in (None, "cpu", "cuda"):
        raise SpecError(f"--provider {preferred}: ONNX Runtime runners take cpu or cuda (TensorRT builds run as engines)")
    if preferred == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CapabilityError("ONNX Runtime has no CUDAExecutionProvider here; pip install 'effx[gpu]' "
                                  "(onnxruntime-gpu) on a CUDA machine, or validate on the CPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner(Runner):
    """ONNX Runtime sessions over the graphs of an onnx/ or build/ folder. `extra_outputs` exposes named
    intermediate tensors of a graph as outputs (the bisection's probes)."""

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest | None = None, provider: str | None = None,
                 threads: int = 0, extra_outputs: dict[str, list[str]] | None = None, in_place: bool = True,
                 arena: bool = True):
        super().__init__()
        self.arena = arena  # ORT's CPU memory arena; off, peak memory reflects the graph, not the allocator
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)
        self.providers = ort_providers(provider)
        self.threads = threads
        self.extra_outputs = extra_outputs or {}
        self._sessions: dict[str, Any] = {}
        files = self.manifest.build.graphs if self.manifest.build else self.manifest.graphs
        self._files = {name: self.folder / g.file for name, g in files.items()}
        # in place on the CPU only: CUDA buffers would need device OrtValues the numpy protocol does not carry
        cpu = self.providers == ["CPUExecutionProvider"]
        self.aliases = {name: dict(g.aliases) for name, g in files.items() if in_place and cpu and g.aliases}

    @property
    def graphs(self) -> list[str]:
        return list(self._files)

    def graph_path(self, graph: str) -> Path:
        return self._files[graph]

    def output_names(self, graph: str) -> list[str]:
        return [o.name for o in self._sessions[graph].get_outputs()]

    def environment(self) -> dict[str, Any]:
        return {"ort_providers": self.providers, "ort_intra_op_threads": self.threads or "default (physical cores)",
                "cache_updates": "in place (IOBinding)" if self.aliases else "copied (outputs fed back)",
                "ort_cpu_mem_arena": self.arena}

    def _load(self) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = self.arena
        for name, path in self._files.items():
            extra = self.extra_outputs.get(name)
            source: str | bytes = str(path) if not extra else with_outputs(path, extra)
            self._sessions[name] = ort.InferenceSession(source, opts, providers=self.providers)

    def _free(self) -> None:
        self._sessions = {}

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        sess = self._sessions[graph]
        names = [i.name for i in sess.get_inputs()]
        if graph in self.aliases:
            return self._infer_in_place(sess, {n: feed[n] for n in names}, graph)
        out = sess.run(None, {n: feed[n] for n in names})
        return dict(zip(self.output_names(graph), out, strict=True))

    def _infer_in_place(self, sess, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        aliases = self.aliases[graph]
        io = sess.io_binding()
        shared: dict[str, tuple[Any, np.ndarray]] = {}
        targets = set(aliases.values())
        for name, arr in feed.items():
            if name in targets and _bindable(arr):
                value = ort.OrtValue.ortvalue_from_numpy(arr)  # wraps arr's memory
                io.bind_ortvalue_input(name, value)
                shared[name] = (value, arr)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(arr))
        names = self.output_names(graph)
        for name in names:
            source = aliases.get(name)
            if source in shared:
                io.bind_ortvalue_output(name, shared[source][0])
            else:
                io.bind_output(name)
        sess.run_with_iobinding(io)
        values = io.get_outputs()
        return {name: shared[aliases[name]][1] if aliases.get(name) in shared else value.numpy()
                for name, value in zip(names, values, strict=True)}


def _bindable(arr: np.ndarray) -> bool:
    """A buffer ONNX Runtime can write in place: a writable, C-contiguous numpy array that owns its memory or
    views memory that stays alive with it."""
    return isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.flags.writeable


def with_outputs(path: Path, names: list[str]) -> bytes:
    """The ONNX model at `path` with the named intermediate tensors added as graph outputs (serialised:
    weights inline, fine below protobuf's 2 GB, which is where bisection is used: the model under test)."""
    model = onnx.load(str(path))
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()
