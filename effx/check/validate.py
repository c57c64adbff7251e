"""`effx validate`: run a built artifact and the PyTorch reference on the same inputs and say how far apart
they are, and where they part.

1. Numerics per output (max abs / rel, mean, cosine, share over tolerance; tolerance by precision from
   effx.core.tolerance); decoders are driven prefill + decode step by step through the host protocol
   (effx.core.protocol; teacher-forced logits per step) and also generate greedily, comparing tokens.
2. On failure, the first diverging block (effx.check.divergence).
3. Latency (warm-up, then p50/p90/p99, mean, throughput) and peak memory of the runner and the reference,
   with the environment they ran in (effx.check.measure).
4. report.json (effx.check.report schema), report.md, PNG plots; exit code 1 on FAIL.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from effx.check.divergence import find_divergence
from effx.check.measure import PeakRss, environment, measure
from effx.check.reference import TorchRunner, load_reference
from effx.check.report import (
    CaseCheck,
    DecodeCheck,
    Latency,
    Memory,
    OutputCheck,
    ValidationReport,
    write_plots,
    write_report,
)
from effx.core.atomic import atomic_dir, check_output_dir
from effx.core.errors import SpecError, ValidationFailed
from effx.core.lazy import has_module
from effx.core.manifest import Manifest
from effx.core.protocol import decode_loop, greedy
from effx.core.runner import Runner
from effx.core.tolerance import Tolerance, agreement, pooled_agreement, tolerance_for
from effx.models.hf_import import import_hf
from effx.targets.api import open_runner
from effx.targets.calib import TEXT_PREFIX, TextTokens

Say = Callable[[str], None]


@dataclass
class Case:
    feed: dict[str, np.ndarray]  # input_ids (+ attention_mask for encoders)
    text: bool = False  # real text: encoders are judged as sentence embeddings too

    @property
    def batch(self) -> int:
        return int(self.feed["input_ids"].shape[0])

    @property
    def seq(self) -> int:
        return int(self.feed["input_ids"].shape[1])


# --------------------------------------------------------------------------------------------------- inputs
def make_cases(manifest: Manifest, inputs: str, seqs: list[int], batches: list[int], seed: int = 0,
               folder: Path | None = None, tokenizer_dir: Path | None = None,
               text: TextTokens | None = None) -> list[Case]:
    """The inputs of each check: random tokens per (batch, seq), an .npz, or `text:FILE` packed into
    (batch, seq) sequences with the model's tokenizer (the one of `tokenizer_dir`, else of the HF folder the
    export came from, else bytes; effx.targets.calib), taken from other windows of the text than calibration."""
    spec = manifest.spec["model"]
    encoder = manifest.family == "encoder"
    if inputs.startswith(TEXT_PREFIX) and text is None:
        text = TextTokens.load(manifest, inputs[len(TEXT_PREFIX):], folder, what="--inputs", tokenizer_dir=tokenizer_dir)
    if inputs != "random" and text is None:
        path = Path(inputs)
        if not path.is_file():
            raise SpecError(f"--inputs {inputs}: no such file; pass `random`, text:FILE or an .npz with input_ids (B, N)")
        try:
            data = np.load(path)
            ids = np.asarray(data["input_ids"], np.int64)
        except Exception as exc:
            raise SpecError(f"--inputs {inputs}: cannot read input_ids from it ({exc.__class__.__name__}); "
                            "write it with numpy.savez(path, input_ids=ids)") from None
        if ids.ndim != 2 or ids.min() < 0 or ids.max() >= spec["vocab_size"]:
            raise SpecError(f"--inputs {inputs}: input_ids must be (batch, seq) tokens in [0, {spec['vocab_size']})")
        feed = {"input_ids": ids}
        if encoder:
            feed["attention_mask"] = np.asarray(data["attention_mask"], np.int64) if "attention_mask" in data \
                else np.ones_like(ids)
        return [Case(feed)]
    cases = []
    rng = np.random.default_rng(seed)
    for batch in batches:
        for seq in seqs:
            if seq > spec["max_seq_len"] or seq < (1 if encoder else 2):
                raise SpecError(f"--seq {seq} is outside 1..{spec['max_seq_len']} (model.max_seq_len)"
                                + ("" if encoder else "; decoders need >= 2 (a prompt and a step)"))
            ids = rng.integers(0, spec["vocab_size"], (batch, seq), dtype=np.int64) if text is None \
                else text.sequences(batch, seq, part=1)
            feed = {"input_ids": ids}
            if encoder:
                mask = np.ones_like(ids)
                if batch > 1 and seq > 2:
                    mask[-1, seq - seq // 4:] = 0  # one padded row, so the mask path is checked too
                feed["attention_mask"] = mask
            cases.append(Case(feed, text=text is not None))
    return cases


# ------------------------------------------------------------------------------------------------- numerics
def _check(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> OutputCheck:
    a = agreement(got, ref, tol)
    return OutputCheck(name=name, shape=list(got.shape), **a.as_dict())


def _encoder_case(runner: Runner, reference: TorchRunner, case: Case, tol: Tolerance, errors: dict) -> CaseCheck:
    graph = runner.graphs[0]
    feed = case.feed
    got, ref = runner.infer(feed, graph), reference.infer(feed, graph)
    checks = []
    for name in reference.output_names(graph):
        g, r = got[name], ref[name]
        if "attention_mask" in feed and g.ndim == 3:  # padded positions carry no meaning: compare tokens only
            keep = feed["attention_mask"].astype(bool)
            g, r = g[keep], r[keep]
        checks.append(_check(name, g, r, tol))
        if g.shape == r.shape:
            errors.setdefault(name, np.abs(g.astype(np.float64) - r))
        if case.text and got[name].ndim == 3 and got[name].shape == ref[name].shape:
            # what a sentence-embedding user sees: the mean over each row's unpadded tokens
            mask = feed.get("attention_mask", np.ones(got[name].shape[:2], np.int64))
            pooled = pooled_agreement(got[name], ref[name], mask, tol)
            checks.append(OutputCheck(name=f"{name} mean-pooled (real text, cosine >= {tol.min_pooled_cosine:g})",
                                      shape=[got[name].shape[0], got[name].shape[2]], **pooled.as_dict()))
    return CaseCheck(batch=case.batch, seq=case.seq, outputs=checks, passed=all(c.passed for c in checks))


def _decoder_case(runner: Runner, reference: TorchRunner, manifest: Manifest, case: Case, tol: Tolerance,
                  steps: int, errors: dict) -> CaseCheck:
    ids = case.feed["input_ids"]
    n = ids.shape[1]
    prompt = max(1, n // 2)
    got = decode_loop(runner.infer, manifest, ids, prompt)
    whole = reference.logits(ids)  # the model's own whole-sequence forward
    got_all = np.concatenate(got, axis=1)
    checks = [_check("logits (prefill)", got[0], whole[:, :prompt], tol)]
    if n > prompt:
        checks.append(_check("logits (decode steps)", got_all[:, prompt:], whole[:, prompt:], tol))
    errors.setdefault("logits", np.abs(got_all.astype(np.float64) - whole))
    starts = [0, *range(prompt, n)]  # each step's logits against the same positions of the whole forward
    step_err = [float(np.abs(g - whole[:, t:t + g.shape[1]]).max()) for g, t in zip(got, starts, strict=True)]
    max_len = manifest.spec["model"]["max_seq_len"]
    n_new = max(1, min(steps, max_len - prompt))
    tokens = greedy(runner.infer, manifest, ids[:, :prompt], n_new)
    ref_tokens = greedy(reference.infer, manifest, ids[:, :prompt], n_new)
    same = tokens == ref_tokens
    first_miss = np.where(same.all(1), n_new, np.argmin(same, axis=1))
    agreement_share = float(first_miss.mean() / n_new)
    decode = DecodeCheck(prompt=prompt, steps=n - prompt, step_max_abs=step_err, greedy_steps=n_new,
                         greedy_agreement=agreement_share, greedy_passed=agreement_share >= tol.min_greedy)
    return CaseCheck(batch=case.batch, seq=n, outputs=checks, decode=decode,
                     passed=all(c.passed for c in checks) and decode.greedy_passed)


def _drift(model, cases: list[Case], manifest: Manifest, say: Say) -> list[OutputCheck]:
    """For an imported model whose attention was swapped: how far the reference itself has moved from the
    original (full-attention) model on the same inputs. Informational: swapped models need fine-tuning."""
    origin = getattr(model, "origin", None)
    if not origin or "hf" not in origin or model.spec.attention_summary() == origin.get("attention", "full"):
        return []
    say("drift from the original model")
    spec = manifest.spec
    original = import_hf(origin["hf"], {"model.max_seq_len": spec["model"]["max_seq_len"]})
    fp32 = tolerance_for("fp32")
    out = []
    with torch.inference_mode():
        for case in cases:
            ids = torch.from_numpy(case.feed["input_ids"])
            mask = case.feed.get("attention_mask")
            mask_t = None if mask is None else torch.from_numpy(mask)
            a, b = model(ids, mask_t).float().numpy(), original(ids, mask_t).float().numpy()
            if mask is not None:
                a, b = a[mask.astype(bool)], b[mask.astype(bool)]
            name = "last_hidden_state" if manifest.family == "encoder" else "logits"
            out.append(_check(f"{name} vs original (batch {case.batch} x seq {case.seq})", a, b, fp32))
    return out


# -------------------------------------------------------------------------------------------------- validate
class ValidateOptions(BaseModel):
    """What `effx validate` checks, and how (the CLI flags of the same names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    against: str = Field("torch", description="reference to compare with (the PyTorch model)")
    inputs: str = Field("random", description="random, text:FILE (real text, the model's tokenizer), or an .npz "
                                              "with input_ids (and attention_mask)")
    seqs: list[int] | None = Field(None, description="sequence lengths of random inputs (default min(16, max))")
    batches: list[int] | None = Field(None, description="batch sizes of random inputs (default 2)")
    steps: int = Field(8, ge=1, description="decoders: greedy tokens to generate and compare")
    warmup: int = Field(3, ge=0, description="latency: untimed runs first")
    iters: int = Field(20, ge=1, description="latency: timed runs")
    plots: bool = Field(True, description="write PNG plots")
    provider: str | None = Field(None, description="ONNX Runtime execution provider: cpu or cuda")
    bisect: bool = Field(True, description="on failure, locate the first diverging block")


def validate(artifact: str | Path, options: ValidateOptions | None = None, *, reference: str | Path | None = None,
             output: str | Path | None = None, overwrite: bool = False, progress: Say | None = None,
             raise_on_fail: bool = True) -> ValidationReport:
    """Validate the artifact folder (a build/ or an onnx/ folder) against PyTorch; writes report.json,
    report.md and plots to `output` (default: `<artifact>.validate` beside it; `overwrite` replaces an earlier
    report there) and returns the report. Raises ValidationFailed (exit code 1) after writing the report when
    it fails."""
    opts = options or ValidateOptions()
    say = progress or (lambda _m: None)
    if opts.against != "torch":
        raise SpecError(f"--against {opts.against}: effx validates against the PyTorch reference only (`torch`)")
    folder = Path(artifact)
    manifest = Manifest.read(folder)
    manifest.verify_files(folder)
    info = manifest.build
    precision = info.precision if info else "fp32"
    tol = tolerance_for(precision)
    max_len = manifest.spec["model"]["max_seq_len"]
    seqs = opts.seqs or [min(16, max_len)]
    batches = opts.batches or [2]
    hf_reference = Path(str(reference)[3:]) if reference is not None and str(reference).startswith("hf:") else None
    text = None if not opts.inputs.startswith(TEXT_PREFIX) else \
        TextTokens.load(manifest, opts.inputs[len(TEXT_PREFIX):], folder, what="--inputs", tokenizer_dir=hf_reference)
    cases = make_cases(manifest, opts.inputs, seqs, batches, seed=manifest.spec["model"]["seed"] + 1, text=text)
    out_dir = Path(output) if output is not None else folder.parent / f"{folder.name}.validate"
    check_output_dir(out_dir, "validate", overwrite)

    say("reference model")
    with PeakRss() as ref_mem:
        model, ref_info = load_reference(manifest, folder, reference)
    runner = open_runner(folder, manifest, provider=opts.provider)
    errors: dict[str, np.ndarray] = {}
    samples: dict[str, list[float]] = {}
    checks: list[CaseCheck] = []
    divergence = None
    latency: list[Latency] = []
    with TorchRunner(model) as ref_runner:
        # the reference is timed first, alone: ONNX Runtime's worker threads spin after each run and would
        # slow PyTorch down if a session were alive
        say("reference latency")
        with PeakRss() as ref_run_mem:
            latency += measure(ref_runner, manifest, cases[-1].feed, opts.warmup, opts.iters, samples)
        with PeakRss() as run_mem, runner:
            for case in cases:
                say(f"numerics at batch {case.batch} x seq {case.seq}")
                if manifest.family == "encoder" or "decode" not in runner.graphs:
                    checks.append(_encoder_case(runner, ref_runner, case, tol, errors))
                else:
                    checks.append(_decoder_case(runner, ref_runner, manifest, case, tol, opts.steps, errors))
            say("latency")
            latency = measure(runner, manifest, cases[-1].feed, opts.warmup, opts.iters, samples) + latency
        passed = all(c.passed for c in checks)
        if not passed and opts.bisect:
            bad = next(c for c, chk in zip(cases, checks, strict=True) if not chk.passed)
            with runner:
                divergence = find_divergence(runner, ref_runner, bad.feed, tol, say)
        env = environment(runner, ref_runner)
    memory = [Memory(runner=runner.name + (" (CPU arena on)" if getattr(runner, "arena", False) else ""),
                     peak_mb=run_mem.peak_mb, method=PeakRss.method)]
    if getattr(runner, "arena", False) and env.get("ort_providers") == ["CPUExecutionProvider"]:
        # again without ONNX Runtime's CPU arena (after the arena session is gone): what the graph needs rather
        # than what the allocator keeps; every case once, each graph once per case
        say("memory without ONNX Runtime's CPU arena")
        with PeakRss() as bare_mem, open_runner(folder, manifest, provider=opts.provider, arena=False) as bare:
            for case in cases:
                measure(bare, manifest, case.feed, 0, 1, {})
        memory.append(Memory(runner=f"{runner.name} (CPU arena off)", peak_mb=bare_mem.peak_mb,
                             method=PeakRss.method + ", one run per case"))
    drift = _drift(model, cases, manifest, say)
    memory += [Memory(runner="torch (load)", peak_mb=ref_mem.peak_mb, method=PeakRss.method),
               Memory(runner="torch (run)", peak_mb=ref_run_mem.peak_mb, method=PeakRss.method)]
    report = ValidationReport(
        output=str(out_dir),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), artifact=str(folder),
        stage=manifest.stage, target=info.target if info else "onnx (ONNX Runtime CPU)",
        backend=info.backend if info else "ort", precision=precision, family=manifest.family,
        attention=model.spec.attention_summary(), kv_cache=model.spec.cache_layout, runner=runner.name,
        against=opts.against, reference=ref_info,
        inputs=_describe_inputs(opts.inputs, seqs, batches, text),
        tolerance=tol.as_dict(), cases=checks, divergence=divergence, drift=drift, latency=latency, memory=memory,
        environment=env, passed=passed,
    )
    with atomic_dir(out_dir, "validate", overwrite=overwrite) as tmp:
        if opts.plots:
            say("plots")
            if has_module("matplotlib"):
                report.plots = write_plots(tmp, errors, samples)
            else:
                report.environment["plots"] = "skipped: pip install 'effx[plot]' (matplotlib)"
        write_report(report, tmp)
    if raise_on_fail:
        check_passed(report, out_dir)
    return report


def _describe_inputs(inputs: str, seqs: list[int], batches: list[int], text: TextTokens | None) -> str:
    if text is not None:
        return (f"real text {text.source} ({text.tokenizer}; {text.ids.size} tokens), packed into seq {seqs} x batch "
                f"{batches}, other windows of it than calibration takes")
    return f"random tokens, seq {seqs} x batch {batches}" if inputs == "random" else inputs


def check_passed(report: ValidationReport, out_dir: Path) -> None:
    """Raise ValidationFailed (exit code 1) naming the first failing output and diverging layer."""
    if not report.passed:
        raise ValidationFailed(f"{report.artifact}: FAIL against PyTorch ({report.precision} tolerance): "
                               f"{report.failure_summary()}; report: {Path(out_dir) / 'report.md'}")
