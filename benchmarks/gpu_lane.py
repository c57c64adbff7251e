"""The GPU lane: on a CUDA machine, test every fused kernel on the GPU and time it against torch's SDPA.

    python benchmarks/gpu_lane.py [--seq 1024,4096,16384] [--cache 1024,2048,4096,8192,16384,32768]
                                  [--skip-tests] [--out-dir benchmarks/results]

1. Tests: `pytest tests/plugins` with EFFX_KERNEL_DEVICE=cuda (every kernel test on CUDA, compiled Triton),
   then once more on the CPU interpreter (the PTX and TensorRT-plugin checks run in that pass too).
2. Prefill, one attention layer's core: d_model 512 = 8 heads x 64, batch 1, fp16, n = 1K, 4K, 16K. Each
   effx kernel against torch SDPA restricted to the flash backend on the same q, k, v (causal kernels
   against causal flash, the others against non-causal flash).
3. Decode, one new token against a cache of 1K..32K tokens (8 query heads; MHA and GQA 8:2): the
   contiguous (LocalAttention, window = whole cache) and paged (page 16) kernels, SDPA for reference, and
   the HBM roofline: the bytes of K and V a step must read divided by the GPU's peak bandwidth. Peak
   bandwidths are spec-sheet numbers from a table by GPU name, marked as such.
Timing: CUDA events around each call, warm-up first, p50/p90/p99 over the repeats; peak memory is
torch.cuda.max_memory_allocated above what the inputs hold. Results: benchmarks/results/gpu_lane_<gpu>.json
and .md, with the environment. Without a CUDA device the script refuses and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Peak DRAM bandwidth in bytes/s from NVIDIA's spec sheets (not measured). Matched in order against
# torch.cuda.get_device_name(); the first pattern found wins.
SPEC_SHEET_BANDWIDTH: list[tuple[str, float, str]] = [
    (r"H200", 4.8e12, "H200 SXM 141GB HBM3e"),
    (r"H100 NVL", 3.9e12, "H100 NVL 94GB HBM3"),
    (r"H100 PCIe", 2.0e12, "H100 PCIe 80GB HBM2e"),
    (r"H100", 3.35e12, "H100 SXM 80GB HBM3"),
    (r"GH200", 4.0e12, "GH200 96GB HBM3"),
    (r"A100.*80GB.*PCIe|A100 80GB PCIe", 1.935e12, "A100 80GB PCIe HBM2e"),
    (r"A100.*(SXM4-80GB|80GB)", 2.039e12, "A100 SXM4 80GB HBM2e"),
    (r"A100", 1.555e12, "A100 40GB HBM2"),
    (r"L40S", 0.864e12, "L40S GDDR6"),
    (r"L4\b", 0.300e12, "L4 GDDR6"),
    (r"A10\b", 0.600e12, "A10 GDDR6"),
    (r"T4\b", 0.320e12, "T4 GDDR6"),
    (r"Orin", 0.2048e12, "Jetson AGX Orin 64GB LPDDR5 (other Orin modules have less)"),
    (r"Thor", 0.273e12, "Jetson AGX Thor LPDDR5X"),
]


def spec_sheet_bandwidth(gpu_name: str) -> dict | None:
    for pattern, bandwidth, label in SPEC_SHEET_BANDWIDTH:
        if re.search(pattern, gpu_name):
            return {"bytes_per_s": bandwidth, "matched": label, "source": "spec sheet (not measured)"}
    return None


def percentiles(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)

    def pick(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]

    return {"p50_ms": pick(50), "p90_ms": pick(90), "p99_ms": pick(99), "min_ms": s[0], "repeats": len(s)}


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int = 3) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    out = percentiles(samples)
    out["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def run_tests() -> dict:
    """pytest tests/plugins on CUDA, then on the CPU interpreter (PTX + TensorRT plugin checks included)."""
    results = {}
    for device in ("cuda", "cpu"):
        env = {**os.environ, "EFFX_KERNEL_DEVICE": device}
        env.pop("TRITON_INTERPRET", None)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/plugins", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        results[device] = {
            "returncode": proc.returncode,
            "summary": summary,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if proc.returncode != 0:
            results[device]["tail"] = (proc.stdout + proc.stderr)[-6000:]
        print(f"tests on {device}: {summary}", flush=True)
    return results


def prefill_cases(n: int, dtype, device) -> dict[str, tuple[Callable[[], object], bool]]:
    """label -> (call, causal): every effx kernel on one (1, 8, n, 64) problem, and the SDPA baselines."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from effx.plugins.kernels import attention, linear, linformer
    from effx.plugins.linear import favor_projection

    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, d = 1, 8, 64

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d)
    pos = torch.arange(n, device=device)[None]
    scale = d**-0.5
    kp = 128
    e, f = randn(1, kp, n) / n**0.5, randn(1, kp, n) / n**0.5
    omega = favor_projection(128, d, torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    s0 = torch.zeros(b, h, d, d, device=device, dtype=dtype)
    z0 = torch.zeros(b, h, d, device=device, dtype=dtype)
    s0f, z0f = torch.zeros(b, h, 128, d, device=device, dtype=dtype), torch.zeros(b, h, 128, device=device, dtype=dtype)

    def flash(causal: bool):
        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

        return call

    return {
        "SDPA flash (causal)": (flash(True), True),
        "SDPA flash (non-causal)": (flash(False), False),
        "local w=256 causal": (lambda: attention.local_attention(q, k, v, pos, pos, 256, True, scale), True),
        "local w=256 symmetric": (lambda: attention.local_attention(q, k, v, pos, pos, 256, False, scale), False),
        "block-sparse bs64 local3 global1 causal": (
            lambda: attention.block_sparse_attention(q, k, v, pos, pos, 64, 3, 1, 0, True, scale),
            True,
        ),
        "linformer k=128 (project + flash)": (lambda: linformer.linformer_attention(q, k, v, e, f, scale), False),
        "linformer k=128 (single launch, TensorRT form)": (
            lambda: linformer.linformer_attention(q, k, v, e, f, scale, fused=True),
            False,
        ),
        "linear elu non-causal": (lambda: linear.linear_attention(q, k, v, None, None, "elu", 1e-6), False),
        "linear elu causal (chunked state)": (
            lambda: linear.linear_attention_state(q, k, v, s0, z0, None, "elu", 1e-6),
            True,
        ),
        "linear favor m=128 causal (chunked state)": (
            lambda: linear.linear_attention_state(q, k, v, s0f, z0f, omega, "favor", 1e-6),
            True,
        ),
    }


def bench_prefill(seqs: list[int]) -> dict:
    import torch

    out: dict[str, dict] = {}
    for n in seqs:
        repeats = 20 if n <= 4096 else 8
        for label, (call, causal) in prefill_cases(n, torch.float16, torch.device("cuda")).items():
            try:
                cell = time_cuda(call, repeats)
            except Exception as exc:  # noqa: BLE001 - one failing cell is recorded, the lane goes on
                cell = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            cell["causal"] = causal
            out.setdefault(label, {})[str(n)] = cell
            print(
                f"prefill n={n:>6} {label:<48} {json.dumps({k: v for k, v in cell.items() if k != 'causal'})}",
                flush=True,
            )
    return out


def decode_cases(length: int, h_kv: int, dtype, device) -> dict[str, Callable[[], object]]:
    import torch
    import torch.nn.functional as F

    from effx.plugins.kernels import attention

    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, d, page = 1, 8, 64, 16

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = randn(b, h, 1, d)
    k, v = randn(b, h_kv, length, d), randn(b, h_kv, length, d)
    k_pos = torch.arange(length, device=device)[None]
    q_pos = torch.tensor([[length - 1]], device=device)
    blocks = length // page
    k_pool = k[0].transpose(0, 1).reshape(blocks, page, h_kv, d).contiguous()
    v_pool = v[0].transpose(0, 1).reshape(blocks, page, h_kv, d).contiguous()
    block_table = torch.randperm(blocks, generator=g).to(device)[None]  # pages scattered in the pool
    seq_lens = torch.tensor([length], device=device)
    k_exp, v_exp = k.repeat_interleave(h // h_kv, 1), v.repeat_interleave(h // h_kv, 1)
    return {
        "SDPA (K/V expanded to 8 heads)": lambda: F.scaled_dot_product_attention(q, k_exp, v_exp, scale=d**-0.5),
        "effx contiguous (split-K)": lambda: attention.local_attention(q, k, v, q_pos, k_pos, length, True, d**-0.5),
        "effx contiguous (one pass, TensorRT form)": lambda: attention.local_attention(
            q, k, v, q_pos, k_pos, length, True, d**-0.5, num_splits=1
        ),
        "effx paged page16 (split-K)": lambda: attention.paged_attention(
            q, k_pool, v_pool, block_table, q_pos, seq_lens, 0, d**-0.5
        ),
    }


def bench_decode(lengths: list[int], bandwidth: dict | None) -> dict:
    import torch

    out: dict[str, dict] = {}
    for h_kv in (8, 2):
        for length in lengths:
            kv_bytes = 2 * 1 * h_kv * length * 64 * 2  # K and V, fp16
            roofline_ms = kv_bytes / bandwidth["bytes_per_s"] * 1e3 if bandwidth else None
            for label, call in decode_cases(length, h_kv, torch.float16, torch.device("cuda")).items():
                key = f"{label} [H_kv={h_kv}]"
                try:
                    cell = time_cuda(call, 50)
                    cell["kv_bytes"] = kv_bytes
                    cell["achieved_GBps"] = kv_bytes / (cell["p50_ms"] * 1e-3) / 1e9
                    if roofline_ms is not None:
                        cell["roofline_ms"] = roofline_ms
                        cell["fraction_of_roofline"] = roofline_ms / cell["p50_ms"]
                except Exception as exc:  # noqa: BLE001
                    cell = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                out.setdefault(key, {})[str(length)] = cell
                print(f"decode L={length:>6} {key:<56} {json.dumps(cell)}", flush=True)
    return out


def environment() -> dict:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm": f"{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "driver": _driver_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU lane: {env['gpu']} (sm_{env['sm']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}",
        "",
    ]
    for device, t in report.get("tests", {}).items():
        lines.append(f"- tests/plugins on {device}: {t['summary']} (exit {t['returncode']}, {t['seconds']} s)")
    seqs = sorted({int(n) for cells in report["prefill"].values() for n in cells})
    lines += [
        "",
        "## Prefill (batch 1, 8 heads x 64, fp16): p50 ms (speed-up vs SDPA flash, same causality)",
        "",
        "| kernel | " + " | ".join(f"n={n}" for n in seqs) + " |",
        "|---" * (len(seqs) + 1) + "|",
    ]
    for label, cells in report["prefill"].items():
        row = []
        for n in seqs:
            c = cells.get(str(n), {})
            if "p50_ms" not in c:
                row.append("error")
                continue
            base_label = "SDPA flash (causal)" if c["causal"] else "SDPA flash (non-causal)"
            base = report["prefill"].get(base_label, {}).get(str(n), {})
            ratio = (
                f" ({base['p50_ms'] / c['p50_ms']:.2f}x)" if "p50_ms" in base and not label.startswith("SDPA") else ""
            )
            row.append(f"{c['p50_ms']:.3f}{ratio}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    bw = report.get("bandwidth")
    lengths = sorted({int(n) for cells in report["decode"].values() for n in cells})
    lines += [
        "",
        "## Decode (1 token, 8 query heads x 64, fp16): p50 us (fraction of the HBM roofline)",
        "",
        f"Roofline = bytes of K and V read / peak bandwidth; peak = "
        f"{bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw['matched']}, {bw['source']})."
        if bw
        else "No spec-sheet bandwidth for this GPU: no roofline.",
        "",
        "| kernel | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for label, cells in report["decode"].items():
        row = []
        for n in lengths:
            c = cells.get(str(n), {})
            if "p50_ms" not in c:
                row.append("error")
                continue
            frac = f" ({c['fraction_of_roofline']:.0%})" if "fraction_of_roofline" in c else ""
            row.append(f"{c['p50_ms'] * 1e3:.1f}{frac}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="1024,4096,16384")
    ap.add_argument("--cache", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_lane: no CUDA device here (torch.cuda.is_available() is False). The GPU lane measures "
            "nothing and writes nothing on this machine; run it on a CUDA machine.",
            file=sys.stderr,
        )
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_lane: triton is not installed (pip install 'effx[triton]')", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))
    env = environment()
    bandwidth = spec_sheet_bandwidth(env["gpu"])
    report: dict = {"benchmark": "gpu_lane", "environment": env, "bandwidth": bandwidth}
    if not args.skip_tests:
        report["tests"] = run_tests()
    report["prefill"] = bench_prefill([int(s) for s in args.seq.split(",")])
    report["decode"] = bench_decode([int(s) for s in args.cache.split(",")], bandwidth)
    report["table_markdown"] = markdown(report)

    from effx.core.atomic import atomic_write_text

    slug = re.sub(r"[^a-z0-9]+", "_", env["gpu"].lower()).strip("_")
    out = Path(args.out_dir)
    atomic_write_text(out / f"gpu_lane_{slug}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"gpu_lane_{slug}.md", report["table_markdown"])
    print(report["table_markdown"])
    print(f"wrote {out / f'gpu_lane_{slug}.json'} and .md")
    failed = [d for d, t in report.get("tests", {}).items() if t["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
