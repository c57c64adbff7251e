"""The `effx` command line: a thin skin over the Python API (every command parses flags into a RunSpec
or paths and calls one public function with keyword arguments). EffxError becomes one line on stderr and a
non-zero exit code; `--debug` shows the traceback instead.

The API behind `run`, `import`, `export`, `build`, `validate`, `bench` and `bundle` imports torch and ONNX
(seconds): each command imports it when it runs, so `effx --help`, `effx models` and `effx targets` start
without them."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from effx.check.report import ValidationReport, latency_table, rich_table
from effx.check.tables import compatibility_table, kinds_table, layouts_table, targets_rich_table
from effx.core.atomic import atomic_write_text, check_output_dir
from effx.core.errors import EffxError, OutputPathError, SpecError, ValidationFailed
from effx.core.options import BuildOptions, ExportOptions
from effx.core.spec import RunSpec, describe
from effx.core.spec_toml import spec_to_commented_toml
from effx.core.specflags import spec_flags, stage_flags
from effx.targets.precision import check_request
from effx.targets.profiles import get_target, targets_table

app = typer.Typer(
    name="effx",
    help="Efficient-attention transformers from PyTorch to ONNX Runtime and TensorRT (data-center GPUs, Jetson).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors")) -> None:
    _state["debug"] = debug


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr)


def resolve_spec(spec_file: Path | None, overrides: dict[str, Any]) -> RunSpec:
    """The run spec from a TOML file (or defaults) with CLI overrides applied."""
    base = RunSpec.from_toml(spec_file) if spec_file is not None else RunSpec()
    return base.with_overrides(overrides) if overrides else base


SpecArg = typer.Argument(None, help="run spec (TOML); flags override its values", show_default=False)


# ------------------------------------------------------------------------------------------------ models
@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List attention kinds with their parameters, KV-cache layouts and the compatibility matrix."""
    info = describe()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = _console()
    console.print(kinds_table(info))
    console.print(layouts_table(info))
    console.print(compatibility_table(info))


