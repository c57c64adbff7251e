"""The validation report: a versioned pydantic schema (report.json), its markdown rendering (report.md), a
rich table for the terminal, and PNG plots (matplotlib, imported lazily: extra `plot`).

report.json is a public format like manifest.json: add fields, never rename them, and bump
REPORT_SCHEMA_VERSION when a reader would misread an old file. `effx validate --schema` prints the JSON schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from effx.core.lazy import lazy_import

REPORT_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputCheck(_Model):
    """One output (or one decoding phase of the logits) against the reference."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float = Field(description="max |err| / max |reference|")
    mean_abs: float
    cosine: float
    share_over: float = Field(description="share of elements beyond the tolerance bound")
    passed: bool


class DecodeCheck(_Model):
    prompt: int
    steps: int = Field(description="decode steps after the prompt (teacher-forced)")
    step_max_abs: list[float] = Field(description="max |err| of the logits per step: prefill, then each decode step")
    greedy_steps: int = Field(description="tokens generated greedily by both")
    greedy_agreement: float = Field(description="mean share of greedy tokens before the first disagreement")
    greedy_passed: bool


class CaseCheck(_Model):
    batch: int
    seq: int
    outputs: list[OutputCheck]
    decode: DecodeCheck | None = None
    passed: bool


class Probe(_Model):
    block: int
    tensor: str
    max_abs: float
    cosine: float
    passed: bool


class Divergence(_Model):
    """Where the artifact first departs from the reference, found by bisecting over block boundaries."""

    graph: str
    block: int | None = Field(description="first diverging block; None when every block agrees (the head differs)")
    layer: str = Field(description="module name, e.g. model.blocks.2, or the head")
    probes: list[Probe]
    note: str = ""


class Latency(_Model):
    runner: str
    graph: str
    batch: int
    seq: int
    warmup: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float
    unit: str  # what throughput counts: tokens/s


class Memory(_Model):
    runner: str
    peak_mb: float | None
    method: str


class ValidationReport(_Model):
    schema_version: int = REPORT_SCHEMA_VERSION
    tool: str = "effx validate"
    created: str
    artifact: str
    output: str = Field(description="the folder holding this report")
    stage: str
    target: str
    backend: str
    precision: str
    family: str
    attention: str
    kv_cache: str
    runner: str
    against: str
    reference: dict[str, Any]
    inputs: str
    tolerance: dict[str, float]
    cases: list[CaseCheck]
    divergence: Divergence | None = None
    drift: list[OutputCheck] = Field(default_factory=list,
                                     description="an imported model with swapped attention against the original "
                                                 "(informational: swapped models need fine-tuning)")
    latency: list[Latency] = Field(default_factory=list)
    memory: list[Memory] = Field(default_factory=list)
    environment: dict[str, Any]
    plots: list[str] = Field(default_factory=list)
    passed: bool

    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def failure_summary(self) -> str:
        bad = [f"{o.name} at batch {c.batch} x seq {c.seq}: max_abs {o.max_abs:.3g}, cosine {o.cosine:.6f}"
               for c in self.cases for o in c.outputs if not o.passed]
        bad += [f"greedy tokens at batch {c.batch} x seq {c.seq}: agreement {c.decode.greedy_agreement:.2f}"
                for c in self.cases if c.decode is not None and not c.decode.greedy_passed]
        text = bad[0] if bad else "disagreement"
        if self.divergence is not None:
            text += f"; first diverging layer: {self.divergence.layer}"
        return text


def write_report(report: ValidationReport, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))


