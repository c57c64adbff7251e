"""`effx bench`: latency and peak memory of attention kinds x sequence lengths (x batch) on one target,
with ratios against full attention measured in the same run, in the shape of the Linformer paper's table.

Each kind is exported once (max_seq_len = the longest n; every graph takes any n up to it) and built for
the target in a temporary folder. Each cell (kind, n, batch) then runs in its own process under an
address-space limit (RLIMIT_AS), so a cell that runs out of memory is recorded as OOM instead of taking the
sweep down, and its peak memory is its own. Results are written to bench.json after every cell; a rerun
with the same settings skips finished cells (resumable). Plots: latency and memory against n, log-log.

Peak memory is the growth of the cell process's resident set from just before the first inference to its
peak (sampled): the activations (attention scores, projections) rather than the runtime's code and weights.
It is measured twice, each cell in its own process: with ONNX Runtime's CPU memory arena (the default
session, `peak_mb`; latency is timed there) and without it (`peak_mb_no_arena`, one untimed run: memory
peaks in the first). The arena rounds requests up and keeps freed blocks for reuse, so with it ratios
partly measure the allocator; without it they measure what the graph's tensors need.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

import effx
from effx.check.measure import PeakRss, cpu_name, percentiles
from effx.core.atomic import check_output_dir, write_marker
from effx.core.errors import ArtifactError, SpecError
from effx.core.lazy import has_module, lazy_import
from effx.core.manifest import Manifest
from effx.core.spec import RunSpec
from effx.exporter import export_model
from effx.models import build_model
from effx.targets.api import build, open_runner
from effx.targets.precision import check_request
from effx.targets.profiles import get_target

BENCH_SCHEMA_VERSION = 1
# the Linformer paper's settings where a kind has a length parameter; others take the spec defaults
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "linformer": {"k": 128}, "local": {"window": 256}, "block_sparse": {"block_size": 64},
    "linear": {"feature_map": "elu"},
}
OOM_MARKERS = ("MemoryError", "bad_alloc", "Failed to allocate memory", "failed to allocate", "Cannot allocate memory",
               "out of memory")
Say = Callable[[str], None]


def parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """`KIND.FIELD=VALUE` items (e.g. linformer.k=256) -> {kind: {field: value}}; values are JSON or strings."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        kind, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SpecError(f"--param {item!r}: expected KIND.FIELD=VALUE, e.g. --param linformer.k=256")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(kind, {})[name] = value
    return out


def cell_spec(kind: str, params: dict[str, Any], max_n: int, d_model: int, heads: int, layers: int) -> dict:
    return {"model": {"family": "encoder", "d_model": d_model, "n_heads": heads, "n_layers": layers,
                      "d_ff": 4 * d_model, "max_seq_len": max_n, "vocab_size": 1000},
            "attention": {"kind": kind} | params}


def _label(kind: str, params: dict[str, Any]) -> str:
    return kind + "".join(f" {k}={v}" for k, v in params.items())


