"""The main job: run spec -> model/ -> onnx/ -> build/<target>/ -> a numerics check against PyTorch.
Each stage writes its own folder under the output and reads only the folder of the stage before it, so any
stage can be rerun alone (`effx export --model OUT/model`, `effx build OUT/onnx`, ...)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from effx.atomic import atomic_dir
from effx.errors import ValidationFailed
from effx.spec import RunSpec

# Agreement required between the built artifact and PyTorch, by precision (max abs error on outputs of
# magnitude ~1, cosine similarity): fp32 differs only by operation order; fp16 keeps ~3 decimal digits;
# int8 is judged by direction (cosine), its absolute error scales with each tensor's range.
TOLERANCE = {"fp32": (1e-4, 0.99999), "fp16": (2e-2, 0.9999), "bf16": (1e-1, 0.999), "int8": (1.0, 0.98),
             "fp8": (1.0, 0.98), "int4w": (1.0, 0.95)}


@dataclass
class PipelineResult:
    output: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    passed: bool = True

    def summary(self) -> str:
        lines = [f"effx run -> {self.output}"]
        for name, info in self.stages.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def forward_check(model, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """One forward pass (and, for decoders with a cache, a prompt + decode step) on seeded random tokens."""
    import torch

    spec = model.spec
    seq = min(seq, spec.model.max_seq_len)
    ids = torch.randint(0, spec.model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    info: dict[str, Any] = {}
    with torch.inference_mode():
        model(ids[:, :2])  # warm-up (the first custom-op call imports torch._dynamo)
        t0 = time.perf_counter()
        out = model(ids)
        info["forward_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        info["output"] = f"{'last_hidden_state' if spec.model.family == 'encoder' else 'logits'}{tuple(out.shape)}"
        if spec.model.family == "decoder" and spec.kv_cache.layout != "none" and seq >= 2:
            cache = model.empty_cache(batch)
            logits, cache = model.step(ids[:, :-1], cache)
            last, cache = model.step(ids[:, -1:], cache)
            info["decode_max_abs_err"] = float((torch.cat([logits, last], 1) - out).abs().max())
            info["cache_bytes"] = cache.nbytes()
    return info


def check_build(model, build_dir: Path, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """Run the built ONNX Runtime artifact and the PyTorch model on the same tokens and compare."""
    import onnxruntime as ort
    import torch

    from effx.manifest import Manifest

    manifest = Manifest.read(build_dir)
    info = manifest.build
    spec = model.spec
    seq = min(seq, spec.model.max_seq_len)
    ids = torch.randint(0, spec.model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + 1))

    def session(name: str):
        return ort.InferenceSession(str(build_dir / info.graphs[name].file), providers=["CPUExecutionProvider"])

    t0 = time.perf_counter()
    if "model" in info.graphs and spec.model.family == "encoder":
        mask = np.ones(ids.shape, np.int64)
        got = session("model").run(None, {"input_ids": ids.numpy(), "attention_mask": mask})[0]
    elif "model" in info.graphs:
        got = session("model").run(None, {"input_ids": ids.numpy()})[0]
    else:  # prefill half the tokens, decode the rest one by one, feeding the cache back
        got = ort_decode_loop(session("prefill"), session("decode"), manifest, ids.numpy(), max(1, seq // 2))
    ort_ms = (time.perf_counter() - t0) * 1e3
    with torch.inference_mode():
        ref = model(ids).numpy()
    a, b = got.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    max_abs = float(np.abs(a - b).max())
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    tol_abs, tol_cos = TOLERANCE[info.precision]
    return {"precision": info.precision, "max_abs_err": f"{max_abs:.2e}", "cosine": round(cosine, 6),
            "tolerance": f"max_abs<={tol_abs}, cosine>={tol_cos}", "ort_ms": round(ort_ms, 1),
            "passed": max_abs <= tol_abs and cosine >= tol_cos}


def ort_decode_loop(prefill, decode, manifest, ids: np.ndarray, prompt: int,
                    block_table: np.ndarray | None = None) -> np.ndarray:
    """Drive ONNX Runtime sessions of the prefill and decode graphs as a host would, following the manifest's
    cache plan: prefill `prompt` tokens, then decode the rest one by one. Returns logits (B, N, V)."""
    plan = manifest.kv_cache
    batch, n = ids.shape
    feed: dict[str, np.ndarray] = {"input_ids": ids[:, :prompt]}
    table = None
    if plan.layout == "paged":
        from effx.targets.ort_build import _paged_controls

        controls = _paged_controls(plan, batch, n, prompt)
        table = controls["block_table"] if block_table is None else block_table
        feed |= controls | {"block_table": table} | {t.input: np.zeros(t.shape, np.float32) for t in plan.tensors}
    names = [o.name for o in prefill.get_outputs()]
    outs = prefill.run(None, feed)
    logits = [outs[0]]
    state = {k.replace("present.", "past.", 1): v for k, v in zip(names[1:], outs[1:], strict=True)}
    for t in range(prompt, n):
        step = {"input_ids": ids[:, t:t + 1], "past_lengths": np.full(batch, t, np.int64)} | state
        if table is not None:
            step |= {"new_lengths": np.ones(batch, np.int64), "block_table": table}
        outs = decode.run(None, step)
        logits.append(outs[0])
        state = {k.replace("present.", "past.", 1): v for k, v in zip(names[1:], outs[1:], strict=True)}
    return np.concatenate(logits, axis=1)


def run_pipeline(spec: RunSpec, output: Path, batch: int = 2, seq: int = 16, console=None, overwrite: bool = True,
                 target: str = "cpu", precision: str = "fp32", opset: int = 23,
                 progress: Callable[[str], None] | None = None) -> PipelineResult:
    """model/ -> onnx/ -> build/<target>/ and a check of the build against PyTorch. Raises ValidationFailed
    (exit code 1) when the build disagrees beyond the precision's tolerance; the folders stay for inspection."""
    from effx.exporter import export_model
    from effx.models import build_model, save_model
    from effx.spec_toml import spec_to_commented_toml
    from effx.targets.api import build
    from effx.targets.precision import check_request
    from effx.targets.profiles import get_target

    say = progress or (lambda _m: None)
    profile = get_target(target)
    check_request(profile, precision)
    output = Path(output)
    result = PipelineResult(output)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        say("model")
        model = build_model(spec)
        save_model(model, tmp / "model")
        (tmp / "spec.toml").write_text(spec_to_commented_toml(spec))
        result.stages["model"] = {"attention": spec.attention.kind, "family": spec.model.family,
                                  "parameters": sum(p.numel() for p in model.parameters())}
        result.stages["forward"] = forward_check(model, batch, seq, seed=spec.model.seed)
        say("export")
        manifest = export_model(model, tmp / "onnx", opset=opset, progress=say)
        result.stages["export"] = {"graphs": ", ".join(g.file for g in manifest.graphs.values()),
                                   "custom_ops": ", ".join(f"{c.count}x {c.op_type}" for c in manifest.custom_ops) or "none"}
        say(f"build {profile.name}")
        built = build(tmp / "onnx", profile.name, precision, out_dir=tmp / "build" / profile.name, progress=say)
        result.stages["build"] = {"target": profile.name, "engine_built": built.build.engine_built,
                                  "folder": f"build/{profile.name}/"}
        if profile.backend == "ort":
            say("check against PyTorch")
            check = check_build(model, tmp / "build" / profile.name, batch, seq, seed=spec.model.seed)
            result.passed = bool(check.pop("passed"))
            result.stages["check"] = check
        else:
            result.stages["check"] = {"skipped": built.build.reason}
    if not result.passed:
        raise ValidationFailed(f"{output}/build/{target} disagrees with PyTorch beyond the {precision} tolerance "
                               f"({result.stages['check']}); see the folders under {output}")
    return result