def _f(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def markdown(r: ValidationReport) -> str:
    lines = [f"# effx validate: {r.verdict()}", "",
             f"- artifact: `{r.artifact}` ({r.stage}, target {r.target}, {r.backend}, {r.precision})",
             f"- model: {r.family}, attention {r.attention}, kv cache {r.kv_cache}",
             f"- runner {r.runner} against {r.against} (reference: {r.reference.get('source', '?')})",
             f"- inputs: {r.inputs}",
             f"- tolerance: {r.tolerance}", "", "## Numerics", "",
             "| batch | seq | output | max abs | max rel | mean abs | cosine | over tol | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in r.cases:
        for o in c.outputs:
            lines.append(f"| {c.batch} | {c.seq} | {o.name} | {_f(o.max_abs)} | {_f(o.max_rel)} | {_f(o.mean_abs)} | "
                         f"{o.cosine:.6f} | {100 * o.share_over:.2f}% | {'PASS' if o.passed else 'FAIL'} |")
    decodes = [c for c in r.cases if c.decode is not None]
    if decodes:
        lines += ["", "## Decoding", "", "| batch | seq | prompt | steps | worst step max abs | greedy tokens | "
                  "greedy agreement | result |", "|---|---|---|---|---|---|---|---|"]
        for c in decodes:
            d = c.decode
            lines.append(f"| {c.batch} | {c.seq} | {d.prompt} | {d.steps} | {_f(max(d.step_max_abs))} | "
                         f"{d.greedy_steps} | {d.greedy_agreement:.2f} | {'PASS' if d.greedy_passed else 'FAIL'} |")
    if r.divergence is not None:
        d = r.divergence
        lines += ["", "## First diverging layer", "", f"**{d.layer}** (graph `{d.graph}`). {d.note}", "",
                  "| block | boundary tensor | max abs | cosine | agrees |", "|---|---|---|---|---|"]
        lines += [f"| {p.block} | `{p.tensor}` | {_f(p.max_abs)} | {p.cosine:.6f} | {'yes' if p.passed else 'no'} |"
                  for p in d.probes]
    if r.drift:
        lines += ["", "## Drift from the original model (attention swapped; fine-tune to recover accuracy)", "",
                  "| output | max abs | cosine | within fp32 tolerance |", "|---|---|---|---|"]
        lines += [f"| {o.name} | {_f(o.max_abs)} | {o.cosine:.6f} | {'yes' if o.passed else 'no'} |" for o in r.drift]
    if r.latency:
        lines += ["", "## Latency", "", "| runner | graph | batch | seq | p50 ms | p90 ms | p99 ms | mean ms | throughput |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x.runner} | {x.graph} | {x.batch} | {x.seq} | {x.p50_ms:.3f} | {x.p90_ms:.3f} | {x.p99_ms:.3f} | "
                  f"{x.mean_ms:.3f} | {x.throughput:.1f} {x.unit} |" for x in r.latency]
    if r.memory:
        lines += ["", "## Peak memory", "", "| runner | peak MB | method |", "|---|---|---|"]
        lines += [f"| {m.runner} | {'n/a' if m.peak_mb is None else f'{m.peak_mb:.1f}'} | {m.method} |" for m in r.memory]
    lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in r.environment.items()]
    if r.plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in r.plots]
    return "\n".join(lines) + "\n"


def rich_table(r: ValidationReport) -> Table:
    t = Table(title=f"effx validate {r.artifact}: {r.runner} vs {r.against} ({r.precision})")
    for col in ("batch x seq", "output", "max abs", "cosine", "over tol", "result"):
        t.add_column(col)
    for c in r.cases:
        for o in c.outputs:
            t.add_row(f"{c.batch} x {c.seq}", o.name, _f(o.max_abs), f"{o.cosine:.6f}", f"{100 * o.share_over:.2f}%",
                      "[green]PASS[/]" if o.passed else "[red]FAIL[/]")
        if c.decode is not None:
            d = c.decode
            t.add_row(f"{c.batch} x {c.seq}", f"greedy ({d.greedy_steps} tokens)", "", "",
                      f"agreement {d.greedy_agreement:.2f}", "[green]PASS[/]" if d.greedy_passed else "[red]FAIL[/]")
    return t


def latency_table(r: ValidationReport) -> Table:
    t = Table(title="latency")
    for col in ("runner", "graph", "batch x seq", "p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput"):
        t.add_column(col)
    for x in r.latency:
        t.add_row(x.runner, x.graph, f"{x.batch} x {x.seq}", f"{x.p50_ms:.3f}", f"{x.p90_ms:.3f}", f"{x.p99_ms:.3f}",
                  f"{x.mean_ms:.3f}", f"{x.throughput:.1f} {x.unit}")
    return t


def write_plots(folder: Path, errors: dict[str, Any], timings: dict[str, list[float]]) -> list[str]:
    """Error histograms (log10 |err| per output) and the latency distribution per runner/graph. Returns the
    files written, relative to `folder`."""
    matplotlib = lazy_import("matplotlib", extra="plot", purpose="validation plots")
    matplotlib.use("Agg")
    plt = lazy_import("matplotlib.pyplot", extra="plot", purpose="validation plots")
    written = []
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    for name, err in errors.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        err = np.asarray(err, np.float64).ravel()
        ax.hist(np.log10(np.maximum(err, 1e-12)), bins=60, color="#4477aa")
        ax.set(title=f"|artifact - reference|: {name}", xlabel="log10 |error|", ylabel="elements")
        fig.tight_layout()
        path = plots / f"error_{_safe(name)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.relative_to(folder).as_posix())
    if timings:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = list(timings)
        ax.boxplot([timings[k] for k in labels], orientation="horizontal", showfliers=True)
        ax.set_yticks(range(1, len(labels) + 1), labels)
        ax.set(title="latency per call", xlabel="ms")
        ax.set_xscale("log")
        fig.tight_layout()
        path = plots / "latency.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.relative_to(folder).as_posix())
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