def bench(kinds: list[str], seqs: list[int], batches: list[int] | None = None, target: str = "cpu",
          precision: str = "fp32", d_model: int = 512, heads: int = 8, layers: int = 1,
          params: dict[str, dict[str, Any]] | None = None, output: str | Path = "bench",
          mem_limit_mb: int | None = None, warmup: int = 1, iters: int = 5, threads: int = 0,
          fresh: bool = False, plots: bool = True, progress: Say | None = None,
          on_cell: Callable[[int, int], None] | None = None, cell_runner: Callable[..., dict] | None = None) -> dict:
    """Run the sweep; returns the results dict also written to `output`/bench.json. `progress` gets what is
    being done, `on_cell(done, total)` the count of cells to run in this call (for a progress bar).
    `cell_runner` (run_cell's arguments and result) runs a cell elsewhere: a Ray node for `effx bench --ray`."""
    run_one = cell_runner or run_cell
    say = progress or (lambda _m: None)
    profile = get_target(target)
    check_request(profile, precision)
    if profile.backend != "ort":
        raise SpecError(f"--target {target}: effx bench runs ONNX Runtime targets on this machine (cpu); TensorRT "
                        "targets are benchmarked on the device with trtexec from the build kit")
    batches = batches or [1]
    params = {k: DEFAULT_PARAMS.get(k, {}) | (params or {}).get(k, {}) for k in kinds}
    max_n = max(seqs)
    specs = {k: RunSpec.parse(cell_spec(k, params[k], max_n, d_model, heads, layers)) for k in kinds}  # check early
    mem_limit_mb = mem_limit_mb or _default_limit_mb()
    config = {"target": target, "precision": precision, "d_model": d_model, "heads": heads, "layers": layers,
              "family": "encoder", "params": params, "warmup": warmup, "iters": iters, "threads": threads,
              "mem_limit_mb": mem_limit_mb, "memory": "peak RSS growth with and without ORT's CPU arena"}
    out = Path(output)
    check_output_dir(out, "bench", overwrite=fresh, resumable=True)  # before any work
    results_path = out / "bench.json"
    results = _load_previous(results_path, config, fresh)
    out.mkdir(parents=True, exist_ok=True)
    done = {(c["kind"], c["seq"], c["batch"]) for c in results["cells"]}
    todo = [(k, n, b) for k in kinds for n in seqs for b in batches if (k, n, b) not in done]
    tick = on_cell or (lambda _done, _total: None)
    tick(0, len(todo))
    if todo:
        with tempfile.TemporaryDirectory(prefix="effx-bench-") as work:
            built: dict[str, Path] = {}
            for i, (kind, n, b) in enumerate(todo, 1):
                if kind not in built:
                    say(f"export + build {kind} (max n {max_n})")
                    built[kind] = _build(specs[kind], Path(work) / kind, target, precision)
                say(f"[{i}/{len(todo)}] {kind} n={n} batch={b}")
                cell = run_one(built[kind], n, b, warmup, iters, threads, mem_limit_mb)
                results["cells"].append({"kind": kind, "label": _label(kind, params[kind]), "seq": n, "batch": b}
                                        | cell)
                results["ratios"] = ratios(results["cells"])
                _write_json(results_path, results)
                tick(i, len(todo))
    results["ratios"] = ratios(results["cells"])
    if plots:
        if has_module("matplotlib"):
            say("plots")
            results["plots"] = write_plots(results, out)
        else:
            results["plots"] = []
            results["note"] = "plots skipped: pip install 'effx[plot]'"
    _write_json(results_path, results)
    return results


def _default_limit_mb() -> int:
    """Three quarters of physical memory: leaves the machine usable when a cell explodes."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75 / 2**20)
    except (ValueError, OSError, AttributeError):
        return 8192


def _load_previous(path: Path, config: dict, fresh: bool) -> dict:
    if path.is_file() and not fresh:
        try:
            previous = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc}); pass --fresh to start over or choose another -o") \
                from None
        if not isinstance(previous, dict) or not isinstance(previous.get("cells"), list):
            raise ArtifactError(f"{path}: not an effx bench.json (no cells); pass --fresh or choose another -o")
        if previous.get("schema_version") == BENCH_SCHEMA_VERSION and previous.get("config") == config:
            return previous
        raise SpecError(f"{path} holds a sweep with other settings; pass --fresh to start over or choose another -o")
    return {"schema_version": BENCH_SCHEMA_VERSION, "tool": "effx bench", "config": config,
            "environment": _environment(), "cells": [], "ratios": []}


def _write_json(path: Path, data: dict) -> None:
    """Write atomically, then mark the folder as this sweep's (listing what is in it now)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    write_marker(path.parent, "bench")


def _build(spec, folder: Path, target: str, precision: str) -> Path:
    export_model(build_model(spec), folder / "onnx")
    build(folder / "onnx", target, precision, out_dir=folder / "build")
    return folder / "build"


