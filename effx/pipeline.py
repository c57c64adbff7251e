"""The main job: run spec -> model -> (export -> build -> validate). Each stage writes its own folder under
the output and reads only the folder of the stage before it, so any stage can be rerun alone."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effx.atomic import atomic_dir
from effx.spec import RunSpec


@dataclass
class PipelineResult:
    output: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"effx run -> {self.output}"]
        for name, info in self.stages.items():
            details = ", ".join(f"{k}={v}" for k, v in info.items())
            lines.append(f"  {name}: {details}")
        return "\n".join(lines)


def forward_check(model, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """One forward pass (and, for decoders with a cache, a prompt + decode step) on seeded random tokens."""
    import torch

    spec = model.spec
    seq = min(seq, spec.model.max_seq_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.model.vocab_size, (batch, seq), generator=g)
    info: dict[str, Any] = {}
    with torch.inference_mode():
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


def run_pipeline(spec: RunSpec, output: Path, batch: int = 2, seq: int = 16, console=None,
                 overwrite: bool = True) -> PipelineResult:
    from effx.models import build_model, save_model

    output = Path(output)
    result = PipelineResult(output)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        model = build_model(spec)
        save_model(model, tmp / "model")
        (tmp / "spec.toml").write_text(_spec_toml(spec))
        params = sum(p.numel() for p in model.parameters())
        result.stages["model"] = {"attention": spec.attention.kind, "family": spec.model.family,
                                  "parameters": params, "folder": "model/"}
        result.stages["forward"] = forward_check(model, batch, seq, seed=spec.model.seed)
    return result


def _spec_toml(spec: RunSpec) -> str:
    from effx.spec_toml import spec_to_commented_toml

    return spec_to_commented_toml(spec)
