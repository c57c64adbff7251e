"""The `effx` command line: a thin skin over the Python API (every command parses flags into a RunSpec
or paths and calls one public function). EffxError becomes one line on stderr and a non-zero exit code;
`--debug` shows the traceback instead."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from effx.errors import EffxError
from effx.specflags import spec_flags

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


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def resolve_spec(spec_file: Path | None, overrides: dict[str, Any]):
    """The run spec from a TOML file (or defaults) with CLI overrides applied."""
    from effx.spec import RunSpec

    base = RunSpec.from_toml(spec_file) if spec_file is not None else RunSpec()
    return base.with_overrides(overrides) if overrides else base


SpecArg = typer.Argument(None, help="run spec (TOML); flags override its values", show_default=False)


# ------------------------------------------------------------------------------------------------ models
@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List attention kinds with their parameters, KV-cache layouts and the compatibility matrix."""
    from effx.registry import describe

    info = describe()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from effx.report_tables import compatibility_table, kinds_table, layouts_table

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
    from effx.errors import OutputPathError
    from effx.spec_toml import spec_to_commented_toml

    spec = resolve_spec(None, overrides or {})
    if output.exists() and not force:
        raise OutputPathError(f"{output} exists; pass --force to overwrite or choose another -o")
    from effx.atomic import atomic_write_text

    atomic_write_text(output, spec_to_commented_toml(spec))
    typer.echo(f"wrote {output} (attention={spec.attention.kind}, family={spec.model.family})")


# --------------------------------------------------------------------------------------------------- run
@app.command()
@spec_flags
def run(
    spec_file: Optional[Path] = SpecArg,  # noqa: UP045 - typer reads this annotation at runtime
    output: Path = typer.Option(Path("effx-out"), "-o", "--output", help="output folder"),
    target: str = typer.Option("cpu", "--target", "-t", help="target to build for (see `effx targets`)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 | int8 | fp8 | int4w"),
    opset: int = typer.Option(23, "--opset", help="ai.onnx opset of the export"),
    batch: int = typer.Option(2, "--batch", min=1, help="batch of the checks"),
    seq: int = typer.Option(16, "--seq", min=1, help="sequence length of the checks"),
    overrides: dict | None = None,
) -> None:
    """The main job: model -> ONNX export -> build for the target -> check against PyTorch."""
    from effx.exporter.export import check_opset
    from effx.pipeline import run_pipeline

    check_opset(opset)
    spec = resolve_spec(spec_file, overrides or {})
    with _progress("run") as say:
        result = run_pipeline(spec, output, batch=batch, seq=seq, target=target, precision=precision, opset=opset,
                              progress=say)
    typer.echo(result.summary())


# ------------------------------------------------------------------------------------------------ export
@app.command()
@spec_flags
def export(
    spec_file: Optional[Path] = SpecArg,  # noqa: UP045 - typer reads this annotation at runtime
    output: Path = typer.Option(..., "-o", "--output", help="output folder (written atomically)"),
    model_dir: Optional[Path] = typer.Option(None, "--model", help="export saved weights (a model/ folder) instead of a seeded init"),  # noqa: UP045
    opset: int = typer.Option(23, "--opset", help="ai.onnx opset (18-26); 23+ turns full attention into ONNX Attention"),
    inline: bool = typer.Option(False, "--inline", help="plain ONNX: inline the effx functions, no custom domain"),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="largest batch in the recorded shape ranges"),
    trt_plugins: bool = typer.Option(False, "--trt-plugins", help="mark effx nodes for TensorRT's AOT plugins (aot=1)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
    overrides: dict | None = None,
) -> None:
    """Export to ONNX: one effx node (+ standard-ONNX function) per efficient-attention layer, and manifest.json."""
    from effx.atomic import check_output_dir
    from effx.exporter import export_model
    from effx.exporter.export import check_opset

    check_opset(opset)
    check_output_dir(output, overwrite)
    model = _load_or_build(spec_file, model_dir, overrides or {})
    with _progress("export") as say:
        manifest = export_model(model, output, opset=opset, inline=inline, max_batch=max_batch, overwrite=overwrite,
                                progress=say, trt_plugins=trt_plugins)
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
    from effx.targets.profiles import targets_table

    rows = targets_table()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from effx.report_tables import targets_rich_table

    _console().print(targets_rich_table(rows))


@app.command()
def build(
    onnx_dir: Path = typer.Argument(..., help="folder written by `effx export` (or a device kit, on the device)"),
    target: str = typer.Option("cpu", "--target", "-t", help="target name (see `effx targets`)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 | int8 | fp8 | int4w"),
    calib: str = typer.Option("random", "--calib", help="random | dynamic (ORT int8) | FILE.npz | token file"),
    calib_samples: int = typer.Option(8, "--calib-samples", min=1, help="calibration batches"),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", help="run on this DLA core (GPU fallback on)"),  # noqa: UP045
    output: Path = typer.Option(..., "-o", "--output", help="build folder (written atomically)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Build an exported model for a target: ONNX Runtime here, TensorRT engines (or a device kit) for GPUs."""
    from effx.atomic import check_output_dir
    from effx.targets.api import build as build_api
    from effx.targets.precision import check_request
    from effx.targets.profiles import get_target

    check_request(get_target(target), precision, dla_core)  # capability errors before any work
    check_output_dir(output, overwrite)
    with _progress("build") as say:
        manifest = build_api(onnx_dir, target, precision, calib, calib_samples, dla_core, output, overwrite, say)
    info = manifest.build
    for name, g in info.graphs.items():
        typer.echo(f"{name}: {output / g.file}")
    if info.engine_built:
        typer.echo(f"built {info.target} ({info.backend}, {info.precision}) -> {output}")
    else:
        typer.echo(f"no engine was built: {info.reason}")
        typer.echo(f"wrote a device build kit -> {output}; on the device run: bash {output / 'build_on_device.sh'}")


def _load_or_build(spec_file: Path | None, model_dir: Path | None, overrides: dict):
    from effx.models import build_model, load_model

    if model_dir is not None:
        if spec_file is not None or overrides:
            from effx.errors import SpecError

            raise SpecError("--model loads a saved spec with its weights; drop the spec file and spec flags")
        return load_model(model_dir)
    return build_model(resolve_spec(spec_file, overrides))


@contextlib.contextmanager
def _progress(stage: str):
    """A rich spinner whose text follows the stage's progress messages."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  transient=True, console=_console(stderr=True)) as progress:
        task = progress.add_task(stage)
        yield lambda msg: progress.update(task, description=f"{stage}: {msg}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except EffxError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"effx: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("effx: interrupted; partial output was removed", err=True)
        sys.exit(130)
    except Exception as exc:
        # usage errors of the (vendored) click inside typer: they know how to show themselves
        code = getattr(exc, "exit_code", None)
        if code is not None and callable(getattr(exc, "show", None)):
            exc.show()
            sys.exit(code)
        if type(exc).__name__ == "Exit":
            sys.exit(code or 0)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise
