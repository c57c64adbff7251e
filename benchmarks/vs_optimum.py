"""effx export vs Hugging Face Optimum's ONNX export of the same BERT-like model, both in ONNX Runtime CPU, one run.

- model: transformers BertConfig (hidden 256, 4 layers, 4 heads, d_ff 1024), random init from seed 0, saved to a
  temporary folder; effx imports that folder (effx.models.hf_import) and exports it (effx.exporter.export_model),
  Optimum exports the same folder (optimum.exporters.onnx.main_export, task feature-extraction);
- inputs: batch 1, seq 128, all tokens real (token_type_ids = 0 for Optimum's graph);
- both sessions: same thread settings and graph optimisation level, runs interleaved (effx, optimum, effx, ...).
Reports p50/p90 latency of each, effx/optimum latency ratio (< 1 means effx is faster), the max abs difference
between the two outputs and of each vs transformers eager, and writes benchmarks/results/vs_optimum.json.

Needs `pip install optimum-onnx` (it pins transformers < 4.58, so a separate virtual environment with
--system-site-packages keeps the main environment intact).

    python benchmarks/vs_optimum.py [--threads 2] [--seq 128] [--repeats 100]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(sess, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    known = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {i.name: known[i.name] for i in sess.get_inputs()}


def _pct(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p90_ms": round(float(np.percentile(times, 90)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vs_optimum.json"))
    args = ap.parse_args()
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        print("optimum's ONNX exporter is not installed: pip install optimum-onnx", file=sys.stderr)
        sys.exit(2)

    import onnxruntime as ort
    import torch

    from effx.core.lazy import lazy_import
    from effx.exporter import export_model
    from effx.models.hf_import import import_hf

    transformers = lazy_import("transformers", extra="hf", purpose="building the reference BERT")
    from optimum.exporters.onnx import main_export

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.seq),
    )
    hf = transformers.BertModel(cfg).eval()
    ids = torch.randint(1000, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf.save_pretrained(str(work / "hf"))
        t0 = time.perf_counter()
        model = import_hf(work / "hf", {"model.max_seq_len": args.seq})
        export_model(model, work / "effx")
        effx_export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        main_export(
            str(work / "hf"),
            work / "optimum",
            task="feature-extraction",
            local_files_only=True,
            library_name="transformers",
            do_validation=False,
        )
        optimum_export_s = time.perf_counter() - t0
        optimum_file = work / "optimum" / "model.onnx"
        sessions = {
            "effx": _session(work / "effx" / "model.onnx", args.threads),
            "optimum": _session(optimum_file, args.threads),
        }
        feeds = {k: _feed(s, ids.numpy(), mask.numpy()) for k, s in sessions.items()}
        outs = {k: s.run(None, feeds[k])[0] for k, s in sessions.items()}
        for _ in range(args.warmup):
            for k, s in sessions.items():
                s.run(None, feeds[k])
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1e3)
        nodes = {
            k: len(__import__("onnx").load(str(p), load_external_data=False).graph.node)
            for k, p in (("effx", work / "effx" / "model.onnx"), ("optimum", optimum_file))
        }

    lat = {k: _pct(v) for k, v in times.items()}
    import optimum.version as optimum_version

    result = {
        "benchmark": "vs_optimum",
        "model": {
            "arch": "bert",
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "d_ff": 4 * args.hidden,
            "vocab": cfg.vocab_size,
            "init_seed": 0,
        },
        "input": {"batch": args.batch, "seq": args.seq},
        "environment": {
            "threads": args.threads,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "optimum": optimum_version.__version__,
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "repeats": args.repeats,
        },
        "latency_ms": lat,
        "effx_over_optimum_p50": round(lat["effx"]["p50_ms"] / lat["optimum"]["p50_ms"], 3),
        "max_abs_diff": {
            "effx_vs_optimum": float(np.abs(outs["effx"] - outs["optimum"]).max()),
            "effx_vs_transformers": float(np.abs(outs["effx"] - ref).max()),
            "optimum_vs_transformers": float(np.abs(outs["optimum"] - ref).max()),
        },
        "export_s": {"effx": round(effx_export_s, 2), "optimum": round(optimum_export_s, 2)},
        "graph_nodes": nodes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| export | p50 ms | p90 ms | max abs diff vs transformers |\n|---|---|---|---|")
    for k in ("effx", "optimum"):
        print(
            f"| {k} | {lat[k]['p50_ms']} | {lat[k]['p90_ms']} | {result['max_abs_diff'][f'{k}_vs_transformers']:.2e} |"
        )
    print(
        f"effx/optimum p50 latency: {result['effx_over_optimum_p50']}x; "
        f"effx vs optimum max abs diff {result['max_abs_diff']['effx_vs_optimum']:.2e}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
