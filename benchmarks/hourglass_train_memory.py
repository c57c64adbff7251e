"""Where the seed article's "23% lighter" applies: training memory (a forward and a backward pass, which keeps
every layer's activations), full attention against the hourglass at the same depth and width, in PyTorch on
this CPU. The inference peak (benchmarks/hourglass_decode.py, `effx bench`) is a maximum over layers; the
memory a backward pass needs is a sum over them, and there the layers at n/4 and n/16 save.

- the decoders of benchmarks/hourglass_decode.py: 6 layers, d_model 512, 8 heads, d_ff 2048, vocab 4096;
  full attention, or the hourglass [1, 4, 16] (2 layers at n, 2 at n/4, 2 at n/16); attention through torch's
  SDPA in both (the hourglass's factor-1 layers use it; on the CPU it keeps no n x n score matrix for backward);
- one step: next-token cross-entropy on random tokens (batch 1 x n), loss.backward();
- each (model, n) in a fresh spawned process: the peak resident growth over the step (sampled every 2 ms,
  effx.check.measure.PeakRss) after the model is built, and the step's wall time (median of --repeats).

    python benchmarks/hourglass_train_memory.py [--seq 1024,4096] [--threads 2] [--repeats 3]

Writes benchmarks/results/hourglass_train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decode_common import in_fresh_process  # benchmarks/ is the script's folder
from hourglass_decode import KINDS, spec  # the decode benchmark's models

from effx.check.measure import PeakRss, cpu_name
from effx.models import build_model

RESULTS = Path(__file__).parent / "results"


def _child(kind: str, n: int, threads: int, repeats: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(spec(kind, n)).train()
    ids = torch.randint(0, model.spec.model.vocab_size, (1, n))
    peaks, times = [], []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        with PeakRss() as mem:
            t0 = time.perf_counter()
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            times.append((time.perf_counter() - t0) * 1e3)
        peaks.append(mem.peak_mb)
    # the first step also grows the allocator's pools; later steps reuse them: report the largest growth
    queue.put({"peak_growth_mb": max(peaks), "peak_growth_mb_each": peaks, "step_ms_median": statistics.median(times),
               "step_ms_each": times, "loss": loss.item()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="1024,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", type=Path, default=RESULTS / "hourglass_train_memory.json")
    args = ap.parse_args()
    lengths = [int(x) for x in args.seq.split(",")]
    rows = []
    for n in lengths:
        cells = {}
        for label, kind in KINDS.items():
            load = os.getloadavg()[0]
            cells[label] = in_fresh_process(_child, kind, n, args.threads, args.repeats) | {"load_avg_1min": load}
            print(f"n={n} {label}: peak growth {cells[label]['peak_growth_mb']:.0f} MB, "
                  f"step {cells[label]['step_ms_median']:.0f} ms", flush=True)
        full, hour = cells["full"], cells["hourglass [1, 4, 16]"]
        rows.append({"seq": n, "cells": cells,
                     "memory_hourglass_over_full": hour["peak_growth_mb"] / full["peak_growth_mb"],
                     "speedup": full["step_ms_median"] / hour["step_ms_median"]})
        print(f"n={n}: hourglass / full memory {rows[-1]['memory_hourglass_over_full']:.2f}x, "
              f"{rows[-1]['speedup']:.2f}x faster", flush=True)
    result = {"command": "python benchmarks/hourglass_train_memory.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in (("seq", args.seq), ("threads", args.threads),
                                                            ("repeats", args.repeats))),
              "what": "one training step (forward + backward, batch 1), peak resident growth in a fresh process",
              "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
              "platform": platform.platform(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
