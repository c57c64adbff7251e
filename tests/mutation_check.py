"""Mutation check: do the tests catch one-line bugs in the core math? (On demand, not in CI.)

Each row of MUTATIONS is a one-line change of a file (the text to find, exactly once, and its replacement)
and the tests that must catch it. For each row the script applies the change in place, runs those tests
(`pytest -x -q` in a subprocess), restores the file (always, also on Ctrl-C), and reports CAUGHT when the
tests fail or MISSED when they pass. A row whose text is no longer in its file is reported STALE: update
the table when the code moves. Run it before resolving a numerics issue:

    python -m tests.mutation_check                 # every row
    python -m tests.mutation_check ring scale      # rows whose name contains any of these words
    python -m tests.mutation_check --json out.json # also write the table as JSON

It refuses to run on files with uncommitted changes (so a restore never hides your work).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = "tests/models"
EXPORT = "tests/exporter/test_export.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("ring cache: slot position off by one", "models/attention.py",
             "slot_pos = end - _mod(end - slot, c)", "slot_pos = end + 1 - _mod(end - slot, c)",
             (MODELS,)),
    Mutation("local ONNX body: symmetric window edge < -> <=", "plugins/onnx_body.py",
             'ok = self.op("Less", self.op("Abs", self.op("Sub", qp, kp)), window)',
             'ok = self.op("LessOrEqual", self.op("Abs", self.op("Sub", qp, kp)), window)',
             (MODELS, f"{EXPORT}::test_encoder_matches_pytorch")),
    Mutation("Linformer: padded keys/values not zeroed", "models/linformer.py",
             "k, v = k * m, v * m  # (B,H,N,D), padding rows zeroed", "k, v = k, v",
             (MODELS, f"{EXPORT}::test_encoder_matches_pytorch")),
    Mutation("attention scale 1% off", "models/attention.py",
             "else self.head_dim**-0.5", "else self.head_dim**-0.5 * 1.01", (MODELS,)),
    Mutation("local (torch): causal window edge > -> >=", "plugins/local.py",
             "return valid & (kp <= qp) & (kp > qp - window)", "return valid & (kp <= qp) & (kp >= qp - window)",
             (MODELS,)),
    Mutation("local (torch): symmetric window edge < -> <=", "plugins/local.py",
             "return valid & ((qp - kp).abs() < window)", "return valid & ((qp - kp).abs() <= window)", (MODELS,)),
    Mutation("block-sparse: causal local blocks < -> <=", "plugins/block_sparse.py",
             "allowed = (diff >= 0) & (diff < local_blocks)", "allowed = (diff >= 0) & (diff <= local_blocks)",
             (MODELS,)),
    Mutation("block-sparse: global query rows dropped (encoders)", "plugins/block_sparse.py",
             "allowed = allowed | (kb < global_blocks) | (qb < global_blocks)", "allowed = allowed | (kb < global_blocks)",
             (MODELS,)),
    Mutation("RoPE: rotate-half sign flipped", "models/blocks.py",
             "rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)",
             "rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)", (MODELS,)),
    Mutation("GQA: query head h reads KV head h % H_kv instead of h // groups", "plugins/common.py",
             "return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)",
             "return x if n_rep == 1 else x.repeat(1, n_rep, 1, 1)", (MODELS,)),
    Mutation("padding mask ignored (softmax kinds)", "models/attention.py",
             "k_pos = positions if key_mask is None else torch.where(key_mask.bool(), positions, -1)",
             "k_pos = positions", (MODELS,)),
    Mutation("linear: padded keys not removed from the sums", "plugins/linear.py",
             "phi_k = phi_k * k_valid[:, None, :, None].to(phi_k.dtype)  # padding leaves both sums",
             "phi_k = phi_k", (MODELS,)),
    Mutation("linear (causal): normaliser sums over every key (future leak)", "plugins/linear.py",
             "z = z0[:, :, None] + phi_k.cumsum(2)  # (B,H_kv,N,m): z_i",
             "z = z0[:, :, None] + phi_k.sum(2, keepdim=True)", (MODELS,)),
    Mutation("hourglass: causal shift k - 1 -> k - 2 (future leak)", "models/hierarchical.py",
             "shift = k - 1 if causal else 0", "shift = max(k - 2, 0) if causal else 0", (MODELS,)),
    Mutation("hourglass: upsampling reads the group after (future leak)", "models/hierarchical.py",
             "group = outer.q_pos // k - (j[:, None] - 1)", "group = (outer.q_pos + 1) // k - (j[:, None] - 1)",
             (MODELS,)),
    Mutation("paged cache: written one row too far", "models/attention.py",
             "blocks, offsets = block_table.gather(1, pos // bs), pos % bs",
             "blocks, offsets = block_table.gather(1, pos // bs), (pos + 1) % bs", (MODELS,)),
    Mutation("full attention (math path): no causal mask in decoders", "models/full.py",
             "            allowed = causal_allowed(q_pos, k_pos)",
             "            allowed = split_positions(q_pos, k_pos)[2]", (MODELS,)),
    Mutation("soft-capping: tanh(s/c) c -> tanh(s) c", "plugins/common.py",
             "scores = torch.tanh(scores / softcap) * softcap", "scores = torch.tanh(scores) * softcap", (MODELS,)),
    Mutation("Gemma RMSNorm: (1 + w) -> w", "models/blocks.py",
             "* (1.0 + self.weight.float())", "* self.weight.float()", (MODELS,)),
    Mutation("query scale: model.attn_scale ignored", "models/attention.py",
             "self.scale = m.attn_scale if m.attn_scale is not None else self.head_dim**-0.5",
             "self.scale = self.head_dim**-0.5", (MODELS,)),
    Mutation("RoPE per layer type: every layer takes the first base", "models/transformer.py",
             "Block(spec, i, self.ropes[rope_of[i]] if rope_of else None, self.shared)",
             "Block(spec, i, self.ropes[0] if rope_of else None, self.shared)", (MODELS,)),
    Mutation("Qwen2 schedule: max_window_layers off by one", "models/hf_decoders.py",
             "return [SLIDING if on and i >= first else \"full_attention\" for i in range(n)]",
             "return [SLIDING if on and i > first else \"full_attention\" for i in range(n)]", (MODELS,)),
    Mutation("q/k norms dropped", "models/attention.py",
             "            q, k = self.q_norm(q), self.k_norm(k)\n        rope = self._rope[0]",
             "            pass\n        rope = self._rope[0]", (MODELS,)),
    Mutation("Attention-25 export: causal left window w - 1 -> w", "models/local.py",
             "return onnx_attention(q, k, v, mask, self.causal, self.window - 1, 0 if self.causal else self.window - 1,",
             "return onnx_attention(q, k, v, mask, self.causal, self.window, 0 if self.causal else self.window - 1,",
             ("tests/exporter/test_attention_flavours.py",)),
    Mutation("LinearAttention-27 export: normaliser column read one column early", "plugins/linear.py",
             "return y[..., :d] / (y[..., d:] + eps), state[..., :d], state[..., d]",
             "return y[..., :d] / (y[..., d - 1:d] + eps), state[..., :d], state[..., d]",
             ("tests/exporter/test_linear_attention_27.py",)),
    Mutation("Hedgehog: softmax(-xW) half -> softmax(xW)", "models/linear.py",
             "return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)",
             "return torch.cat([proj.softmax(-1), proj.softmax(-1)], -1)", (f"{MODELS}/test_oracle.py",)),
    Mutation("hourglass: decode_fine on a step that completes a group", "effx/core/protocol.py",
             "if self.first_ratio and new_tokens == 1 and self.position % int(self.first_ratio):",
             "if self.first_ratio and new_tokens == 1 and (self.position + 1) % int(self.first_ratio):",
             (f"{EXPORT}::test_decoder_prefill_then_decode_matches_pytorch",)),
    Mutation("adapt: Linformer prefix start one position late", "models/adapt.py",
             "p[torch.arange(k), torch.arange(k)] = 1.0", "p[torch.arange(k), torch.arange(1, k + 1)] = 1.0",
             (f"{MODELS}/test_adapt.py",)),
    Mutation("adapt: cosine schedule stops halfway down", "models/adapt.py",
             "math.cos(math.pi * step / (planned - 1))", "math.cos(math.pi * step / (2 * (planned - 1)))",
             (f"{MODELS}/test_adapt.py",)),
    Mutation("ONNX masked softmax: Q scaled twice", "plugins/onnx_body.py",
             'qs = self.op("Mul", q, scale if scale is not None else self.attr_float_like(scale_attr, q))',
             'qs = self.op("Mul", self.op("Mul", q, scale if scale is not None else self.attr_float_like(scale_attr, q)), '
             'scale if scale is not None else self.attr_float_like(scale_attr, q))',
             (f"{EXPORT}::test_encoder_matches_pytorch",)),
]


def _dirty(files: set[str]) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *sorted(files)], cwd=ROOT, capture_output=True,
                         text=True).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def run(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    path = ROOT / mutation.file
    original = path.read_text()
    if original.count(mutation.find) != 1:
        return "STALE", 0.0, f"the text to mutate occurs {original.count(mutation.find)} times"
    t0 = time.perf_counter()
    try:
        path.write_text(original.replace(mutation.find, mutation.replace))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status = "MISSED" if proc.returncode == 0 else "CAUGHT"
        failed = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")), "")
        detail = failed.removeprefix("FAILED ").split(" - ")[0] if failed else proc.stdout.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        status, detail = "TIMEOUT", f"over {timeout:.0f} s"
    finally:
        path.write_text(original)
    return status, time.perf_counter() - t0, str(detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("words", nargs="*", help="only rows whose name contains one of these")
    parser.add_argument("--json", type=Path, help="write the table as JSON here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    args = parser.parse_args()
    rows = [m for m in MUTATIONS if not args.words or any(w.lower() in m.name.lower() for w in args.words)]
    dirty = _dirty({m.file for m in rows})
    if dirty:
        print(f"refusing: uncommitted changes in {', '.join(dirty)} (commit or stash them first)")
        return 2
    results = []
    print("| mutation | file | caught? | first failing test | s |\n|---|---|---|---|---|", flush=True)
    for m in rows:
        status, seconds, detail = run(m, args.timeout)
        results.append({"name": m.name, "file": m.file, "status": status, "detail": detail, "seconds": round(seconds)})
        print(f"| {m.name} | {m.file} | {status} | {detail} | {seconds:.0f} |", flush=True)
    caught = sum(r["status"] == "CAUGHT" for r in results)
    print(f"\n{caught} of {len(results)} caught")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
