"""The same tiny Mistral (sliding window in every layer) exported by effx and by optimum-onnx, decoding at a
long context in ONNX Runtime CPU, one run: KV-cache bytes and decode tokens/s.

- model: transformers MistralConfig (hidden 256, 4 layers, 4 heads on 2 KV heads, sliding_window 512),
  random init from seed 0, saved to a temporary folder;
- effx: `import_hf` keeps the window (local layers, ring-buffer caches of 512 slots), export + cpu build;
- optimum: `main_export(task="text-generation-with-past")`: past_key_values of the whole context, growing;
- both: a prompt of `--context` tokens, then `--steps` greedy single-token steps timed; both sessions with the
  same thread settings; greedy tokens compared.

Needs `pip install optimum-onnx` (it pins transformers < 4.58: use its own virtual environment, with torch and
effx installed there too, as benchmarks/vs_optimum.py does). Without it the script exits 2 with the command.

    python benchmarks/mistral_vs_optimum.py [--context 4096] [--steps 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def optimum_decode(folder: Path, ids: np.ndarray, context: int, steps: int, threads: int):
    """Prefill `context` tokens, then greedy steps; returns (tokens, cache bytes at the end, step seconds)."""
    sess = _session(folder / "model.onnx", threads)
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    layers = sorted({n.split(".")[1] for n in names if n.startswith("past_key_values.")}, key=int)
    kv_in = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    heads, head_dim = kv_in.shape[1], kv_in.shape[3]
    past = {
        f"past_key_values.{i}.{kv}": np.zeros((1, heads, 0, head_dim), np.float32)
        for i in layers
        for kv in ("key", "value")
    }

    def run(tokens: np.ndarray, start: int):
        n = tokens.shape[1]
        feed = {"input_ids": tokens, "attention_mask": np.ones((1, start + n), np.int64)} | past
        if "position_ids" in names:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        result = dict(zip(outs, sess.run(None, {k: feed[k] for k in names}), strict=True))
        for k in list(past):
            past[k] = result[k.replace("past_key_values", "present")]
        return result["logits"][:, -1].argmax(-1)

    nxt = run(ids[:, :context], 0)
    tokens, times = [int(nxt[0])], []
    for t in range(steps - 1):
        t0 = time.perf_counter()
        nxt = run(nxt[:, None].astype(np.int64), context + t)
        times.append(time.perf_counter() - t0)
        tokens.append(int(nxt[0]))
    return tokens, int(sum(a.nbytes for a in past.values())), times


def effx_decode(folder: Path, ids: np.ndarray, context: int, steps: int, threads: int):
    from effx.core.manifest import Manifest
    from effx.core.protocol import DecodeDriver
    from effx.targets.ort import OrtRunner

    manifest = Manifest.read(folder)
    with OrtRunner(folder, manifest, threads=threads) as runner:
        driver = DecodeDriver(manifest, 1, context + steps)
        nxt = driver.prefill(runner.infer, ids[:, :context])["logits"][:, -1].argmax(-1)
        tokens, times = [int(nxt[0])], []
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            nxt = driver.step(runner.infer, nxt[:, None].astype(np.int64))["logits"][:, -1].argmax(-1)
            times.append(time.perf_counter() - t0)
            tokens.append(int(nxt[0]))
        return tokens, int(sum(a.nbytes for a in driver.cache.values())), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(RESULTS / "mistral_vs_optimum.json"))
    args = ap.parse_args()
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        print(
            "optimum's ONNX exporter is not installed: pip install optimum-onnx (in its own venv: it pins "
            "transformers < 4.58)",
            file=sys.stderr,
        )
        sys.exit(2)
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    from effx.exporter import export_model
    from effx.models.hf_import import import_hf
    from effx.targets.api import build

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(0)
        config = transformers.MistralConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            sliding_window=args.window,
            max_position_embeddings=args.context + args.steps + 64,
        )
        transformers.MistralForCausalLM(config).eval().save_pretrained(work / "hf")
        ids = np.random.default_rng(0).integers(0, 4096, (1, args.context), dtype=np.int64)
        export_model(import_hf(work / "hf"), work / "effx-onnx")
        build(work / "effx-onnx", target="cpu", out_dir=work / "effx-cpu")
        main_export(
            str(work / "hf"), output=str(work / "optimum"), task="text-generation-with-past", no_post_process=True
        )
        e_tokens, e_bytes, e_times = effx_decode(work / "effx-cpu", ids, args.context, args.steps, args.threads)
        o_tokens, o_bytes, o_times = optimum_decode(work / "optimum", ids, args.context, args.steps, args.threads)
    row = lambda tokens, nbytes, times: {  # noqa: E731
        "cache_bytes": nbytes,
        "decode_tokens_per_s": len(times) / sum(times),
        "step_p50_ms": float(np.percentile(times, 50) * 1e3),
    }
    results = {
        "benchmark": "mistral_vs_optimum",
        "command": f"python benchmarks/mistral_vs_optimum.py --context "
        f"{args.context} --steps {args.steps} --window {args.window} --threads {args.threads}",
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "transformers": transformers.__version__,
        },
        "effx": row(e_tokens, e_bytes, e_times),
        "optimum": row(o_tokens, o_bytes, o_times),
        "greedy_tokens_equal": e_tokens == o_tokens,
        "first_disagreement": next(
            (i for i, (a, b) in enumerate(zip(e_tokens, o_tokens, strict=True)) if a != b), None
        ),
    }
    results["cache_ratio"] = e_bytes / o_bytes
    results["decode_speedup"] = results["effx"]["decode_tokens_per_s"] / results["optimum"]["decode_tokens_per_s"]
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