# -------------------------------------------------------------------------------------------------- init
@app.command()
@spec_flags
def init(
    output: Path = typer.Option(Path("spec.toml"), "-o", "--output", help="where to write the spec"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
    overrides: dict | None = None,
) -> None:
    """Write a commented example run spec (TOML)."""
    spec = resolve_spec(None, overrides or {})
    if output.exists() and not force:
        raise OutputPathError(f"{output} exists; pass --force to overwrite or choose another -o")
    atomic_write_text(output, spec_to_commented_toml(spec))
    typer.echo(f"wrote {output} (attention={spec.attention_summary()}, family={spec.model.family})")


# --------------------------------------------------------------------------------------------------- run
@app.command()
@spec_flags
@stage_flags(ExportOptions, BuildOptions)
def run(
    spec_file: Optional[Path] = SpecArg,  # noqa: UP045 - typer reads this annotation at runtime
    output: Path = typer.Option(Path("effx-out"), "-o", "--output", help="output folder"),
    batch: int = typer.Option(2, "--batch", min=1, help="batch of the checks"),
    seq: int = typer.Option(16, "--seq", min=1, help="sequence length of the checks"),
    model_dir: Optional[str] = typer.Option(None, "--model", help="a model/ folder or hf:PATH instead of a seeded init"),  # noqa: UP045
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `effx run` output"),
    export_options: ExportOptions | None = None,
    build_options: BuildOptions | None = None,
    overrides: dict | None = None,
) -> None:
    """The main job: model -> ONNX export -> build for the target -> validate against PyTorch (report/)."""
    check_request(get_target(build_options.target), build_options.precision, build_options.dla_core)
    check_output_dir(output, "run", overwrite)
    spec = resolve_spec(spec_file, overrides or {}) if model_dir is None else None
    from effx import pipeline

    model = _load_or_build(spec_file, model_dir, overrides or {}) if model_dir is not None else None
    with _progress("run") as say:
        result = pipeline.run_pipeline(model.spec if model is not None else spec, output, export=export_options,
                                       build=build_options, batch=batch, seq=seq, overwrite=overwrite,
                                       progress=say, model=model)
    if result.report is not None:
        print_report(result.report)
    typer.echo(result.summary())


# ------------------------------------------------------------------------------------------------ import
@app.command("import")
@spec_flags
def import_(
    path: Path = typer.Argument(..., help="local Hugging Face folder (config.json + safetensors or .bin)"),
    output: Path = typer.Option(..., "-o", "--output", help="model/ folder to write (effx weights + spec)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
    overrides: dict | None = None,
) -> None:
    """Import a Hugging Face BERT, RoBERTa, DistilBERT, GPT-2 or Llama folder; --attention swaps the attention."""
    from effx.models import hf_import

    check_output_dir(output, "import", overwrite)
    with _progress("import") as say:
        say(f"reading {path}")
        model = hf_import.import_to_folder(path, output, overrides=overrides or {}, overwrite=overwrite)
    spec = model.spec
    typer.echo(f"wrote {output} ({model.origin['model_type']} -> effx {spec.model.family}, {spec.model.n_layers} "
               f"layers, d_model {spec.model.d_model}, attention {spec.attention_summary()}, kv cache "
               f"{spec.cache_layout})")
    if spec.attention_summary() != model.origin.get("attention", "full"):
        typer.echo("note: the attention was swapped; the model needs fine-tuning to recover the original accuracy "
                   "(effx validate shows the drift from the original)")


# ------------------------------------------------------------------------------------------------- adapt
@app.command()
@spec_flags
def adapt(
    model_dir: str = typer.Option(..., "--model", help="hf:PATH (with --attention KIND) or an effx model folder imported with a swapped attention"),
    text: list[Path] = typer.Option([], "--text", help="plain text file to adapt on (repeatable); the end is held out"),  # noqa: B008
    output: Path = typer.Option(..., "-o", "--output", help="adapted model/ folder (written atomically)"),
    seq: int = typer.Option(128, "--seq", help="tokens per training sequence"),
    batch: int = typer.Option(8, "--batch", help="sequences per step"),
    steps: int = typer.Option(200, "--steps", help="training steps of each stage (stage 2: see --lora-steps)"),
    lr: float = typer.Option(1e-4, "--lr", help="stage 1 learning rate (AdamW)"),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="stage 2 LoRA rank on q/k/v/o (default: 8 where stage 1 has nothing to train, else 0 = off)"),  # noqa: UP045
    lora_steps: Optional[int] = typer.Option(None, "--lora-steps", help="stage 2 steps (default --steps)"),  # noqa: UP045
    lora_lr: float = typer.Option(1e-3, "--lora-lr", help="stage 2 learning rate (AdamW)"),
    seed: int = typer.Option(0, "--seed", help="batches and LoRA initialisation (same seed, same weights)"),
    init: str = typer.Option("auto", "--init", help="stage 1 start: pool (Linformer E/F as average pooling), prefix (the first k positions one by one: short padded inputs such as sentences), import, or auto (prefix with --lengths varied, else pool)"),
    lengths: str = typer.Option("packed", "--lengths", help="training rows: packed (--seq tokens each) or varied "
                                                             "(encoders: random lengths, padded, like sentences)"),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="cosine (each stage's rate falls to 5% by its last step) or constant"),
    held_out: float = typer.Option(0.1, "--held-out", help="share of the text held out for the metrics"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="steps between checkpoints (OUT.checkpoint)"),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="stop training after this long (steps done are recorded)"),  # noqa: UP045
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run, or an earlier output with more steps"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `effx adapt` output"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write loss.png (needs effx[plot])"),
    overrides: dict | None = None,
) -> None:
    """Swap a pretrained model's attention and train what the swap adds (and LoRA) to keep its quality."""
    check_output_dir(output, "adapt", overwrite, resumable=resume)
    from effx.models import adapt as adaptation

    console = _console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("adapt", total=None)
        try:
            result = adaptation.adapt(
                model_dir, output, texts=text, overrides=overrides or {}, seq=seq, batch=batch, steps=steps, lr=lr,
                lora_rank=lora_rank, lora_steps=lora_steps, lora_lr=lora_lr, seed=seed, init=init, lengths=lengths, schedule=lr_schedule, held_out=held_out,
                checkpoint_every=checkpoint_every, minutes=minutes, resume=resume, overwrite=overwrite, plots=plots,
                progress=lambda msg: bar.update(task, description=f"adapt: {msg}"),
                on_step=lambda stage, done, total, loss: bar.update(
                    task, description=f"{stage}: loss {loss:.4g}", completed=done, total=total))
        except adaptation.Interrupted as stop:
            bar.stop()
            typer.echo(f"effx: interrupted in {stop.stage} at step {stop.step}; checkpoint in {stop.checkpoint} "
                       f"(no {output} written); rerun the same command with --resume to continue", err=True)
            sys.exit(130)
    if result.resumed_from:
        typer.echo(f"resumed from {result.resumed_from}")
    typer.echo(result.summary())


