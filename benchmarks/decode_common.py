"""Shared by the decode benchmarks (hybrid_decode.py, hourglass_decode.py): build a model for the `cpu`
target and time what a host does with it (effx.core.protocol.DecodeDriver): prefill, context filled in
chunks through the decode graph, then single-token decode steps."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np

from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver
from effx.exporter import export_model
from effx.targets.api import build
from effx.targets.ort import OrtRunner


def in_fresh_process(target, *args):
    """target(*args, queue) in a spawned process (allocators keep what they once grew, and VmHWM starts anew);
    returns what it put on the queue."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def export_for_cpu(model, work: Path) -> Path:
    export_model(model, work / "onnx")
    build(work / "onnx", target="cpu", out_dir=work / "cpu")
    return work / "cpu"


def prefill_ms(folder: Path, n: int, threads: int, repeats: int = 3, seed: int = 0) -> float:
    """Median wall time of the prefill graph on n tokens (batch 1)."""
    manifest = Manifest.read(folder)
    ids = np.random.default_rng(seed).integers(0, manifest.spec["model"]["vocab_size"], (1, n), dtype=np.int64)
    with OrtRunner(folder, manifest, threads=threads) as runner:
        times = []
        for _ in range(repeats + 1):
            driver = DecodeDriver(manifest, 1, n)
            t0 = time.perf_counter()
            driver.prefill(runner.infer, ids)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]) * 1e3)


def decode_at(
    folder: Path, contexts: list[int], steps: int, threads: int, chunk: int = 512, seed: int = 0,
    in_place: bool = True,
) -> list[dict]:
    """Decode tokens/s and cache bytes after filling each context length (batch 1). Each context gets a host
    sized for it, as a server sizes a request: contiguous buffers of context + steps slots; ring buffers of
    window + chunk - 1 slots while the context is filled in chunks, then exactly the window for one token per
    step (DecodeDriver.set_chunk)."""
    manifest = Manifest.read(folder)
    vocab = manifest.spec["model"]["vocab_size"]
    rows = []
    with OrtRunner(folder, manifest, threads=threads, in_place=in_place) as runner:
        for ctx in contexts:
            total = ctx + steps + 1
            ids = np.random.default_rng(seed).integers(0, vocab, (1, total), dtype=np.int64)
            driver = DecodeDriver(manifest, 1, total, chunk=chunk)
            driver.prefill(runner.infer, ids[:, :chunk])
            while driver.position < ctx:
                n = min(chunk, ctx - driver.position)
                driver.step(runner.infer, ids[:, driver.position : driver.position + n])
            driver.set_chunk(1)
            cache_bytes = int(sum(a.nbytes for a in driver.cache.values()))
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                driver.step(runner.infer, ids[:, driver.position : driver.position + 1])
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "context": ctx,
                    "cache_bytes": cache_bytes,
                    "decode_tokens_per_s": steps / sum(times),
                    "step_p50_ms": float(np.percentile(times, 50) * 1e3),
                }
            )
            print(
                f"  context {ctx}: cache {cache_bytes / 2**20:.1f} MiB, {rows[-1]['decode_tokens_per_s']:.1f} tok/s",
                flush=True,
            )
    return rows
