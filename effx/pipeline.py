"""The main job: run spec -> model/ -> onnx/ -> build/<target>/ -> report/ (effx validate against PyTorch).
Each stage writes its own folder under the output and reads only the folder of the stage before it, so any
stage can be rerun alone (`effx export --model OUT/model`, `effx build OUT/onnx`, ...)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effx.check.report import ValidationReport
from effx.check.validate import ValidateOptions, validate
from effx.core.atomic import atomic_dir, check_output_dir
from effx.core.errors import ValidationFailed
from effx.core.flavours import format_attention_ops
from effx.core.options import BuildOptions, ExportOptions
from effx.core.spec import RunSpec
from effx.core.spec_toml import spec_to_commented_toml
from effx.exporter import export_model
from effx.models import build_model, save_model
from effx.targets.api import build as build_folder
from effx.targets.precision import check_request
from effx.targets.profiles import get_target


@dataclass
class PipelineResult:
    output: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    passed: bool = True
    report: ValidationReport | None = None  # the validation of the build, when an engine was built

    def summary(self) -> str:
        lines = [f"effx run -> {self.output}"]
        for name, info in self.stages.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def forward_check(model, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """One forward pass (and, for decoders with a cache, a prompt + decode step) on seeded random tokens."""
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


def run_pipeline(spec: RunSpec, output: str | Path, export: ExportOptions | None = None,
                 build: BuildOptions | None = None, batch: int = 2, seq: int = 16, overwrite: bool = False,
                 progress: Callable[[str], None] | None = None, model=None) -> PipelineResult:
    """model/ -> onnx/ -> build/<target>/ and a check of the build against PyTorch (report/). `model` is the
    imported or loaded model to use instead of the spec's seeded initialisation. Refuses before any work what
    cannot work; raises ValidationFailed (exit code 1) when the build disagrees beyond the precision's
    tolerance (the folders stay for inspection)."""
    say = progress or (lambda _m: None)
    export, build = export or ExportOptions(), build or BuildOptions()
    profile = get_target(build.target)
    check_request(profile, build.precision, build.dla_core)
    output = Path(output)
    check_output_dir(output, "run", overwrite)
    result = PipelineResult(output)
    with atomic_dir(output, "run", overwrite=overwrite) as tmp:
        say("model")
        model = model if model is not None else build_model(spec)
        save_model(model, tmp / "model")
        (tmp / "spec.toml").write_text(spec_to_commented_toml(spec))
        result.stages["model"] = {"attention": spec.attention_summary(), "family": spec.model.family,
                                  "parameters": sum(p.numel() for p in model.parameters())}
        result.stages["forward"] = forward_check(model, batch, seq, seed=spec.model.seed)
        say("export")
        # the target's op flavours, measured on its runtime; --attention-ops replaces the sites it names
        attention_ops = format_attention_ops(profile.attention_ops(export.attention_ops))
        manifest = export_model(model, tmp / "onnx", **(export.model_dump() | {"attention_ops": attention_ops}),
                                progress=say)
        result.stages["export"] = {"graphs": ", ".join(g.file for g in manifest.graphs.values()),
                                   "custom_ops": ", ".join(f"{c.count}x {c.op_type}" for c in manifest.custom_ops) or "none"}
        say(f"build {profile.name}")
        built = build_folder(tmp / "onnx", **(build.model_dump() | {"target": profile.name}),
                             out_dir=tmp / "build" / profile.name, progress=say)
        result.stages["build"] = {"target": profile.name, "precision": build.precision,
                                  "engine_built": built.build.engine_built, "folder": f"build/{profile.name}/"}
    if built.build.engine_built:  # validated in place, after the rename: the report names the final folders
        check_seq = min(max(seq, 2 if spec.model.family == "decoder" else 1), spec.model.max_seq_len)
        report = validate(output / "build" / profile.name, ValidateOptions(seqs=[check_seq], batches=[batch], iters=10),
                          output=output / "report", progress=say, raise_on_fail=False)
        result.report = report
        result.passed = report.passed
        result.stages["validate"] = {"verdict": report.verdict(), "report": f"{output / 'report'}/report.md"}
    else:
        result.stages["validate"] = {"skipped": built.build.reason}
    if not result.passed:
        raise ValidationFailed(f"{output}/build/{profile.name} disagrees with PyTorch beyond the {build.precision} "
                               f"tolerance ({result.report.failure_summary()}); see {output / 'report'}/report.md")
    return result