# ------------------------------------------------------------------------------------------------ export
@app.command()
@spec_flags
@stage_flags(ExportOptions)
def export(
    spec_file: Optional[Path] = SpecArg,  # noqa: UP045 - typer reads this annotation at runtime
    output: Path = typer.Option(..., "-o", "--output", help="output folder (written atomically)"),
    model_dir: Optional[str] = typer.Option(None, "--model", help="a model/ folder, or hf:PATH (a Hugging Face folder), instead of a seeded init"),  # noqa: UP045
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `effx export` output"),
    export_options: ExportOptions | None = None,
    overrides: dict | None = None,
) -> None:
    """Export to ONNX: one effx node (+ standard-ONNX function) per efficient-attention layer, and manifest.json."""
    check_output_dir(output, "export", overwrite)
    from effx import exporter

    model = _load_or_build(spec_file, model_dir, overrides or {})
    with _progress("export") as say:
        manifest = exporter.export_model(model, output, **export_options.model_dump(), overwrite=overwrite,
                                         progress=say)
    for name, g in manifest.graphs.items():
        typer.echo(f"wrote {output / g.file} ({name}: {', '.join(i.name for i in g.inputs[:4])}"
                   f"{', ...' if len(g.inputs) > 4 else ''} -> {', '.join(o.name for o in g.outputs[:3])}"
                   f"{', ...' if len(g.outputs) > 3 else ''})")
    ops = ", ".join(f"{c.count}x effx::{c.op_type}" for c in manifest.custom_ops) or "none (standard ONNX only)"
    typer.echo(f"wrote {output / 'manifest.json'}; custom ops: {ops}")


