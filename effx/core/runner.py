"""The runner contract every backend follows (as in Polygraphy): a context manager that loads its artifact
on entry and frees it on exit; `infer(feed, graph)` takes and returns numpy arrays by tensor name and
records its own wall time per graph.

The implementations live with what they run: `effx.check.reference.TorchRunner` (the PyTorch reference),
`effx.targets.ort.OrtRunner` (ONNX Runtime), `effx.targets.tensorrt.TrtRunner` (TensorRT engines);
`effx.targets.api.open_runner` picks the one a build folder needs. Decoders are driven through any runner
by `effx.core.protocol`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]


class Runner:
    """Base: timing and the context-manager protocol. Subclasses implement `_load`, `_infer`, `_free`."""

    name = "runner"

    def __init__(self) -> None:
        self.timings_ms: dict[str, list[float]] = defaultdict(list)
        self._active = False

    def __enter__(self) -> Runner:
        self._load()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        self._free()

    @property
    def graphs(self) -> list[str]:
        raise NotImplementedError

    def output_names(self, graph: str) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, Any]:
        """What a report should record about this runner (providers, threads, library versions)."""
        return {}

    def infer(self, feed: Feed, graph: str | None = None) -> dict[str, np.ndarray]:
        if not self._active:
            raise RuntimeError(f"{self.name}: use the runner inside a `with` block")
        graph = graph or self.graphs[0]
        t0 = time.perf_counter()
        out = self._infer(feed, graph)
        self.timings_ms[graph].append((time.perf_counter() - t0) * 1e3)
        return out

    def _load(self) -> None:
        pass

    def _free(self) -> None:
        pass

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        raise NotImplementedError
