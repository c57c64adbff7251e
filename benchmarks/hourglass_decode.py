"""Full attention against the hourglass at the same depth and width, as decoders, on the `cpu` target, in one
run: prefill latency at n tokens, decode steps at a long context, and peak memory of a whole decode at that
context (the encoder sweep is `effx bench`).

- full: 6 layers, d_model 512, 8 heads, causal, RoPE, contiguous cache;
- hourglass: the same with attention.kind = hierarchical, factors [1, 4, 16] (levels 1, 4, 16, 4, 1: 2 layers
  at full resolution, 2 at n/4, 2 at n/16), average shortening, repeat upsampling, multiscale cache;
- exported and built for `cpu` each, run by ONNX Runtime through the host protocol (DecodeDriver, which runs
  the hourglass's decode_fine graph for a token that completes no group).

Timings alternate between the two models (prefill repeats, then decode step by step at the same positions), so
load from other work on the machine falls on both alike. Decode steps of the hourglass are split by what they
run: fine (no group completes: decode_fine), and steps that complete a group of the 4x level or of both levels.
Memory: each model in a fresh process (allocators keep what they once grew), with and without ONNX Runtime's
CPU arena: what creating the sessions adds (each graph's session holds its own copy of the weights), the peak
resident memory growth over filling the context and decoding (sampled, effx.check.measure.PeakRss), and the
process's peak (VmHWM, imports included). The context is filled either as one prompt (the prefill graph on all
of it) or in chunks of 512 tokens through the decode graph.

    python benchmarks/hourglass_decode.py [--prefill 1024,4096] [--context 4096] [--steps 32] [--threads 2]

Writes benchmarks/results/hourglass_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from decode_common import export_for_cpu, in_fresh_process

from effx.check.measure import PeakRss, cpu_name, percentiles
from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver
from effx.core.spec import RunSpec
from effx.models import build_model
from effx.targets.ort import OrtRunner

RESULTS = Path(__file__).parent / "results"
KINDS = {"full": "full", "hourglass [1, 4, 16]": "hierarchical"}
CHUNK = 512  # tokens per step while a context is filled through the decode graph


def spec(kind: str, max_len: int) -> RunSpec:
    attention = {"kind": "full"} if kind == "full" else {"kind": "hierarchical", "factors": [1, 4, 16]}
    return RunSpec.parse(
        {
            "model": {
                "family": "decoder",
                "vocab_size": 4096,
                "d_model": 512,
                "n_heads": 8,
                "n_layers": 6,
                "d_ff": 2048,
                "max_seq_len": max_len,
            },
            "attention": attention,
            "kv_cache": {"layout": "contiguous" if kind == "full" else "multiscale"},
        }
    )


def tokens(manifest: Manifest, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, manifest.spec["model"]["vocab_size"], (1, n), dtype=np.int64)


def fill(driver: DecodeDriver, infer, ids: np.ndarray, context: int, chunked: bool) -> None:
    """The first `context` tokens into the cache: one prompt, or a first chunk then chunks through decode."""
    driver.prefill(infer, ids[:, :min(CHUNK, context) if chunked else context])
    while driver.position < context:
        n = min(CHUNK, context - driver.position)
        driver.step(infer, ids[:, driver.position : driver.position + n])


def node_counts(folder: Path) -> dict[str, int]:
    """Nodes of each graph of a build (ONNX Runtime runs every node of a graph on every call)."""
    manifest = Manifest.read(folder)
    graphs = manifest.build.graphs if manifest.build else manifest.graphs
    return {name: len(onnx.load(str(folder / g.file), load_external_data=False).graph.node)
            for name, g in graphs.items()}


def prefill_interleaved(folders: dict[str, Path], lengths: list[int], threads: int, repeats: int = 3) -> dict:
    """Median prefill wall time (ms) per model and length; the models take turns on each repeat."""
    times: dict[str, dict[int, list[float]]] = {kind: {n: [] for n in lengths} for kind in folders}
    runners = {kind: OrtRunner(folder, threads=threads) for kind, folder in folders.items()}
    for runner in runners.values():
        runner.__enter__()
    try:
        for n in lengths:
            for rep in range(repeats + 1):  # the first round warms up
                for kind, runner in runners.items():
                    ids = tokens(runner.manifest, n)
                    driver = DecodeDriver(runner.manifest, 1, n)
                    t0 = time.perf_counter()
                    driver.prefill(runner.infer, ids)
                    if rep:
                        times[kind][n].append((time.perf_counter() - t0) * 1e3)
            print(f"  prefill {n}: " + ", ".join(f"{k} {np.median(v[n]):.0f} ms" for k, v in times.items()), flush=True)
    finally:
        for runner in runners.values():
            runner.__exit__(None, None, None)
    return {kind: {n: float(np.median(t[n])) for n in lengths} for kind, t in times.items()}


def decode_interleaved(folders: dict[str, Path], context: int, steps: int, threads: int) -> dict:
    """Both models fill `context` tokens (in chunks), then decode `steps` tokens one at a time, alternating step
    by step. Per model: tokens/s, step percentiles, cache bytes; per step: position, graph run, wall ms."""
    total = context + steps + 1
    state = {}
    for kind, folder in folders.items():
        runner = OrtRunner(folder, threads=threads).__enter__()
        ids = tokens(runner.manifest, total)
        driver = DecodeDriver(runner.manifest, 1, total, chunk=CHUNK)
        fill(driver, runner.infer, ids, context, chunked=True)
        driver.set_chunk(1)
        state[kind] = (runner, driver, ids, [])
    try:
        for _ in range(steps):
            for runner, driver, ids, rows in state.values():
                p = driver.position
                graph = driver.graph_for(1)
                t0 = time.perf_counter()
                driver.step(runner.infer, ids[:, p : p + 1])
                rows.append({"position": p, "graph": graph, "ms": (time.perf_counter() - t0) * 1e3})
    finally:
        for runner, *_ in state.values():
            runner.__exit__(None, None, None)
    out = {}
    for kind, (_, driver, _, rows) in state.items():
        ms = [r["ms"] for r in rows]
        out[kind] = {"context": context, "steps": steps,
                     "cache_bytes": int(sum(a.nbytes for a in driver.cache.values())),
                     "decode_tokens_per_s": steps / (sum(ms) / 1e3), **percentiles(ms), "per_step": rows}
    return out


def split_steps(rows: list[dict], ratios: tuple[int, ...] = (4, 16)) -> dict:
    """An hourglass's steps by what they run: `fine` (no group completes), then the steps whose newest position
    completes a group of the 4x level only, and of the 4x and 16x levels (token p completes one when p % k == 0)."""
    groups: dict[str, list[float]] = {"fine (decode_fine)": [], "4x level (decode)": [], "4x and 16x levels (decode)": []}
    for r in rows:
        p = r["position"]
        key = ("fine (decode_fine)" if p % ratios[0] else
               "4x level (decode)" if p % ratios[1] else "4x and 16x levels (decode)")
        groups[key].append(r["ms"])
    return {k: {"steps": len(v), "mean_ms": float(np.mean(v)), "p50_ms": float(np.median(v))}
            for k, v in groups.items() if v}


def _status_mb(field: str) -> float:
    """A /proc/self/status figure in MiB: VmRSS (resident now) or VmHWM (its high-water mark, reset by exec, so a
    spawned process does not inherit its parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(folder: str, context: int, steps: int, threads: int, arena: bool, chunked: bool, queue) -> None:
    before = _status_mb("VmRSS")
    with OrtRunner(Path(folder), threads=threads, arena=arena) as runner:
        sessions = _status_mb("VmRSS") - before  # the graphs' weights, once per session
        rss = PeakRss()
        with rss:
            total = context + steps + 1
            ids = tokens(runner.manifest, total)
            driver = DecodeDriver(runner.manifest, 1, total, chunk=CHUNK if chunked else 1)
            fill(driver, runner.infer, ids, context, chunked)
            driver.set_chunk(1)
            for _ in range(steps):
                driver.step(runner.infer, ids[:, driver.position : driver.position + 1])
    queue.put({"sessions_mb": sessions, "decode_peak_growth_mb": rss.peak_mb,
               "process_peak_mb": _status_mb("VmHWM")})


def memory(folder: Path, context: int, steps: int, threads: int, arena: bool, chunked: bool) -> dict:
    """Memory of one whole decode in a fresh process: what creating the sessions adds (weights), the peak growth
    over filling the context and decoding (activations, caches, the arena), and the process's peak."""
    return in_fresh_process(_memory_child, str(folder), context, steps, threads, arena, chunked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", default="1024,4096")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(RESULTS / "hourglass_decode.json"))
    args = ap.parse_args()
    lengths = [int(n) for n in args.prefill.split(",")]
    max_len = max(max(lengths), args.context + args.steps) + 64
    results = {
        "benchmark": "hourglass_decode",
        "command": f"python benchmarks/hourglass_decode.py --prefill "
        f"{args.prefill} --context {args.context} --steps {args.steps} --threads {args.threads}",
        "environment": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_average_before": os.getloadavg(),
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory() as work:
        folders = {}
        for kind, attention in KINDS.items():
            print(f"export {kind}", flush=True)
            folders[kind] = export_for_cpu(build_model(spec(attention, max_len)), Path(work) / attention)
        prefill = prefill_interleaved(folders, lengths, args.threads)
        print(f"decode at {args.context}", flush=True)
        decode = decode_interleaved(folders, args.context, args.steps, args.threads)
        results["environment"]["load_average_after_timing"] = os.getloadavg()
        mem = {}
        for kind, folder in folders.items():
            mem[kind] = {}
            for fill_kind, chunked in (("prompt", False), ("chunks", True)):
                for arena in (True, False):
                    key = f"{fill_kind}, arena {'on' if arena else 'off'}"
                    mem[kind][key] = memory(folder, args.context, args.steps, args.threads, arena, chunked)
                    print(f"  memory {kind} {key}: {mem[kind][key]}", flush=True)
        for kind, folder in folders.items():
            row = {"graph_nodes": node_counts(folder), "prefill_ms": prefill[kind], "decode": decode[kind],
                   "memory_at_context": mem[kind]}
            if kind != "full":
                row["decode_steps_by_kind"] = split_steps(decode[kind]["per_step"])
            results["models"][kind] = row
    full, hour = results["models"].values()
    results["ratios"] = {
        "prefill_speedup": {n: full["prefill_ms"][n] / hour["prefill_ms"][n] for n in lengths},
        "decode_speedup_mean": hour["decode"]["decode_tokens_per_s"] / full["decode"]["decode_tokens_per_s"],
        "decode_speedup_p50": full["decode"]["p50_ms"] / hour["decode"]["p50_ms"],
        "decode_speedup_fine_steps": full["decode"]["mean_ms"]
        / hour["decode_steps_by_kind"]["fine (decode_fine)"]["mean_ms"],
        "cache_bytes": hour["decode"]["cache_bytes"] / full["decode"]["cache_bytes"],
        "memory": {key: {k: hour["memory_at_context"][k][key] / full["memory_at_context"][k][key]
                         for k in full["memory_at_context"]}
                   for key in ("sessions_mb", "decode_peak_growth_mb", "process_peak_mb")},
    }
    results["environment"]["load_average_after"] = os.getloadavg()
    print(json.dumps(results["ratios"], indent=2))
    for kind, row in results["models"].items():
        d = row["decode"]
        print(f"{kind}: nodes {row['graph_nodes']}, decode {d['decode_tokens_per_s']:.1f} tok/s, "
              f"p50 {d['p50_ms']:.1f} ms {row.get('decode_steps_by_kind', '')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
