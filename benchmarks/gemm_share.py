"""How close the ONNX Runtime encoder comes to this CPU's fp32 GEMM peak, measured in one run.

The peak is ONNX Runtime's own MatMul on a large square product (the best case of its GEMM on this machine
with the same thread count). The encoder is effx's export of a d_model 512, 8-head, 6-layer full-attention
encoder built for `cpu`, at batch 1 and each sequence length. Its work is counted analytically as the
multiply-adds of its matrix products:
- per layer: Q/K/V/O projections 4·n·d², the MLP 2·n·d·d_ff, and attention's QKᵀ and PV 2·n²·d;
- FLOPs = 2 × multiply-adds.
Softmax, norms and activations are left out, so the share is an upper bound on GEMM efficiency. The share is
the encoder's achieved FLOP/s divided by the peak.

    python benchmarks/gemm_share.py [--seq 512,2048] [--threads 2] [--iters 5]

Writes benchmarks/results/gemm_share.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from effx.check.measure import cpu_name
from effx.core.spec import RunSpec
from effx.exporter import export_model
from effx.models import build_model
from effx.targets.api import build

RESULTS = Path(__file__).parent / "results"
D_MODEL, HEADS, LAYERS, D_FF = 512, 8, 6, 2048


def _session(model: str | bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _median_s(run, iters: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_peak(size: int, threads: int, iters: int) -> float:
    """FLOP/s of ONNX Runtime's MatMul on (size x size) @ (size x size), weights as an initializer."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [size, size], rng.standard_normal((size, size), np.float32).ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    sess = _session(model.SerializeToString(), threads)
    x = rng.standard_normal((size, size), np.float32)
    return 2.0 * size**3 / _median_s(lambda: sess.run(None, {"x": x}), iters)


def encoder_flops(n: int) -> float:
    per_layer = 4 * n * D_MODEL**2 + 2 * n * D_MODEL * D_FF + 2 * n * n * D_MODEL
    return 2.0 * LAYERS * per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--out", default=str(RESULTS / "gemm_share.json"))
    args = ap.parse_args()
    seqs = [int(s) for s in args.seq.split(",")]
    load_before = os.getloadavg()
    spec = RunSpec.parse({"model": {"family": "encoder", "d_model": D_MODEL, "n_heads": HEADS, "n_layers": LAYERS,
                                    "d_ff": D_FF, "max_seq_len": max(seqs)}, "attention": {"kind": "full"}})
    rows = []
    with tempfile.TemporaryDirectory() as work:
        export_model(build_model(spec), Path(work) / "onnx")
        built = Path(work) / "cpu"
        build(Path(work) / "onnx", target="cpu", out_dir=built)
        sess = _session(str(built / "model.onnx"), args.threads)
        peak = gemm_peak(args.gemm_size, args.threads, args.iters)
        for n in seqs:
            ids = np.random.default_rng(n).integers(0, spec.model.vocab_size, (1, n), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            seconds = _median_s(lambda f=feed: sess.run(None, f), args.iters)
            flops = encoder_flops(n)
            rows.append({"seq": n, "latency_ms": round(seconds * 1e3, 2), "gflop": round(flops / 1e9, 2),
                         "gflop_per_s": round(flops / seconds / 1e9, 1), "share_of_peak": round(flops / seconds / peak, 3)})
            print(f"seq {n}: {seconds * 1e3:.1f} ms, {flops / 1e9:.1f} GFLOP, {flops / seconds / 1e9:.1f} GFLOP/s "
                  f"= {flops / seconds / peak:.0%} of the {peak / 1e9:.1f} GFLOP/s MatMul peak", flush=True)
        peak_after = gemm_peak(args.gemm_size, args.threads, args.iters)  # the peak again, after the encoder
    result = {
        "benchmark": "gemm_share",
        "command": f"python benchmarks/gemm_share.py --seq {args.seq} --threads {args.threads} --iters {args.iters}",
        "environment": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "platform": platform.platform(), "torch": torch.__version__, "onnx": onnx.__version__,
                        "onnxruntime": ort.__version__, "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
        "model": {"d_model": D_MODEL, "heads": HEADS, "layers": LAYERS, "d_ff": D_FF, "attention": "full", "batch": 1},
        "gemm_peak_gflop_per_s": {"before": round(peak / 1e9, 1), "after": round(peak_after / 1e9, 1),
                                  "size": args.gemm_size},
        "encoder": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