# ------------------------------------------------------------------------------------------ targets/build
@app.command()
def targets(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List the deployment targets: backend, GPU arch, TensorRT versions, precisions, DLA, op flavours."""
    rows = targets_table()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _console().print(targets_rich_table(rows))


@app.command()
@stage_flags(BuildOptions)
def build(
    onnx_dir: Path = typer.Argument(..., help="folder written by `effx export` (or a device kit, on the device)"),
    output: Path = typer.Option(..., "-o", "--output", help="build folder (written atomically)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `effx build` output"),
    build_options: BuildOptions | None = None,
) -> None:
    """Build an exported model for a target: ONNX Runtime here, TensorRT engines (or a device kit) for GPUs."""
    opts = build_options
    check_request(get_target(opts.target), opts.precision, opts.dla_core)  # capability errors before any work
    check_output_dir(output, "build", overwrite)
    from effx.targets import api

    with _progress("build") as say:
        manifest = api.build(onnx_dir, **opts.model_dump(), out_dir=output, overwrite=overwrite, progress=say)
    info = manifest.build
    for name, g in info.graphs.items():
        typer.echo(f"{name}: {output / g.file}")
    if info.engine_built:
        typer.echo(f"built {info.target} ({info.backend}, {info.precision}) -> {output}")
    else:
        typer.echo(f"no engine was built: {info.reason}")
        typer.echo(f"wrote a device build kit -> {output}; on the device run: bash {output / 'build_on_device.sh'}")


@app.command()
def check(
    folder: Path = typer.Argument(..., help="folder with manifest.json: an `effx export` output or a build/kit"),
    target: str = typer.Option(..., "-t", "--target", help="TensorRT target (see `effx targets`)"),
    tensorrt: Optional[str] = typer.Option(None, "--tensorrt", help="TensorRT version to hold the graphs against (default: the target's)"),  # noqa: UP045
    as_exported: bool = typer.Option(False, "--as-exported", help="check the graphs as they are, not as `effx build` lowers them"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Static check: would the target's TensorRT parse every node (subgraphs and inlined effx bodies too)?
    Exit 1 when a finding blocks the build."""
    from effx.targets import compat

    report = compat.check_folder(folder, target, tensorrt_version=tensorrt, lowered=not as_exported)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        console = _console()
        for note in report.lowering:
            console.print(f"lowered: {note}", markup=False, highlight=False)
        if report.findings:
            table = Table(title=f"effx check {folder} --target {report.target}")
            for col in ("graph", "node", "op", "kind", "finding", "fix"):
                table.add_column(col, overflow="fold")
            for f in report.findings:
                table.add_row(f.graph, f.node, f.op, f.kind if f.blocking else f"{f.kind} (note)", f.message, f.fix)
            console.print(table)
        console.print(report.summary(), markup=False, highlight=False)
        console.print(f"facts: {report.source}", markup=False, highlight=False)
    if not report.ok:
        sys.exit(1)  # findings are not an error of the command: the table said what and where


# ---------------------------------------------------------------------------------------------- validate
@app.command()
def validate(
    artifact: Optional[Path] = typer.Argument(None, help="build folder (or onnx/ folder) to check", show_default=False),  # noqa: UP045
    against: str = typer.Option("torch", "--against", help="reference to compare with (the PyTorch model)"),
    inputs: str = typer.Option("random", "--inputs", help="random | text:FILE (real text, the model's tokenizer) | FILE.npz with input_ids (and attention_mask)"),
    seq: str = typer.Option("16", "--seq", help="sequence lengths, comma-separated (random inputs)"),
    batch: str = typer.Option("2", "--batch", help="batch sizes, comma-separated (random inputs)"),
    steps: int = typer.Option(8, "--steps", min=1, help="decoders: greedy tokens to generate and compare"),
    reference: Optional[str] = typer.Option(None, "--reference", help="model/ folder (or hf:PATH) the export came from"),  # noqa: UP045
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="report folder (default ARTIFACT.validate)"),  # noqa: UP045
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `effx validate` report there"),
    warmup: int = typer.Option(3, "--warmup", min=0, help="latency: untimed runs first"),
    iters: int = typer.Option(20, "--iters", min=1, help="latency: timed runs"),
    provider: Optional[str] = typer.Option(None, "--provider", help="ONNX Runtime: cpu (default) or cuda"),  # noqa: UP045
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write PNG plots (needs effx[plot])"),
    schema: bool = typer.Option(False, "--schema", help="print the JSON schema of report.json and exit"),
) -> None:
    """Check an artifact against PyTorch: errors per output, greedy tokens, first diverging layer, latency."""
    if schema:
        typer.echo(json.dumps(ValidationReport.model_json_schema(), indent=2))
        return
    if artifact is None:
        raise SpecError("effx validate needs the folder to check: effx validate OUT/build/cpu")
    from effx.check import validate as check

    options = check.ValidateOptions(against=against, inputs=inputs, seqs=parse_int_list(seq, "--seq"),
                                    batches=parse_int_list(batch, "--batch"), steps=steps, warmup=warmup,
                                    iters=iters, plots=plots, provider=provider)
    with _progress("validate") as say:
        report = check.validate(artifact, options, reference=reference, output=output, overwrite=overwrite,
                                progress=say, raise_on_fail=False)
    print_report(report)
    check.check_passed(report, Path(report.output))


def print_report(report: ValidationReport) -> None:
    console = _console()
    console.print(rich_table(report))
    if report.divergence is not None:
        console.print(f"first diverging layer: [bold]{report.divergence.layer}[/] ({report.divergence.note})")
    for o in report.drift:
        console.print(f"drift from the original model (attention swapped, needs fine-tuning): {o.name}: "
                      f"max abs {o.max_abs:.3g}, cosine {o.cosine:.4f}")
    console.print(latency_table(report))
    verdict = "[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]"
    console.print(f"{verdict}  report: {report.output}/report.md")


