"""How attention cost scales with n on this CPU: one attention layer in PyTorch eager.

d_model 512, 8 heads, batch 1 (the Linformer paper's setting is k = 128): full attention (fused SDPA and the
explicit softmax(QK^T)V), Linformer (k = 128), local (w = 256) and linear (elu) at n = 1K, 4K, 16K. Each
cell runs in its own process (so peak memory is that cell's alone, read from the process's peak RSS)
under a memory cap, and a cell that runs out of memory is recorded as OOM. Latency is the median of
repeats after one warm-up. Ratios are against full attention measured in the same run.

    python benchmarks/attention_scaling.py [--seq 1024,4096,16384] [--out benchmarks/results/attention_scaling_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

KINDS = {
    "full (SDPA)": {"kind": "full", "impl": "sdpa"},
    "full (math)": {"kind": "full", "impl": "math"},
    "linformer k=128": {"kind": "linformer", "k": 128},
    "local w=256": {"kind": "local", "window": 256},
    "linear (elu)": {"kind": "linear", "feature_map": "elu"},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_cell(label: str, n: int, repeats: int, threads: int) -> dict:
    import torch

    from effx.core.spec import RunSpec
    from effx.models.transformer import ATTENTION_CLASSES

    torch.set_num_threads(threads)
    attention = KINDS[label]
    spec = RunSpec.parse(
        {"model": {"d_model": 512, "n_heads": 8, "n_layers": 1, "max_seq_len": n, "d_ff": 2048}, "attention": attention}
    )
    torch.manual_seed(0)
    layer = ATTENTION_CLASSES[attention["kind"]](spec, 0, None).eval()
    x = torch.randn(1, n, 512)
    positions = torch.arange(n)[None]
    with torch.inference_mode():
        layer(x[:, :16], positions[:, :16], None)  # warm-up: first custom-op call imports torch._dynamo
        base = _peak_rss_mb()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x, positions, None)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": times[len(times) // 2],
        "min_ms": times[0],
        "peak_extra_mb": _peak_rss_mb() - base,
        "repeats": repeats,
    }


def _cell_in_subprocess(label: str, n: int, repeats: int, threads: int, mem_cap_gb: float) -> dict:
    here, cap = str(Path(__file__).parent), int(mem_cap_gb * 2**30)
    code = (
        f"import json, resource, sys; sys.path.insert(0, {here!r});"
        f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}));"
        "from attention_scaling import run_cell;"
        f"print('RESULT', json.dumps(run_cell({label!r}, {n}, {repeats}, {threads})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    oom_signs = ("MemoryError", "not enough memory", "can't allocate memory", "Cannot allocate memory")
    if any(sign in proc.stderr for sign in oom_signs) or proc.returncode in (-9, 137):
        return {"oom": True, "error": tail}
    return {"error": tail}


def environment(threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="1024,4096,16384")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mem-cap-gb", type=float, default=16.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_scaling_cpu.json"))
    ap.add_argument("--update", action="store_true", help="re-measure only these cells, keep the others in --out")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seq.split(",")]
    labels = [k.strip() for k in args.kinds.split(",")]
    results: dict[str, dict[str, dict]] = {}
    if args.update and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        results = previous["results"]
        seqs = sorted({int(n) for cells in results.values() for n in cells} | set(seqs))
    for n in [int(s) for s in args.seq.split(",")]:
        for label in labels:
            repeats = 5 if n <= 4096 else 3
            cell = _cell_in_subprocess(label, n, repeats, args.threads, args.mem_cap_gb)
            results.setdefault(label, {})[str(n)] = cell
            print(f"n={n:>6} {label:<16} {json.dumps(cell)}", flush=True)
    ref = "full (SDPA)"
    lines = [
        "| attention | " + " | ".join(f"n={n}: ms (x vs SDPA) / MB" for n in seqs) + " |",
        "|---" * (len(seqs) + 1) + "|",
    ]
    labels = [label for label in KINDS if label in results]
    for label in labels:
        cells = []
        for n in seqs:
            c, r = results[label][str(n)], results.get(ref, {}).get(str(n), {})
            if "median_ms" not in c:
                cells.append("OOM" if c.get("oom") else "error")
                continue
            speed = f" ({r['median_ms'] / c['median_ms']:.2f}x)" if "median_ms" in r else ""
            cells.append(f"{c['median_ms']:.1f}{speed} / {c['peak_extra_mb']:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "attention_scaling",
                "setting": "1 attention layer, d_model 512, 8 heads, batch 1, PyTorch eager",
                "environment": environment(args.threads),
                "results": results,
                "table_markdown": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
