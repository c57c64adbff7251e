"""Full attention against the hourglass at the same depth and width, as decoders, on the `cpu` target, in one
run: prefill latency at n tokens and decode tokens/s at a long context (the encoder sweep is `effx bench`).

- full: 6 layers, d_model 512, 8 heads, causal, RoPE, contiguous cache;
- hourglass: the same with attention.kind = hierarchical, factors [1, 4, 16] (levels 1, 4, 16, 4, 1: 2 layers
  at full resolution, 2 at n/4, 2 at n/16), average shortening, repeat upsampling, multiscale cache;
- exported and built for `cpu` each, run by ONNX Runtime through the host protocol.

    python benchmarks/hourglass_decode.py [--prefill 1024,4096] [--context 4096] [--steps 32] [--threads 2]

Writes benchmarks/results/hourglass_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from decode_common import decode_at, export_for_cpu, prefill_ms

from effx.check.measure import cpu_name
from effx.core.spec import RunSpec
from effx.models import build_model

RESULTS = Path(__file__).parent / "results"


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
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory() as work:
        for kind in ("full", "hourglass [1, 4, 16]"):
            print(kind, flush=True)
            model = build_model(spec("full" if kind == "full" else "hierarchical", max_len))
            folder = export_for_cpu(model, Path(work) / kind.split()[0])
            row = {"prefill_ms": {n: prefill_ms(folder, n, args.threads) for n in lengths}}
            print(f"  prefill {row['prefill_ms']}", flush=True)
            row["decode"] = decode_at(folder, [args.context], args.steps, args.threads)[0]
            results["models"][kind] = row
    full, hour = results["models"].values()
    results["ratios"] = {
        "prefill_speedup": {n: full["prefill_ms"][n] / hour["prefill_ms"][n] for n in lengths},
        "decode_speedup": hour["decode"]["decode_tokens_per_s"] / full["decode"]["decode_tokens_per_s"],
        "cache_bytes": hour["decode"]["cache_bytes"] / full["decode"]["cache_bytes"],
    }
    print(json.dumps(results["ratios"], indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