def run_cell(build_dir: Path, n: int, batch: int, warmup: int, iters: int, threads: int,
             mem_limit_mb: int, timeout_s: float = 3600) -> dict:
    """One cell: timed in a child process with ONNX Runtime's CPU arena (the default session), then its
    memory once more in another child without the arena (`peak_mb_no_arena`)."""
    cell = _run_child(build_dir, n, batch, warmup, iters, threads, mem_limit_mb, timeout_s, arena=True)
    if cell["status"] == "ok":
        bare = _run_child(build_dir, n, batch, 0, 1, threads, mem_limit_mb, timeout_s, arena=False)
        cell["peak_mb_no_arena"] = bare["peak_mb"] if bare["status"] == "ok" else bare["status"]
    return cell


def _run_child(build_dir: Path, n: int, batch: int, warmup: int, iters: int, threads: int,
               mem_limit_mb: int, timeout_s: float, arena: bool) -> dict:
    """One run in a child process under RLIMIT_AS; OOM and crashes become records, not exceptions."""
    limit = int(mem_limit_mb) * 2**20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    args = json.dumps({"build": str(build_dir), "n": n, "batch": batch, "warmup": warmup, "iters": iters,
                       "threads": threads, "arena": arena})
    try:
        proc = subprocess.run([sys.executable, "-m", "effx.check.bench", "cell", args], capture_output=True, text=True,
                              preexec_fn=cap, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "detail": f"over {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return {"status": "ok"} | json.loads(lines[-1])
    text = proc.stderr + proc.stdout
    if proc.returncode in (-9, 137) or any(m in text for m in OOM_MARKERS):
        return {"status": "oom", "detail": f"over the {mem_limit_mb} MB limit"}
    last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), f"exit code {proc.returncode}")
    return {"status": "error", "detail": last[-300:]}