# ------------------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    attention: str = typer.Option("full,linformer,local,linear", "--attention", help="kinds, comma-separated"),
    seq: str = typer.Option("1024,4096,16384", "--seq", help="sequence lengths, comma-separated"),
    batch: str = typer.Option("1", "--batch", help="batch sizes, comma-separated"),
    target: str = typer.Option("cpu", "--target", "-t", help="target (ONNX Runtime targets run here)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8"),
    d_model: int = typer.Option(512, "--d-model", min=8, help="hidden size"),
    heads: int = typer.Option(8, "--heads", min=1, help="attention heads"),
    layers: int = typer.Option(1, "--layers", min=1, help="transformer blocks"),
    param: list[str] = typer.Option([], "--param", help="KIND.FIELD=VALUE, e.g. linformer.k=256 (repeatable)"),  # noqa: B008
    mem_limit_mb: Optional[int] = typer.Option(None, "--mem-limit-mb", min=64, help="address-space cap per cell (default 3/4 of RAM)"),  # noqa: UP045
    warmup: int = typer.Option(1, "--warmup", min=0, help="untimed runs per cell"),
    iters: int = typer.Option(5, "--iters", min=1, help="timed runs per cell"),
    threads: int = typer.Option(0, "--threads", min=0, help="ONNX Runtime intra-op threads (0: all cores)"),
    output: Path = typer.Option(Path("effx-bench"), "-o", "--output", help="folder for bench.json and plots"),
    fresh: bool = typer.Option(False, "--fresh", help="start over instead of resuming bench.json"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write log-log PNG plots (needs effx[plot])"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run each cell on a Ray node offering the target: auto | HEAD:6379"),  # noqa: UP045
) -> None:
    """Sweep attention kinds x sequence lengths on a target: latency, peak memory, ratios against full."""
    from effx.check import bench as sweep

    kinds = [k.strip() for k in attention.split(",") if k.strip()]
    console = _console(stderr=True)
    with contextlib.ExitStack() as stack:
        runner = None
        if ray is not None:
            from effx import matrix as grid

            runner = stack.enter_context(grid.ray_bench_runner(ray, target))
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True, console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task("bench")
            results = sweep.bench(kinds, parse_int_list(seq, "--seq"), batches=parse_int_list(batch, "--batch"),
                                  target=target, precision=precision, d_model=d_model, heads=heads, layers=layers,
                                  params=sweep.parse_params(param), output=output, mem_limit_mb=mem_limit_mb,
                                  warmup=warmup, iters=iters, threads=threads, fresh=fresh, plots=plots,
                                  progress=lambda msg: bar.update(task, description=f"bench: {msg}"),
                                  on_cell=lambda done, total: bar.update(task, completed=done, total=total),
                                  cell_runner=runner)
    typer.echo("latency p50, peak memory growth (speed-up / memory saving against full)")
    typer.echo(sweep.table_markdown(results))
    typer.echo(f"wrote {output / 'bench.json'}" + "".join(f", {output / p}" for p in results.get("plots", [])))


