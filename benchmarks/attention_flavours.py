"""Which attention op the ONNX Runtime CPU target should get: the standard ONNX op or effx's node + function
body, measured per attention site in one run (this is where the `cpu` profile's `op_flavours` come from).

One attention op alone, d_model 512 (8 heads x 64), batch 1, ONNX Runtime CPU EP, graph optimisations on,
memory arena OFF (so peak memory is what the graph allocates, not what the arena keeps):
- local (whole sequence), encoder |i - j| < w and causal prefill i - w < j <= i, w = 256:
  ONNX `Attention`-25 (`left_window_size`/`right_window_size`, a boolean key mask for the encoder) vs
  `effx::LocalAttention` with its function body as the exporter attaches it (the banded form runs for
  n > 2w + 128), at n = 1K, 4K, 16K;
- local-step: one decode query against a ring of 512 slots (window 512 as a boolean mask over the slots):
  ONNX `Attention` vs the same effx node (its dense masked form);
- full, causal prefill at n = 1K, 4K: ONNX `Attention` (is_causal) vs the decomposed MatMul/Softmax math
  effx writes when full attention does not take the standard op.
- linear, causal prefill (elu features, 8 heads, state from zero) at n = 1K, 4K, 16K: ONNX `LinearAttention`-27
  with the features, the normaliser column and the [S, z] state around it, traced from effx.plugins.linear as
  the exporter traces a decoder, vs `effx::NormalizedLinearAttentionState` with its function body. Recorded
  apart (`--only 'linear causal prefill' --out benchmarks/results/attention_flavours_linear.json`).
Each cell runs in its own process under a memory cap (a cell that runs out is recorded as OOM); latency
p50/p90 over the repeats after one warm-up; peak memory = sampled RSS growth during the timed runs
(effx.check.measure.PeakRss). Ratios (effx ms / onnx ms: > 1 means the standard op is faster) come from the
same run; with --rounds R the two flavours alternate R times and the least disturbed round is kept (every
round's p50 is recorded). The load average is recorded, since the machine may be shared.

    python benchmarks/attention_flavours.py [--seq 1024,4096,16384] [--threads 2] [--mem-cap-gb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HEADS, HEAD_DIM, WINDOW, STEP_SLOTS = 8, 64, 256, 512
STEP_KV_HEADS = 2  # decode steps as decoders run them: grouped KV heads (8 query heads on 2)
DECODER = "local decoder step (2 layers)"  # whole-model cell: decode tokens/s, local-step flavour
SITES = {  # label -> (site, causal)
    "local encoder": ("local", False),
    "local causal prefill": ("local", True),
    "local decode step": ("local-step", True),
    "full causal prefill": ("full", True),
    "linear causal prefill": ("linear", True),
}


def build_graph(label: str, flavour: str, opset: int = 25):
    """The one-op graph of a cell: inputs q, k, v (1, H, N, D) (+ positions or a mask), output y."""
    if SITES[label][0] == "linear":
        return build_linear_graph(flavour)
    import onnx
    from onnx import TensorProto, helper

    from effx.exporter.onnx_export import attach_functions
    from effx.plugins.onnx_body import Body

    site, causal = SITES[label]
    nq = 1 if site == "local-step" else "n"
    nk = STEP_SLOTS if site == "local-step" else "n"
    window = STEP_SLOTS if site == "local-step" else WINDOW
    f32 = TensorProto.FLOAT
    kv_heads = STEP_KV_HEADS if site == "local-step" else HEADS
    inputs = [helper.make_tensor_value_info("q", f32, [1, HEADS, nq, HEAD_DIM]),
              helper.make_tensor_value_info("k", f32, [1, kv_heads, nk, HEAD_DIM]),
              helper.make_tensor_value_info("v", f32, [1, kv_heads, nk, HEAD_DIM])]
    scale = HEAD_DIM**-0.5
    functions = False
    if flavour == "onnx":
        attrs = {"scale": scale}
        names = ["q", "k", "v"]
        if site == "local":  # what effx.plugins.standard emits for a whole sequence
            attrs |= {"left_window_size": window - 1, "right_window_size": 0 if causal else window - 1,
                      "is_causal": int(causal)}
            if not causal:
                inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, 1, nk]))
                names.append("mask")
        elif site == "local-step":  # the window as a boolean mask over the ring's slots
            inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, nq, nk]))
            names.append("mask")
        else:
            attrs["is_causal"] = 1
        nodes = [helper.make_node("Attention", names, ["y"], **attrs)]
    elif site == "full":  # the decomposed math (Body.softmax_attention: Q scaled first, causal mask)
        body = Body("math")
        inputs += [helper.make_tensor_value_info("q_pos", TensorProto.INT64, [1, "n"]),
                   helper.make_tensor_value_info("k_pos", TensorProto.INT64, [1, "n"])]
        qp, kp, valid = body.positions("q_pos", "k_pos")
        allowed = body.op("And", valid, body.op("LessOrEqual", kp, qp))
        y = body.softmax_attention("q", "k", "v", allowed, scale=body.float_like(scale, "q"))
        body.output(y, "y")
        nodes = body.nodes
    else:  # effx::LocalAttention, with the function body the exporter attaches
        inputs += [helper.make_tensor_value_info("q_pos", TensorProto.INT64, [1, nq]),
                   helper.make_tensor_value_info("k_pos", TensorProto.INT64, [1, nk])]
        nodes = [helper.make_node("LocalAttention", ["q", "k", "v", "q_pos", "k_pos"], ["y"], domain="effx",
                                  window=window, causal=int(causal), scale=scale, softcap=0.0)]
        functions = True
    graph = helper.make_graph(nodes, label.replace(" ", "_"), inputs, [helper.make_tensor_value_info("y", f32, [1, HEADS, nq, HEAD_DIM])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    if functions:
        attach_functions(model, opset)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_linear_graph(flavour: str, opset: int = 27):
    """Causal linear attention (elu features, H = H_kv) from a zero state (a prefill): onnx is ONNX
    LinearAttention-27 with the features, the normaliser column and the [S, z] state around it, traced from
    effx.plugins.linear as the exporter traces a decoder; effx is effx::NormalizedLinearAttentionState with its
    function body (prefix sums: an (N, m, D) state per head)."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from effx.exporter import onnx_export as ox
    from effx.plugins.linear import feature_map, normalized_state_attention_standard

    names = ["q", "k", "v", "s0", "z0"]
    if flavour == "onnx":
        class Site(torch.nn.Module):
            def forward(self, q, k, v, s0, z0):
                phi_q, phi_k = feature_map(q, None, "elu", True), feature_map(k, None, "elu", False)
                return normalized_state_attention_standard(phi_q, phi_k, v, s0, z0, 1e-6)[0]

        example = tuple(torch.zeros(shape) for shape in ((1, HEADS, 16, HEAD_DIM),) * 3 + (
            (1, HEADS, HEAD_DIM, HEAD_DIM), (1, HEADS, HEAD_DIM)))
        n = torch.export.Dim("n", min=2, max=1 << 16)
        model = torch.onnx.export(Site(), example, dynamo=True, opset_version=ox.TRACE_OPSET, input_names=names,
                                  output_names=["y"], dynamic_shapes=({2: n}, {2: n}, {2: n}, None, None),
                                  custom_translation_table=ox.translation_table(), optimize=False, verbose=False,
                                  report=False).model_proto
        ox.raise_opset(model, opset)
        model.ir_version = 10
        assert [x.op_type for x in model.graph.node].count("LinearAttention") == 1
    else:
        f32 = TensorProto.FLOAT
        shapes = [[1, HEADS, "n", HEAD_DIM]] * 3 + [[1, HEADS, HEAD_DIM, HEAD_DIM], [1, HEADS, HEAD_DIM]]
        node = helper.make_node("NormalizedLinearAttentionState", names + [""], ["y", "s", "z"], domain="effx",
                                feature_map="elu", eps=1e-6)
        graph = helper.make_graph([node], "linear", [helper.make_tensor_value_info(x, f32, sh)
                                                     for x, sh in zip(names, shapes, strict=True)],
                                  [helper.make_tensor_value_info("y", f32, [1, HEADS, "n", HEAD_DIM])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        ox.attach_functions(model, opset)
    onnx.checker.check_model(model, full_check=True)
    return model


def feed_for(label: str, flavour: str, n: int) -> dict:
    import numpy as np

    site, causal = SITES[label]
    nq, nk = (1, STEP_SLOTS) if site == "local-step" else (n, n)
    rng = np.random.default_rng(0)
    if site == "linear":  # a prefill: the state starts at zero
        return {x: rng.standard_normal((1, HEADS, n, HEAD_DIM), np.float32) for x in "qkv"} | {
            "s0": np.zeros((1, HEADS, HEAD_DIM, HEAD_DIM), np.float32), "z0": np.zeros((1, HEADS, HEAD_DIM), np.float32)}
    kv_heads = STEP_KV_HEADS if site == "local-step" else HEADS
    feed = {"q": rng.standard_normal((1, HEADS, nq, HEAD_DIM), np.float32),
            "k": rng.standard_normal((1, kv_heads, nk, HEAD_DIM), np.float32),
            "v": rng.standard_normal((1, kv_heads, nk, HEAD_DIM), np.float32)}
    # a decode step at position n - 1 with a ring of nk slots: slot s holds the latest position = s mod nk
    q_pos = np.arange(n - nq, n, dtype=np.int64)[None]
    k_pos = (n - 1 - (n - 1 - np.arange(nk)) % nk)[None].astype(np.int64) if site == "local-step" \
        else np.arange(nk, dtype=np.int64)[None]
    if flavour == "onnx":
        if site == "local" and not causal:
            feed["mask"] = np.ones((1, 1, 1, nk), bool)
        elif site == "local-step":
            feed["mask"] = ((k_pos <= q_pos[..., None]) & (k_pos > q_pos[..., None] - STEP_SLOTS))[:, None]
    else:
        feed["q_pos"], feed["k_pos"] = q_pos, k_pos
    return feed


def run_cell(label: str, flavour: str, n: int, repeats: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from effx.check.measure import PeakRss, percentiles

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_cpu_mem_arena = False
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(build_graph(label, flavour).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    feed = feed_for(label, flavour, n)
    y = session.run(None, feed)[0]  # warm-up
    times = []
    with PeakRss() as peak:
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
    stats = percentiles(times)
    return {"p50_ms": stats["p50_ms"], "p90_ms": stats["p90_ms"], "repeats": repeats,
            "peak_mb": round(peak.peak_mb, 1), "checksum": float(np.abs(y).sum())}


def run_decoder_cell(flavour: str, context: int, steps: int, threads: int) -> dict:
    """A 2-layer local decoder (d_model 512, 8 query heads on 2 KV heads, window 512, ring caches) exported with
    local-step=<flavour>, built for cpu; decode tokens/s after `context` tokens (the host protocol)."""
    import tempfile

    from decode_common import decode_at

    from effx.core.spec import RunSpec
    from effx.exporter import export_model
    from effx.models import build_model
    from effx.targets.api import build

    spec = RunSpec.parse({"model": {"family": "decoder", "vocab_size": 4096, "d_model": 512, "n_heads": HEADS,
                                    "n_kv_heads": STEP_KV_HEADS, "n_layers": 2, "d_ff": 2048,
                                    "max_seq_len": context + steps + 1},
                          "attention": {"kind": "local", "window": STEP_SLOTS}, "kv_cache": {"layout": "ring"}})
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_model(build_model(spec), work / "onnx", attention_ops=f"local-step={flavour}")
        build(work / "onnx", target="cpu", out_dir=work / "cpu")
        row = decode_at(work / "cpu", [context], steps, threads)[0]
    return {"p50_ms": row["step_p50_ms"], "tokens_per_s": row["decode_tokens_per_s"], "steps": steps,
            "context": context}


def _cell_in_subprocess(label: str, flavour: str, n: int, repeats: int, threads: int, cap_gb: float) -> dict:
    here, cap = str(Path(__file__).parent), int(cap_gb * 2**30)
    code = (f"import json, resource, sys; sys.path.insert(0, {here!r});"
            f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}));"
            "from attention_flavours import run_cell, run_decoder_cell;"
            + (f"print('RESULT', json.dumps(run_decoder_cell({flavour!r}, {n}, {repeats}, {threads})))"
               if label == DECODER else
               f"print('RESULT', json.dumps(run_cell({label!r}, {flavour!r}, {n}, {repeats}, {threads})))"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    oom = ("bad_alloc", "MemoryError", "Failed to allocate", "not enough memory", "Cannot allocate memory")
    if any(s in proc.stderr for s in oom) or proc.returncode in (-9, 137):
        return {"oom": True, "error": tail, "mem_cap_gb": cap_gb}
    return {"error": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="1024,4096,16384")
    ap.add_argument("--full-seq", default="1024,4096", help="n for full attention (n x n scores either way)")
    ap.add_argument("--decode-context", type=int, default=1024, help="context before the timed decode steps")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated cell labels to run (default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two flavours this many times per cell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gb", type=float, default=8.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_flavours.json"))
    args = ap.parse_args()
    from effx.check.measure import environment

    load_start, started = os.getloadavg(), time.time()
    results: dict[str, dict[str, dict]] = {}
    previous = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).exists() else None
    if previous:  # --only re-measures some cells and keeps the others of --out
        results = previous["results"]
    plan = [(label, n) for n in map(int, args.seq.split(",")) for label in ("local encoder", "local causal prefill")]
    plan += [("local decode step", STEP_SLOTS), (DECODER, args.decode_context)]
    plan += [("full causal prefill", n) for n in map(int, args.full_seq.split(","))]
    plan += [("linear causal prefill", n) for n in map(int, args.seq.split(","))]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    for label, n in (p for p in plan if not only or p[0] in only):
        repeats = 5 if n <= 1024 else 3
        repeats = {"local decode step": 50, DECODER: args.decode_steps}.get(label, repeats)
        rounds: dict[str, list[dict]] = {"onnx": [], "effx": []}
        for _ in range(args.rounds):  # the two flavours alternate, so load drift on a shared machine hits both
            for flavour in rounds:
                cell = _cell_in_subprocess(label, flavour, n, repeats, args.threads, args.mem_cap_gb)
                rounds[flavour].append(cell)
                print(f"{label:<22} n={n:>6} {flavour:<5} {json.dumps(cell)}", flush=True)
        for flavour, cells in rounds.items():  # the least disturbed round; every round's p50 is kept
            timed = [c for c in cells if "p50_ms" in c]
            best = min(timed, key=lambda c: c["p50_ms"]) if timed else cells[0]
            results.setdefault(label, {}).setdefault(str(n), {})[flavour] = best | (
                {"p50_ms_rounds": [c["p50_ms"] for c in timed]} if len(timed) > 1 else {})
    lines = ["| site | n | ONNX op: p50 ms / peak MB | effx body: p50 ms / peak MB | effx/onnx time | faster |",
             "|---|---|---|---|---|---|"]
    for label, by_n in results.items():
        for n, cells in by_n.items():
            def fmt(c):
                if "p50_ms" in c:
                    mem = f"{c['peak_mb']:.0f}" if "peak_mb" in c else "-"
                    rate = f" ({c['tokens_per_s']:.1f} tok/s)" if "tokens_per_s" in c else ""
                    return f"{c['p50_ms']:.1f} / {mem}{rate}"
                return f"OOM (> {c['mem_cap_gb']:g} GB)" if c.get("oom") else "error"
            a, b = cells["onnx"], cells["effx"]
            ratio = f"{b['p50_ms'] / a['p50_ms']:.2f}x" if "p50_ms" in a and "p50_ms" in b else "-"
            faster = ("onnx" if b["p50_ms"] > a["p50_ms"] else "effx") if ratio != "-" else \
                ("effx" if "p50_ms" in b else "onnx" if "p50_ms" in a else "-")
            lines.append(f"| {label} | {n} | {fmt(a)} | {fmt(b)} | {ratio} | {faster} |")
    table = "\n".join(lines)
    print(table)
    load_end = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "attention_flavours",
        # every run whose cells the file holds (--only keeps the other cells of earlier runs)
        "commands": (previous.get("commands", []) if previous else [])
        + [" ".join(["python benchmarks/attention_flavours.py", *(repr(a) if " " in a else a for a in sys.argv[1:])])],
        "setting": f"one attention op, {HEADS} heads x {HEAD_DIM}, batch 1, window {WINDOW} (decode step: "
                   f"{HEADS}:{STEP_KV_HEADS} GQA, ring of {STEP_SLOTS} slots), ONNX Runtime CPU EP, {args.threads} "
                   f"threads, memory arena off; '{DECODER}': a 2-layer local decoder built for cpu, decode step "
                   f"p50 and tokens/s after {args.decode_context} tokens",
        "environment": environment() | {"threads": args.threads},
        "load_average_1_5_15": {"start": load_start, "end": load_end}
        | ({"earlier_runs": previous.get("load_average_1_5_15")} if previous else {}),
        "wall_s": round(time.time() - started, 1),
        "results": results,
        "table_markdown": table,
    }, indent=2) + "\n")
    print(f"wrote {out}  (load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f})")


if __name__ == "__main__":
    main()
