"""A Gemma-3-shaped hybrid decoder against the same weights with every layer global: KV-cache bytes and decode
tokens/s at long contexts, exported by effx and run by ONNX Runtime on this CPU, in one run.

- hybrid: 6 layers, 5 local (window 512, ring-buffer caches, RoPE base 1e4) : 1 global (full attention,
  contiguous cache, RoPE base 1e6), d_model 512, 8 query heads on 2 KV heads (GQA), Gemma norms/MLP;
- all-global: the same spec with every layer global and contiguous, loaded with the same weights (local and
  full layers have the same parameters);
- each model is exported (prefill + decode graphs) and built for `cpu`; the context is filled by a prefill of
  512 tokens and decode-graph chunks of 512 (the host protocol, effx.core.protocol.DecodeDriver), then
  `--steps` single-token decode steps are timed (tokens/s, p50 per step) at each context length, and the cache
  bytes are the bytes of the cache tensors the host carries at that point.

    python benchmarks/hybrid_decode.py [--contexts 1024,4096,8192] [--steps 32] [--threads 2]

Writes benchmarks/results/hybrid_decode.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from decode_common import decode_at, export_for_cpu

from effx.check.measure import cpu_name
from effx.core.spec import RunSpec
from effx.models import build_model

RESULTS = Path(__file__).parent / "results"


def spec(hybrid: bool, max_len: int) -> RunSpec:
    model = {
        "family": "decoder",
        "vocab_size": 4096,
        "d_model": 512,
        "n_heads": 8,
        "n_kv_heads": 2,
        "n_layers": 6,
        "d_ff": 2048,
        "max_seq_len": max_len,
        "norm": "gemma_rmsnorm",
        "norm_position": "sandwich",
        "activation": "geglu_tanh",
        "bias": False,
        "qk_norm": True,
        "embed_scale": 512**0.5,
        "tie_embeddings": True,
        "rope_theta": 1_000_000.0,
    }
    types = {
        "local": {
            "attention": {"kind": "local", "window": 512},
            "kv_cache": {"layout": "ring"},
            "rope": {"theta": 10_000.0},
        },
        "global": {"attention": {"kind": "full"}},
    }
    pattern = ["local"] * 5 + ["global"] if hybrid else ["global"]
    return RunSpec.parse(
        {"model": model, "kv_cache": {"layout": "contiguous"}, "layers": {"pattern": pattern, "types": types}}
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in results["models"].items():
        ctx = [r["context"] for r in rows]
        a.plot(ctx, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=name)
        b.plot(ctx, [r["decode_tokens_per_s"] for r in rows], marker="o", label=name)
    a.set(xlabel="context (tokens)", ylabel="KV cache (MiB)", title="cache bytes")
    b.set(xlabel="context (tokens)", ylabel="decode tokens/s", title="decode speed (ORT CPU)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(RESULTS / "hybrid_decode.json"))
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + args.steps * len(contexts) + 64
    torch.manual_seed(0)
    hybrid = build_model(spec(True, max_len))
    every = build_model(spec(False, max_len))
    every.load_state_dict(hybrid.state_dict())  # the same weights: local and full layers have the same parameters
    results = {
        "benchmark": "hybrid_decode",
        "command": "python benchmarks/hybrid_decode.py "
        f"--contexts {args.contexts} --steps {args.steps} --threads {args.threads}",
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
        for name, model in (("hybrid 5 local : 1 global", hybrid), ("all global", every)):
            print(name)
            folder = export_for_cpu(model, Path(work) / name.replace(" ", "_"))
            results["models"][name] = decode_at(folder, contexts, args.steps, args.threads)
    h, g = results["models"].values()
    results["ratios"] = [
        {
            "context": a["context"],
            "cache_bytes": a["cache_bytes"] / b["cache_bytes"],
            "decode_speedup": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
        }
        for a, b in zip(h, g, strict=True)
    ]
    for r in results["ratios"]:
        print(f"context {r['context']}: cache {r['cache_bytes']:.3f}x of all-global, decode {r['decode_speedup']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