# ------------------------------------------------------------------------------------------------ bundle
@app.command()
def bundle(
    build_dir: Path = typer.Argument(..., help="build folder written by `effx build`"),
    fmt: str = typer.Option("triton", "--format", help="triton: a Triton Inference Server model repository"),
    name: str = typer.Option("effx", "--name", help="model name prefix in the repository"),
    output: Path = typer.Option(..., "-o", "--output", help="repository folder (written atomically)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Repackage a build folder for a server: a Triton model repository (config.pbtxt per graph)."""
    from effx.targets import bundle as bundles

    if fmt != "triton":
        raise SpecError(f"--format {fmt}: effx bundle writes `triton` (the build folder itself is the C++ bundle)")
    check_output_dir(output, "bundle", overwrite)
    names = bundles.write_triton_repo(build_dir, output, name=name, overwrite=overwrite)
    typer.echo(f"wrote {output}: " + ", ".join(f"{n}/config.pbtxt" for n in names))


# ------------------------------------------------------------------------------------------ matrix/worker
@app.command()
@spec_flags
@stage_flags(ExportOptions)
def matrix(
    spec_file: Optional[Path] = SpecArg,  # noqa: UP045 - typer reads this annotation at runtime
    targets: str = typer.Option("cpu", "--targets", help="targets, comma-separated (see `effx targets`)"),
    precisions: str = typer.Option("fp32", "--precisions", help="precisions, comma-separated"),
    model_dir: Optional[str] = typer.Option(None, "--model", help="a model/ folder or hf:PATH instead of a seeded init"),  # noqa: UP045
    param: list[str] = typer.Option([], "--param", help="KIND.FIELD=VALUE for one of the --attention kinds, e.g. linformer.k=64 (repeatable)"),  # noqa: B008
    calib: str = typer.Option("random", "--calib", help="int8 calibration: random | dynamic (ORT) | FILE.npz | token file"),
    calib_samples: int = typer.Option(8, "--calib-samples", min=1, help="calibration batches"),
    batch: int = typer.Option(2, "--batch", min=1, help="batch of the checks"),
    seq: int = typer.Option(16, "--seq", min=1, help="sequence length of the checks"),
    warmup: int = typer.Option(1, "--warmup", min=0, help="latency: untimed runs per cell"),
    iters: int = typer.Option(5, "--iters", min=1, help="latency: timed runs per cell"),
    threads: int = typer.Option(0, "--threads", min=0, help="PyTorch threads in a cell (0: the default)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run the cells on a Ray cluster: auto | HEAD:6379"),  # noqa: UP045
    jobs: int = typer.Option(1, "--jobs", min=1, help="cells at a time on this machine (without --ray)"),
    retries: int = typer.Option(2, "--retries", min=0, help="Ray: reruns of a cell whose worker died"),
    output: Path = typer.Option(..., "-o", "--output", help="output folder; a rerun skips finished cells"),
    fresh: bool = typer.Option(False, "--fresh", help="start over instead of resuming an earlier matrix there"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write matrix.png and per-cell report plots"),
    export_options: ExportOptions | None = None,
    overrides: dict | None = None,
) -> None:
    """Attention kinds x targets x precisions: export once per kind, build + validate every cell (locally or on Ray)."""
    overrides = dict(overrides or {})
    kinds_text = overrides.pop("attention.kind", None)  # a comma-separated list here: one model variant per kind
    if model_dir is not None and str(model_dir).startswith("hf:") and spec_file is not None:
        raise SpecError("--model hf:PATH takes its architecture from config.json; drop the spec file")
    if model_dir is not None and not str(model_dir).startswith("hf:") and (spec_file is not None or overrides):
        raise SpecError("--model loads a saved spec with its weights; drop the spec file and spec flags")
    spec = resolve_spec(spec_file, overrides) if model_dir is None else None
    from effx import matrix as grid
    from effx.check.bench import parse_params

    if kinds_text is None:
        kinds = [spec.attention_summary()] if spec is not None else [grid.model_from(model_dir).spec.attention_summary()]
    else:
        kinds = [k.strip() for k in kinds_text.split(",") if k.strip()]
    with _progress("matrix") as say:
        summary = grid.matrix(kinds, [t.strip() for t in targets.split(",") if t.strip()],
                              [p.strip() for p in precisions.split(",") if p.strip()], output, spec=spec,
                              overrides=overrides, params=parse_params(param), model_source=model_dir,
                              export=export_options, calib=calib, calib_samples=calib_samples, batch=batch, seq=seq,
                              warmup=warmup, iters=iters, threads=threads, plots=plots, ray=ray, jobs=jobs,
                              retries=retries, fresh=fresh, progress=say)
    table = Table(title=f"effx matrix -> {output}")
    for header in grid.HEADERS[:-1]:  # reasons are long: one line each below the table, not a wrapped column
        table.add_column(header, no_wrap=header in ("attention", "target", "precision", "verdict"))
    for row in grid.rows(summary):
        table.add_row(*row[:-1])
    console = _console()
    console.print(table)
    for cell, row in zip(summary["cells"], grid.rows(summary), strict=True):
        if row[-1]:
            console.print(f"{cell['cell']}: {row[-1]}", markup=False, highlight=False, soft_wrap=True)
    typer.echo(f"wrote {output / 'matrix.json'}, {output / 'matrix.md'}"
               + "".join(f", {output / p}" for p in summary["plots"]) + f"; cells in {output / 'cells'}")
    bad = [c for c in summary["cells"] if c["status"] in ("FAIL", "ERROR")]
    if bad:
        raise ValidationFailed(f"{len(bad)} of {len(summary['cells'])} cells failed, first {bad[0]['cell']}: "
                               f"{bad[0]['status']} ({bad[0]['reason']}); see {output / 'matrix.md'}")


@app.command()
def worker(
    address: Optional[str] = typer.Option(None, "--address", help="HEAD:6379 of the Ray cluster to join"),  # noqa: UP045
    head: bool = typer.Option(False, "--head", help="start a new cluster's head node here instead"),
    targets: Optional[str] = typer.Option(None, "--targets", help="targets this node offers (default: what it can build)"),  # noqa: UP045
    slots: int = typer.Option(1, "--slots", min=1, help="cells this node runs at a time, per target"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=1, help="CPUs this node gives Ray (default: all)"),  # noqa: UP045
    dry_run: bool = typer.Option(False, "--dry-run", help="print what this node would offer and the `ray start` command"),
) -> None:
    """Join a Ray cluster as an `effx matrix` node offering the targets it can build (`ray start --resources`)."""
    if head == (address is not None):
        raise SpecError("effx worker needs exactly one of --address HEAD:6379 (join) or --head (start a cluster)")
    from effx import matrix as grid

    can = grid.buildable_targets()
    chosen = [t.strip() for t in targets.split(",") if t.strip()] if targets else [t for t, why in can.items() if why is None]
    for name in chosen:
        why = can.get(get_target(name).name)
        if why is not None:
            typer.echo(f"note: {name}: {why}; its cells here become device build kits", err=True)
    cmd = grid.start_worker(None if head else address, chosen, slots=slots, num_cpus=num_cpus, dry_run=dry_run)
    shown = " ".join(("'" + c + "'") if "{" in c else c for c in cmd)
    typer.echo(f"{'would run' if dry_run else 'ran'}: {shown}")
    typer.echo(f"this node offers: {', '.join(grid.resource_name(t) + '=' + str(slots) for t in chosen)}")


def _load_or_build(spec_file: Path | None, model_dir: Path | str | None, overrides: dict):
    """The model a command works on: --model hf:PATH (spec flags may swap its attention), --model DIR (an effx
    model folder), or the spec's seeded initialisation."""
    if model_dir is not None and str(model_dir).startswith("hf:") and spec_file is not None:
        raise SpecError("--model hf:PATH takes its architecture from config.json; drop the spec file")
    if model_dir is not None and not str(model_dir).startswith("hf:") and (spec_file is not None or overrides):
        raise SpecError("--model loads a saved spec with its weights; drop the spec file and spec flags")
    spec = resolve_spec(spec_file, overrides) if model_dir is None else None  # spec errors before torch loads
    from effx import models

    return models.model_from(model_dir, spec, overrides)


@contextlib.contextmanager
def _progress(stage: str):
    """A rich spinner whose text follows the stage's progress messages."""
    console = _console(stderr=True)  # no progress where stderr is not a terminal: one-line errors stay one line
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  transient=True, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(stage)
        yield lambda msg: progress.update(task, description=f"{stage}: {msg}")


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{flag} {text!r}: expected comma-separated integers, e.g. {flag} 128,512") from None
    if not values or min(values) < 1:
        raise SpecError(f"{flag} {text!r}: expected positive integers, e.g. {flag} 128,512")
    return values


def main() -> None:
    """Every failure ends as one line on stderr: `effx: error: ...` with exit code 2 for bad input, 1 for a
    failed validation or build step; `--debug` (or EFFX_DEBUG=1) shows the traceback instead."""
    try:
        app(standalone_mode=False)
    except EffxError as exc:
        if _debug():
            raise
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("effx: interrupted; partial output was removed", err=True)
        sys.exit(130)
    except Exception as exc:
        # typer's own (vendored click) exceptions are told apart by name: Exit (--help), Abort, and the usage
        # errors (unknown option, bad value, missing argument), which carry format_message and exit_code
        kind = type(exc).__name__
        if kind == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if kind == "Abort":
            _fail("aborted", 1)
        if callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int):
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else " (see `effx --help`)"
            _fail(exc.format_message().replace("\n", " ") + where, exc.exit_code)
        if _debug():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"unexpected {kind}: {first[:300]}; rerun with --debug for the traceback and report it with the "
              "command", 1)


def _debug() -> bool:
    return _state["debug"] or os.environ.get("EFFX_DEBUG") == "1"


def _fail(message: str, code: int) -> None:
    typer.echo(f"effx: error: {message.strip()}", err=True)
    sys.exit(code)
