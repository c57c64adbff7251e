"""Timing and memory measurement shared by validate and bench: latency percentiles, peak resident memory
(sampled), and the environment a measurement ran in."""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

import effx
from effx.check.report import Latency
from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver
from effx.core.runner import Feed, Runner


class PeakRss:
    """Peak resident memory growth while the block runs, sampled every 2 ms (ORT and TensorRT allocate
    outside Python, so tracemalloc cannot see them). Allocators keep freed memory, so this reads high when
    an earlier stage already grew the process: compare runners measured in the same order."""

    method = "sampled RSS growth (/proc/self/statm)"

    def __init__(self) -> None:
        self.peak_mb: float | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None

    def __enter__(self) -> PeakRss:
        self._base = self._rss()
        self._peak = self._base or 0
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, self._rss() or 0)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._base is not None:
            self._peak = max(self._peak, self._rss() or 0)
            self.peak_mb = (self._peak - self._base) / 2**20


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def time_graph(runner: Runner, feed: Feed, graph: str, warmup: int, iters: int) -> list[float]:
    """Wall times (ms) of `iters` runs of one graph after `warmup` untimed ones."""
    for _ in range(warmup):
        runner.infer(feed, graph)
    start = len(runner.timings_ms[graph])
    for _ in range(iters):
        runner.infer(feed, graph)
    return runner.timings_ms[graph][start:]


def _latency(runner: Runner, graph: str, batch: int, seq: int, tokens: int, ms: list[float], warmup: int,
             iters: int) -> Latency:
    p = percentiles(ms)
    return Latency(runner=runner.name, graph=graph, batch=batch, seq=seq, warmup=warmup, iters=iters, **p,
                   throughput=tokens / (p["mean_ms"] / 1e3), unit="tokens/s")


def measure(runner: Runner, manifest: Manifest, feed: Feed, warmup: int, iters: int,
            samples: dict[str, list[float]]) -> list[Latency]:
    """Latency of the runner's graphs on one case: the encoder forward, or a prefill of all but the last
    token and one decode step after it, in the graph the host protocol picks for that step (an hourglass's
    decode_fine where the token completes no group; then the general decode graph is timed on the same step
    too, as the cost of a step that does). `samples` gets the raw times by "runner graph"."""
    ids = feed["input_ids"]
    batch, seq = ids.shape
    if manifest.family == "encoder" or "decode" not in runner.graphs:
        graph = runner.graphs[0]
        ms = time_graph(runner, feed, graph, warmup, iters)
        samples[f"{runner.name} {graph}"] = ms
        return [_latency(runner, graph, batch, seq, batch * seq, ms, warmup, iters)]
    driver = DecodeDriver(manifest, batch, seq)
    prefill = driver.prefill_feed(ids[:, :-1])
    ms = time_graph(runner, prefill, "prefill", warmup, iters)
    samples[f"{runner.name} prefill"] = ms
    out = [_latency(runner, "prefill", batch, seq - 1, batch * (seq - 1), ms, warmup, iters)]
    driver.advance(runner.infer(prefill, "prefill"), seq - 1)
    step = driver.step_feed(ids[:, -1:])
    for graph in dict.fromkeys([driver.graph_for(1), "decode"]):
        ms = time_graph(runner, step, graph, warmup, iters)
        samples[f"{runner.name} {graph}"] = ms
        out.append(_latency(runner, graph, batch, 1, batch, ms, warmup, iters))
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(*runners: Runner) -> dict[str, Any]:
    """Machine, versions and what each runner reports about itself."""
    env: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
                           "cpu_count": os.cpu_count(), "python": platform.python_version(),
                           "effx": effx.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for runner in runners:
        env |= runner.environment()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env
