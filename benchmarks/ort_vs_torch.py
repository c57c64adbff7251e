"""ONNX Runtime (graph optimisations on) vs PyTorch eager, same model, same inputs, this CPU, one run.

- encoder: d_model 512, 8 heads, 6 layers, batch 1, seq 512 and 2048, full attention and Linformer (k = 128);
- decoder: decode-step tokens/s with a contiguous cache (prompt 128, then 32 single-token steps).
Prints torch/ORT ratios (> 1 means ORT is faster) and, per ORT run, the op types that take the most time
(ORT's own profiler), and writes benchmarks/results/ort_vs_torch.json.

    python benchmarks/ort_vs_torch.py [--threads 2] [--seq 512,2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from effx.core.spec import RunSpec
from effx.exporter import export_model
from effx.models import build_model


def _session(path: Path, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _top_ops(profile_path: str, top: int = 5) -> list[tuple[str, float]]:
    """Share of ORT kernel time by op type, from the session's profile."""
    events = json.loads(Path(profile_path).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0)
    total = sum(by_op.values()) or 1.0
    return [(op, round(100 * t / total, 1)) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]


def encoder_case(kind: str, seq: int, threads: int, repeats: int, work: Path) -> dict:
    attention = {"kind": kind} | ({"k": 128} if kind == "linformer" else {})
    spec = RunSpec.parse(
        {
            "model": {"d_model": 512, "n_heads": 8, "n_layers": 6, "d_ff": 2048, "max_seq_len": seq},
            "attention": attention,
        }
    )
    model = build_model(spec)
    out = work / f"enc-{kind}-{seq}"
    export_model(model, out)
    ids = torch.randint(0, spec.model.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        torch_ms = _median_ms(lambda: model(ids, mask), repeats)
        ref = model(ids, mask).numpy()
    sess = _session(out / "model.onnx", threads, str(work / f"prof-{kind}-{seq}"))
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    ort_ms = _median_ms(lambda: sess.run(None, feed), repeats)
    err = float(np.abs(sess.run(None, feed)[0] - ref).max())
    top = _top_ops(sess.end_profiling())
    return {
        "case": f"encoder {kind} seq {seq}",
        "torch_ms": round(torch_ms, 2),
        "ort_ms": round(ort_ms, 2),
        "torch_over_ort": round(torch_ms / ort_ms, 2),
        "max_abs_err": err,
        "ort_top_ops_pct": top,
    }


def decoder_case(threads: int, work: Path, prompt: int = 128, steps: int = 32) -> dict:
    spec = RunSpec.parse(
        {
            "model": {
                "family": "decoder",
                "d_model": 512,
                "n_heads": 8,
                "n_layers": 6,
                "d_ff": 2048,
                "max_seq_len": prompt + steps + 8,
            },
            "attention": {"kind": "full"},
            "kv_cache": {"layout": "contiguous"},
        }
    )
    model = build_model(spec)
    out = work / "dec"
    manifest = export_model(model, out)
    ids = torch.randint(0, spec.model.vocab_size, (1, prompt + steps), generator=torch.Generator().manual_seed(0))

    def torch_decode():
        cache = model.empty_cache(1)
        _, cache = model.step(ids[:, :prompt], cache)
        t0 = time.perf_counter()
        for t in range(prompt, prompt + steps):
            _, cache = model.step(ids[:, t : t + 1], cache)
        return time.perf_counter() - t0

    prefill = _session(out / "prefill.onnx", threads)
    decode = _session(out / "decode.onnx", threads, str(work / "prof-decode"))
    names = [o.name for o in prefill.get_outputs()]

    def ort_decode():
        outs = prefill.run(None, {"input_ids": ids[:, :prompt].numpy()})
        state = {n.replace("present.", "past.", 1): v for n, v in zip(names[1:], outs[1:], strict=True)}
        t0 = time.perf_counter()
        for t in range(prompt, prompt + steps):
            feed = {"input_ids": ids[:, t : t + 1].numpy(), "past_lengths": np.array([t], np.int64)} | state
            outs = decode.run(None, feed)
            state = {n.replace("present.", "past.", 1): v for n, v in zip(names[1:], outs[1:], strict=True)}
        return time.perf_counter() - t0

    with torch.inference_mode():
        torch_decode()
        torch_s = statistics.median(torch_decode() for _ in range(3))
    ort_decode()
    ort_s = statistics.median(ort_decode() for _ in range(3))
    assert manifest.kv_cache.layout == "contiguous"
    return {
        "case": f"decoder full contiguous, {steps} decode steps after a {prompt}-token prompt",
        "torch_tokens_per_s": round(steps / torch_s, 1),
        "ort_tokens_per_s": round(steps / ort_s, 1),
        "torch_over_ort": round(torch_s / ort_s, 2),
        "ort_top_ops_pct": _top_ops(decode.end_profiling()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq", default="512,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ort_vs_torch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seq in [int(s) for s in args.seq.split(",")]:
            for kind in ("full", "linformer"):
                rows.append(encoder_case(kind, seq, args.threads, args.repeats, work))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(decoder_case(args.threads, work))
        print(json.dumps(rows[-1]), flush=True)
    import platform

    env = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"benchmark": "ort_vs_torch", "environment": env, "results": rows}, indent=2) + "\n"
    )
    print("| case | torch | ORT | torch/ORT | ORT top ops (% kernel time) |\n|---|---|---|---|---|")
    for r in rows:
        t = f"{r['torch_ms']} ms" if "torch_ms" in r else f"{r['torch_tokens_per_s']} tok/s"
        o = f"{r['ort_ms']} ms" if "ort_ms" in r else f"{r['ort_tokens_per_s']} tok/s"
        ops = ", ".join(f"{op} {pct}%" for op, pct in r["ort_top_ops_pct"][:3])
        print(f"| {r['case']} | {t} | {o} | {r['torch_over_ort']}x | {ops} |")


if __name__ == "__main__":
    main()