def _cell_main(args: dict) -> None:
    """Child side: load the build, run warm-up + timed inferences at (batch, n), print one JSON line."""
    folder = Path(args["build"])
    manifest = Manifest.read(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, manifest.spec["model"]["vocab_size"], (args["batch"], args["n"]), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    with open_runner(folder, manifest, threads=args["threads"], arena=args.get("arena", True)) as runner:
        with PeakRss() as mem:
            for _ in range(args["warmup"] + args["iters"]):
                runner.infer(feed)
        times = runner.timings_ms[runner.graphs[0]][args["warmup"]:]
    p = percentiles(times)
    print(json.dumps(p | {"peak_mb": mem.peak_mb, "tokens_per_s": args["batch"] * args["n"] / (p["mean_ms"] / 1e3),
                          "max_rss_mb": _max_rss_mb(), "vm_peak_mb": _vm_peak_mb()}))


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _vm_peak_mb() -> float | None:
    """Peak virtual size: what RLIMIT_AS (--mem-limit-mb) caps."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def ratios(cells: list[dict]) -> list[dict]:
    """Per (n, batch), each kind's speed-up and memory saving against full attention (full / kind)."""
    full = {(c["seq"], c["batch"]): c for c in cells if c["kind"] == "full"}
    out = []
    for c in cells:
        f = full.get((c["seq"], c["batch"]))
        if c["kind"] == "full" or f is None:
            continue
        row = {"kind": c["kind"], "seq": c["seq"], "batch": c["batch"]}
        if c["status"] == "ok" and f["status"] == "ok":
            row["speedup"] = f["p50_ms"] / c["p50_ms"]
            row["memory_saving"] = (f["peak_mb"] / c["peak_mb"]) if c.get("peak_mb") and f.get("peak_mb") else None
            bare, full_bare = c.get("peak_mb_no_arena"), f.get("peak_mb_no_arena")
            if bare is not None or full_bare is not None:  # sweeps recorded before arena-off runs lack them
                row["memory_saving_no_arena"] = full_bare / bare if _positive(bare) and _positive(full_bare) else None
        elif c["status"] == "ok" and f["status"] == "oom":
            row["speedup"] = row["memory_saving"] = "full OOM"
        else:
            row["speedup"] = row["memory_saving"] = c["status"]
        out.append(row)
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


def table_markdown(results: dict) -> str:
    """Latency / memory per kind and n with the ratios against full, as a markdown table."""
    cells = results["cells"]
    seqs = sorted({c["seq"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    kinds = list(dict.fromkeys(c["label"] for c in cells))
    by = {(c["label"], c["seq"], c["batch"]): c for c in cells}
    full_label = next((c["label"] for c in cells if c["kind"] == "full"), None)
    head = "| attention | " + " | ".join(f"n={_n(n)}" + (f" b={b}" if len(batches) > 1 else "") for b in batches
                                         for n in seqs) + " |"
    lines = [head, "|---" * (1 + len(seqs) * len(batches)) + "|"]
    for label in kinds:
        row = []
        for b in batches:
            for n in seqs:
                c = by.get((label, n, b))
                f = by.get((full_label, n, b)) if full_label else None
                row.append(_cell_text(c, f, label == full_label))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _n(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cell_text(c: dict | None, f: dict | None, is_full: bool) -> str:
    if c is None:
        return "-"
    if c["status"] != "ok":
        return c["status"].upper()
    bare = c.get("peak_mb_no_arena")
    text = f"{c['p50_ms']:.1f} ms, {c['peak_mb']:.0f} MB"
    if bare is not None:
        text += f" (no arena {bare:.0f} MB)" if isinstance(bare, (int, float)) else f" (no arena {bare.upper()})"
    if not is_full and f is not None:
        if f["status"] == "ok":
            saving = f["peak_mb"] / c["peak_mb"] if c["peak_mb"] and f["peak_mb"] else float("nan")
            text += f" ({f['p50_ms'] / c['p50_ms']:.1f}x / {saving:.1f}x"
            full_bare = f.get("peak_mb_no_arena")
            if _positive(bare) and _positive(full_bare):
                text += f", no arena {full_bare / bare:.1f}x"
            text += ")"
        else:
            text += f" (full {f['status'].upper()})"
    return text


def write_plots(results: dict, out: Path) -> list[str]:
    matplotlib = lazy_import("matplotlib", extra="plot", purpose="bench plots")
    matplotlib.use("Agg")
    plt = lazy_import("matplotlib.pyplot", extra="plot", purpose="bench plots")

    cells = results["cells"]
    written = []
    for key, ylabel, name in (("p50_ms", "latency p50 (ms)", "bench_latency.png"),
                              ("peak_mb", "peak memory growth (MB)", "bench_memory.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in sorted({c["batch"] for c in cells}):
            for label in dict.fromkeys(c["label"] for c in cells):
                pts = sorted((c["seq"], c) for c in cells if c["label"] == label and c["batch"] == b)
                ok = [(n, c[key]) for n, c in pts if c["status"] == "ok" and c.get(key)]
                suffix = f" (batch {b})" if len({c['batch'] for c in cells}) > 1 else ""
                if ok:
                    line, = ax.plot(*zip(*ok, strict=True), marker="o", label=label + suffix)
                    bare = [(n, c["peak_mb_no_arena"]) for n, c in pts if _positive(c.get("peak_mb_no_arena"))]
                    if key == "peak_mb" and bare:  # dashed: the same cells without ONNX Runtime's CPU arena
                        ax.plot(*zip(*bare, strict=True), marker=".", linestyle="--", color=line.get_color(),
                                label=f"{label}{suffix}, no arena")
                    bad = [n for n, c in pts if c["status"] != "ok"]
                    if bad:
                        top = max(v for _, v in ok)
                        ax.scatter(bad, [top * 2] * len(bad), marker="x", s=60, color=line.get_color())
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=ylabel,
               title=f"{ylabel.split(' (')[0]} vs n ({results['config']['target']}; x = OOM)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def _environment() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "effx": effx.__version__, "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":  # python -m effx.check.bench cell '{...}': one cell, in its own process
    if len(sys.argv) == 3 and sys.argv[1] == "cell":
        _cell_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: effx bench ... (python -m effx.check.bench cell JSON is internal)")
