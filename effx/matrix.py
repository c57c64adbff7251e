"""`effx matrix`: one model, several attention kinds x targets x precisions, built and validated cell by cell,
locally (one process per cell, as `effx bench` runs its cells; a cell that can only yield a device kit runs
in this process) or on a Ray cluster whose nodes say which targets they build for.

Each attention kind is exported once (OUT/variants/<kind>/: onnx/, and model/ when the weights do not come
from the spec's seed). A cell (kind, target, precision) builds that export for the target and validates the
build against PyTorch; its build folder, report and result.json land in OUT/cells/<cell>/. The summary is
matrix.json (rewritten after every cell), matrix.md and matrix.png (latency and error per cell).

Ray: a node offers a target with the custom resource `effx-target:<target>` (`effx worker` sets it), and a
cell is a Ray task that needs one unit of it. The export travels to the worker as bytes (a tar in the object
store) and the cell folder comes back as bytes, so nodes need no shared filesystem. A worker lost mid-cell is
retried by Ray (`max_retries`) on any node offering the target; a cell whose target no node offers runs on
this machine instead of waiting forever (a TensorRT target without TensorRT here becomes a device kit).

Resumable: a cell whose result.json holds the same inputs (its key) and a finished status is not run again;
cells that ended in ERROR are retried. Every folder is written atomically, so a rerun never reads half a cell.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import onnxruntime
import torch

import effx
from effx.check.bench import run_cell as run_bench_cell
from effx.check.validate import ValidateOptions, validate
from effx.core.atomic import atomic_dir, atomic_write_text, check_output_dir, read_marker, write_marker
from effx.core.errors import ArtifactError, CapabilityError, EffxError, SpecError, StepFailed
from effx.core.lazy import lazy_import
from effx.core.options import ExportOptions
from effx.core.spec import RunSpec
from effx.exporter import export_model
from effx.models import model_from, save_model
from effx.targets.api import build
from effx.targets.precision import check_request
from effx.targets.profiles import TARGETS, get_target
from effx.targets.tensorrt.build import why_no_engine

MATRIX_SCHEMA_VERSION = 1
RESOURCE_PREFIX = "effx-target:"
# statuses a rerun keeps; ERROR (an exception or a lost worker) is tried again
FINISHED = ("PASS", "FAIL", "KIT", "UNSUPPORTED")
Say = Callable[[str], None]


def resource_name(target: str) -> str:
    """The Ray custom resource a node sets to say it builds for `target`."""
    return RESOURCE_PREFIX + get_target(target).name


def cell_name(kind: str, target: str, precision: str) -> str:
    return f"{kind}-{target}-{precision}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ one cell
def execute_cell(work: Path, cell: dict) -> dict:
    """Build work/onnx for the cell's target and precision into work/build and validate it into work/report
    (work/model is the reference when the weights are not the spec's seed). Returns the cell's result; a failure
    of the cell itself (bad build, exception) is a result with status ERROR and its one-line reason."""
    record: dict[str, Any] = {"status": "ERROR", "reason": None, "started": _now(), "pid": os.getpid(),
                              "hostname": socket.gethostname(), "_work": str(work)}
    t0 = time.perf_counter()
    try:
        if cell.get("threads"):  # the thread count decides PyTorch's reduction order, hence the last bits
            torch.set_num_threads(int(cell["threads"]))
        manifest = build(work / "onnx", target=cell["target"], precision=cell["precision"], calib=cell["calib"],
                         calib_samples=cell["calib_samples"], out_dir=work / "build")
        info = manifest.build
        if not info.engine_built:
            record |= {"status": "KIT", "reason": info.reason}
        else:
            options = ValidateOptions(seqs=[cell["seq"]], batches=[cell["batch"]], warmup=cell["warmup"],
                                      iters=cell["iters"], plots=cell["plots"])
            reference = work / "model" if (work / "model").is_dir() else None
            report = validate(work / "build", options, reference=reference, output=work / "report",
                              raise_on_fail=False)
            outputs = [o for c in report.cases for o in c.outputs]
            own = [lat for lat in report.latency if lat.runner == report.runner]
            torch_lat = [lat for lat in report.latency if lat.runner != report.runner]
            record |= {"status": report.verdict(), "reason": None if report.passed else report.failure_summary(),
                       "max_abs": max(o.max_abs for o in outputs), "cosine": min(o.cosine for o in outputs),
                       "runner": report.runner, "p50_ms": own[0].p50_ms if own else None,
                       "torch_p50_ms": torch_lat[0].p50_ms if torch_lat else None}
    except EffxError as exc:
        record["reason"] = str(exc).splitlines()[0][:300]
    except Exception as exc:  # noqa: BLE001 - one cell's crash is its result, the matrix goes on
        first = (str(exc).strip().splitlines() or [""])[0]
        record["reason"] = f"{type(exc).__name__}: {first[:300]}"
    record |= {"finished": _now(), "seconds": round(time.perf_counter() - t0, 2)}
    return record


def _cell_main(args: dict) -> None:
    """Child side of a local cell: run it and print its result as the last line of stdout."""
    record = execute_cell(Path(args["work"]), args["cell"])
    print(json.dumps(record))


def _run_local(variant_dir: Path, cell: dict, timeout_s: float) -> tuple[dict, Path]:
    """One cell in its own process (as `effx bench` runs its cells): a crash is a result, not our crash.
    Returns (result, folder holding build/ and report/) - the caller moves the folder into place."""
    work = Path(tempfile.mkdtemp(prefix="effx-matrix-cell-"))
    for part in ("onnx", "model"):
        if (variant_dir / part).is_dir():
            os.symlink((variant_dir / part).resolve(), work / part)  # read-only inputs: no copy needed
    profile = get_target(cell["target"])
    if profile.backend == "tensorrt" and why_no_engine(profile) is not None:
        # only a device kit can come out (graphs copied or quantized, no engine built or run): not worth the
        # seconds a process of its own spends importing torch and onnx
        return execute_cell(work, cell | {"threads": 0}), work
    args = json.dumps({"work": str(work), "cell": cell})
    try:
        proc = subprocess.run([sys.executable, "-m", "effx.matrix", "cell", args], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "ERROR", "reason": f"cell ran over {timeout_s:.0f} s"}, work
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), work
        except ValueError:
            pass
    text = (proc.stderr + proc.stdout).strip().splitlines()
    last = next((ln for ln in reversed(text) if ln.strip()), f"exit code {proc.returncode}")
    return {"status": "ERROR", "reason": f"cell process died (exit code {proc.returncode}): {last[-300:]}"}, work


# ------------------------------------------------------------------------------------------ bytes in transit
def pack(folder: Path, parts: tuple[str, ...]) -> bytes:
    """The named subfolders of `folder` as an in-memory tar (links followed: the local inputs are symlinks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1, dereference=True) as tar:
        for part in parts:
            if (folder / part).exists():
                tar.add(folder / part, arcname=part)
    return buf.getvalue()


def unpack(data: bytes, dest: Path) -> None:
    """Extract a tar from `pack`, refusing members that would land outside `dest` (absolute, `..`, links)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise ArtifactError(f"refusing tar member {member.name!r}: effx cell folders hold plain files only")
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def _ray_cell(inputs: bytes, cell: dict) -> tuple[dict, bytes]:
    """Worker side of a Ray cell: the export arrives as bytes, build/ + report/ go back as bytes."""
    ray = lazy_import("ray", purpose="effx matrix --ray")
    context = ray.get_runtime_context()
    with tempfile.TemporaryDirectory(prefix="effx-matrix-cell-") as tmp:
        work = Path(tmp)
        unpack(inputs, work)
        record = execute_cell(work, cell)
        record |= {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
        return record, pack(work, ("build", "report"))


# -------------------------------------------------------------------------------------------------- matrix
def _variant(kind: str, spec: RunSpec | None, overrides: dict, params: dict, model_source: str | None) -> Any:
    """The model of one attention kind: the spec (or an hf: import) with that kind and its --param values, or
    the saved model of --model DIR (whose kind cannot change without an import)."""
    over = dict(overrides) | {"attention.kind": kind} | {f"attention.{k}": v for k, v in params.get(kind, {}).items()}
    if model_source is not None and not str(model_source).startswith("hf:"):
        model = model_from(model_source)
        if model.spec.attention_summary() != kind:
            raise SpecError(f"--model {model_source} holds {model.spec.attention_summary()} attention, not {kind}; "
                            "--attention swaps attention only for hf:PATH imports (or drop --attention)")
    elif model_source is not None:
        model = model_from(model_source, None, over)
    else:
        base = spec or RunSpec()
        model = model_from(None, base.with_overrides(over))
    return model


def _prepare_variant(out: Path, kind: str, model, model_source: str | None, export: ExportOptions, say: Say) -> tuple:
    """OUT/variants/<kind>/ (onnx/, model/ when not seeded), reused when its key matches; returns (folder, key)."""
    key = _key({"spec": json.loads(model.spec.to_json()), "export": export.model_dump(), "source": model_source,
                "effx": effx.__version__})
    folder = out / "variants" / kind
    try:
        if json.loads((folder / "variant.json").read_text())["key"] == key:
            return folder, key
    except (OSError, ValueError, KeyError, TypeError):
        pass
    say(f"export {kind}")
    with atomic_dir(folder, "matrix", overwrite=True) as tmp:
        if model_source is not None:  # imported or loaded weights: the reference travels with the cell
            save_model(model, tmp / "model")
        export_model(model, tmp / "onnx", **export.model_dump())
        (tmp / "variant.json").write_text(json.dumps({"key": key, "attention": kind, "source": model_source}) + "\n")
    return folder, key


def _previous(out: Path, name: str, key: str) -> dict | None:
    try:
        record = json.loads((out / "cells" / name / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key and record.get("status") in FINISHED else None


def _store(out: Path, record: dict, results_from: Path | bytes | None) -> None:
    """Put a finished cell into OUT/cells/<cell>/ in one rename: build/ and report/ (from a local folder or the
    bytes a worker sent) and result.json."""
    name = record["cell"]
    work = record.pop("_work", None)
    with atomic_dir(out / "cells" / name, "matrix", overwrite=True) as tmp:
        if isinstance(results_from, bytes):
            unpack(results_from, tmp)
        elif results_from is not None:
            for part in ("build", "report"):
                if (results_from / part).is_dir():
                    shutil.move(str(results_from / part), tmp / part)
        for report in (tmp / "report" / "report.json", tmp / "report" / "report.md"):
            if work and report.is_file():  # the report names the matrix's folders, not the worker's temporary one
                text = report.read_text().replace(f"{work}/model", str(out / "variants" / record["attention"] / "model"))
                report.write_text(text.replace(work, str(out / "cells" / name)))
        (tmp / "result.json").write_text(json.dumps(record, indent=2) + "\n")


def _clean_leftovers(folder: Path) -> None:
    """Temporary siblings atomic_dir leaves when the process is killed (SIGKILL skips its cleanup)."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                shutil.rmtree(entry, ignore_errors=True)


def _marked_dir(folder: Path) -> None:
    """A subfolder of OUT that carries its own marker, so OUT's marker need not list every cell file."""
    folder.mkdir(parents=True, exist_ok=True)
    if read_marker(folder) is None:
        write_marker(folder, "matrix")


def matrix(attention: list[str], targets: list[str], precisions: list[str], output: str | Path, *,
           spec: RunSpec | None = None, overrides: dict | None = None, params: dict[str, dict] | None = None,
           model_source: str | None = None, export: ExportOptions | None = None, calib: str = "random",
           calib_samples: int = 8, batch: int = 2, seq: int = 16, warmup: int = 1, iters: int = 5,
           threads: int = 0, plots: bool = True, ray: str | None = None, jobs: int = 1, retries: int = 2,
           fresh: bool = False, cell_timeout_s: float = 3600, progress: Say | None = None,
           on_cell: Callable[[dict], None] | None = None) -> dict:
    """Run the matrix into `output` and return the summary also written to output/matrix.json. `ray` is a Ray
    address (or "auto"); None runs the cells here, `jobs` at a time, each in its own process. `retries`: how
    often Ray reruns a cell whose worker died. A rerun skips finished cells (unless `fresh`)."""
    say = progress or (lambda _m: None)
    if not attention or not targets or not precisions:
        raise SpecError("effx matrix needs at least one --attention kind, --targets entry and --precisions entry")
    if len(set(attention)) != len(attention):
        raise SpecError(f"--attention {','.join(attention)}: a kind is listed twice")
    profiles = [get_target(t) for t in targets]  # unknown names fail here, before any work
    targets = list(dict.fromkeys(p.name for p in profiles))
    export = export or ExportOptions()
    params = params or {}
    unknown = sorted(set(params) - set(attention))
    if unknown:
        raise SpecError(f"--param for {', '.join(unknown)}: not among --attention {','.join(attention)}")
    out = Path(output)
    mode = check_output_dir(out, "matrix", overwrite=fresh, resumable=True)
    models = {kind: _variant(kind, spec, overrides or {}, params, model_source) for kind in attention}  # spec errors
    with contextlib.ExitStack() as stack:  # the cluster is reached (or refused) before anything is written
        cluster = stack.enter_context(connect(ray)) if ray is not None else None
        return _run_matrix(out, mode, models, attention, targets, precisions, params, model_source, export, cluster,
                           dict(calib=calib, calib_samples=calib_samples, batch=batch, seq=seq, warmup=warmup,
                                iters=iters, threads=threads, plots=plots),
                           dict(ray=ray, jobs=jobs, retries=retries, fresh=fresh, cell_timeout_s=cell_timeout_s),
                           say, on_cell)


def _run_matrix(out: Path, mode: str, models: dict, attention: list[str], targets: list[str], precisions: list[str],
                params: dict, model_source: str | None, export: ExportOptions, cluster: Any, settings: dict,
                how: dict, say: Say, on_cell: Callable[[dict], None] | None) -> dict:
    """matrix() after its checks: variants, cells, summary."""
    ray, jobs, retries, fresh, cell_timeout_s = (how[k] for k in ("ray", "jobs", "retries", "fresh", "cell_timeout_s"))
    settings["seq"] = min(settings["seq"], min(m.spec.model.max_seq_len for m in models.values()))
    if mode == "replace":
        with atomic_dir(out, "matrix", overwrite=True):  # an empty folder replaces the earlier matrix
            pass
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "matrix")  # from the first moment: a killed run is still recognised as ours on rerun
    for sub in ("variants", "cells"):
        _marked_dir(out / sub)
        _clean_leftovers(out / sub)

    plots = settings["plots"]
    cells, todo, variants = [], [], {}
    for kind in attention:
        variants[kind] = _prepare_variant(out, kind, models[kind], model_source, export, say)
        for target in targets:
            for precision in precisions:
                cell = {"cell": cell_name(kind, target, precision), "attention": kind, "target": target,
                        "precision": precision} | settings
                cell["key"] = _key({"variant": variants[kind][1], **cell})
                try:
                    check_request(get_target(target), precision)
                except CapabilityError as exc:
                    record = cell | {"status": "UNSUPPORTED", "reason": str(exc), "finished": _now()}
                    _store(out, record, None)
                    cells.append(record)
                    continue
                previous = None if fresh else _previous(out, cell["cell"], cell["key"])
                if previous is not None:
                    cells.append(previous | {"resumed": True})
                else:
                    todo.append(cell)
    summary = {"schema_version": MATRIX_SCHEMA_VERSION, "tool": "effx matrix",
               "config": {"attention": attention, "targets": targets, "precisions": precisions, "params": params,
                          "model": model_source, "export": export.model_dump(), "ray": ray} | settings,
               "environment": _environment(), "cells": cells}

    def finish(record: dict) -> None:
        cells.append(record)
        summary["cells"] = _ordered(cells, attention, targets, precisions)
        _write_json(out / "matrix.json", summary)
        if on_cell is not None:
            on_cell(record)

    say(f"{len(todo)} of {len(todo) + len(cells)} cells to run")
    runner = _ray_cells if ray is not None else _local_cells
    for record, results_from in runner(out, todo, variants, rt=cluster, jobs=jobs, retries=retries,
                                       timeout_s=cell_timeout_s, say=say):
        record = _cell_fields(record)
        _store(out, record, results_from)
        if isinstance(results_from, Path):
            shutil.rmtree(results_from, ignore_errors=True)
        finish(record)
    summary["cells"] = _ordered(cells, attention, targets, precisions)
    summary["passed"] = all(c["status"] in ("PASS", "KIT", "UNSUPPORTED") for c in summary["cells"])
    summary["plots"] = write_plot(summary, out) if plots and summary["cells"] else []
    atomic_write_text(out / "matrix.md", markdown(summary))
    _write_json(out / "matrix.json", summary)
    return summary


_CELL_ORDER = ("cell", "attention", "target", "precision", "status", "reason", "max_abs", "cosine", "p50_ms",
               "torch_p50_ms", "runner", "where", "node_id", "node_ip", "hostname", "pid", "started", "finished",
               "seconds", "note", "key")


def _cell_fields(record: dict) -> dict:
    """Every cell record with the same fields in the same order (missing ones None)."""
    return {k: record.get(k) for k in _CELL_ORDER} | {k: v for k, v in record.items() if k not in _CELL_ORDER}


def _ordered(cells: list[dict], attention: list[str], targets: list[str], precisions: list[str]) -> list[dict]:
    order = {cell_name(k, t, p): i for i, (k, t, p) in
             enumerate((k, t, p) for k in attention for t in targets for p in precisions)}
    return sorted(cells, key=lambda c: order.get(c["cell"], len(order)))


def _local_cells(out: Path, todo: list[dict], variants: dict, *, jobs: int, timeout_s: float, say: Say,
                 **_: Any) -> Iterator[tuple[dict, Path]]:
    """Cells on this machine, each in its own process, `jobs` at a time."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_run_local, variants[c["attention"]][0], c, timeout_s): c for c in todo}
        for future in as_completed(futures):
            cell = futures[future]
            record, work = future.result()
            say(f"{cell['cell']}: {record['status']}")
            yield cell | record | {"where": "local"}, work


@contextlib.contextmanager
def connect(address: str) -> Iterator[Any]:
    """The `ray` module, connected to the cluster at `address` ("auto": the one this machine belongs to); a
    connection this call opened is closed after."""
    ray = lazy_import("ray", purpose="effx matrix --ray")
    own = not ray.is_initialized()
    if own:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        host, _, port = address.rpartition(":")
        if address != "auto" and "://" not in address and port.isdigit():
            try:  # ray.init waits minutes for an address where no cluster listens: ask the port first
                socket.create_connection((host, int(port)), timeout=5).close()
            except OSError as exc:
                raise SpecError(f"--ray {address}: no Ray head answers there ({exc.__class__.__name__}); start one "
                                "with `effx worker --head` (or `ray start --head`) and pass its HOST:6379") from None
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SpecError(f"--ray {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0][:200]}); "
                            "start one with `effx worker --head` or `ray start --head`") from None
    try:
        yield ray
    finally:
        if own:
            ray.shutdown()


def offered_targets(ray: Any) -> dict[str, float]:
    """target -> units of `effx-target:<target>` the live nodes offer."""
    return {k.removeprefix(RESOURCE_PREFIX): v for k, v in ray.cluster_resources().items()
            if k.startswith(RESOURCE_PREFIX)}


def _ray_cells(out: Path, todo: list[dict], variants: dict, *, rt: Any, retries: int, jobs: int, timeout_s: float,
               say: Say, **_: Any) -> Iterator[tuple[dict, bytes | Path | None]]:
    """Cells as Ray tasks needing `effx-target:<target>` (`rt`: the connected ray module); cells of targets no
    node offers run here."""
    offered = offered_targets(rt)
    remote = rt.remote(_ray_cell)
    inputs: dict[str, Any] = {}
    pending: dict[Any, dict] = {}
    local = []
    for cell in todo:
        if cell["target"] not in offered:
            local.append(cell)
            continue
        kind = cell["attention"]
        if kind not in inputs:  # one copy per export in the object store, shared by its cells
            inputs[kind] = rt.put(pack(variants[kind][0], ("onnx", "model")))
        ref = remote.options(name=f"effx-cell:{cell['cell']}", resources={resource_name(cell["target"]): 1},
                             max_retries=retries, retry_exceptions=False).remote(inputs[kind], cell)
        pending[ref] = cell | {"submitted": time.monotonic()}
    say(f"{len(pending)} cells on Ray ({', '.join(f'{t}: {n:g}' for t, n in sorted(offered.items())) or 'none'}),"
        f" {len(local)} here")
    for record, work in _local_cells(out, local, variants, jobs=jobs, timeout_s=timeout_s, say=say):
        yield record | {"note": f"no Ray node offers {resource_name(record['target'])}; ran on the driver"}, work
    while pending:
        ready, _ = rt.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in ready:
            cell = pending.pop(ref)
            cell.pop("submitted")
            try:
                record, data = rt.get(ref)
                say(f"{cell['cell']}: {record['status']} on {record.get('hostname')} pid {record.get('pid')}")
                yield cell | record | {"where": "ray"}, data
            except rt.exceptions.RayError as exc:  # the worker (or its node) died on every try
                reason = f"worker lost while running the cell ({type(exc).__name__}) after {retries} retries"
                yield cell | {"status": "ERROR", "reason": reason, "where": "ray", "finished": _now()}, None
        if ready:
            continue
        alive = offered_targets(rt)
        for ref, cell in list(pending.items()):
            stuck = cell["target"] not in alive
            late = time.monotonic() - cell["submitted"] > timeout_s
            if stuck or late:  # never a hang: a cell no node can take any more is reported
                rt.cancel(ref, force=True)
                pending.pop(ref)
                cell.pop("submitted")
                reason = (f"no live Ray node offers {resource_name(cell['target'])} any more" if stuck
                          else f"cell ran over {timeout_s:.0f} s")
                yield cell | {"status": "ERROR", "reason": reason, "where": "ray", "finished": _now()}, None


# ---------------------------------------------------------------------------------------------- bench --ray
def _ray_bench_cell(build: bytes, folder: str, args: tuple, kwargs: dict) -> dict:
    """Worker side of an `effx bench --ray` cell: bench's own run_cell (child processes under RLIMIT_AS) on
    the build that arrived as bytes."""
    ray = lazy_import("ray", purpose="effx bench --ray")
    with tempfile.TemporaryDirectory(prefix="effx-bench-cell-") as tmp:
        unpack(build, Path(tmp))
        cell = run_bench_cell(Path(tmp) / folder, *args, **kwargs)
    return cell | {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                   "hostname": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def ray_bench_runner(address: str, target: str, retries: int = 2) -> Iterator[Callable[..., dict]]:
    """A cell runner for effx.check.bench.bench: each cell a Ray task needing `effx-target:<target>`. Cells
    run one at a time (latency is what bench measures; two cells on one node would disturb each other)."""
    with connect(address) as rt:
        name = resource_name(target)
        if get_target(target).name not in offered_targets(rt):
            raise SpecError(f"--ray {address}: no node of the cluster offers {name}; start one with "
                            f"`effx worker --address HEAD:6379 --targets {target}`")
        remote = rt.remote(_ray_bench_cell)
        shipped: dict[str, Any] = {}

        def run(build_dir: Path, *args: Any, **kwargs: Any) -> dict:
            build_dir = Path(build_dir)
            if str(build_dir) not in shipped:  # one copy of each kind's build in the object store
                shipped[str(build_dir)] = rt.put(pack(build_dir.parent, (build_dir.name,)))
            ref = remote.options(name=f"effx-bench-cell:{build_dir.parent.name}", resources={name: 1},
                                 max_retries=retries, retry_exceptions=False).remote(
                shipped[str(build_dir)], build_dir.name, args, kwargs)
            while True:
                ready, _ = rt.wait([ref], timeout=5.0)
                if ready:
                    break
                if get_target(target).name not in offered_targets(rt):  # never a hang on a vanished node
                    rt.cancel(ref, force=True)
                    return {"status": "error", "detail": f"no live Ray node offers {name} any more"}
            try:
                return rt.get(ref)
            except rt.exceptions.RayError as exc:
                return {"status": "error", "detail": f"worker lost ({type(exc).__name__}) after {retries} retries"}

        yield run


# --------------------------------------------------------------------------------------------------- output
def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    write_marker(path.parent, "matrix")


def _environment() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "effx": effx.__version__,
            "hostname": socket.gethostname()}


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def rows(summary: dict) -> list[list[str]]:
    """One row per cell: the same text in the markdown summary and the CLI's rich table."""
    out = []
    for c in summary["cells"]:
        where = c.get("hostname") or "-"
        if c.get("pid"):
            where += f" pid {c['pid']}"
        out.append([c["attention"], c["target"], c["precision"], c["status"], _g(c.get("max_abs")),
                    "-" if c.get("cosine") is None else f"{c['cosine']:.6f}", _g(c.get("p50_ms")), where,
                    "; ".join(x for x in (c.get("reason"), c.get("note")) if x)])
    return out


HEADERS = ["attention", "target", "precision", "verdict", "max |err|", "cosine", "p50 ms", "ran on", "reason"]


def markdown(summary: dict) -> str:
    lines = ["# effx matrix", "", f"{len(summary['cells'])} cells; "
             f"{'PASS' if summary.get('passed') else 'FAIL'} (KIT: a device build kit, built on the device; "
             "UNSUPPORTED: the target does not offer the precision)", "",
             "| " + " | ".join(HEADERS) + " |", "|---" * len(HEADERS) + "|"]
    lines += ["| " + " | ".join(r[:-1] + [r[-1].replace("|", "/")]) + " |" for r in rows(summary)]
    return "\n".join(lines) + "\n"


def write_plot(summary: dict, out: Path) -> list[str]:
    """matrix.png: latency p50 and max abs error per validated cell (log scale), verdict in the colour."""
    matplotlib = lazy_import("matplotlib", purpose="the matrix plot")
    matplotlib.use("Agg")
    plt = lazy_import("matplotlib.pyplot", purpose="the matrix plot")
    cells = [c for c in summary["cells"] if c.get("max_abs") is not None]
    if not cells:
        return []
    names = [f"{c['attention']}\n{c['target']} {c['precision']}" for c in cells]
    colours = ["tab:green" if c["status"] == "PASS" else "tab:red" for c in cells]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(cells) + 2), 4))
    for ax, key, label in ((axes[0], "p50_ms", "latency p50 (ms)"), (axes[1], "max_abs", "max abs error vs PyTorch")):
        values = [c.get(key) or 0.0 for c in cells]
        ax.bar(range(len(cells)), values, color=colours)
        ax.set_xticks(range(len(cells)), names, fontsize=7)
        ax.set(ylabel=label, yscale="log" if min(values) > 0 else "linear")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("effx matrix (green PASS, red FAIL)")
    fig.tight_layout()
    tmp = out / ".matrix.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out / "matrix.png")  # a rerun never finds half a picture
    return ["matrix.png"]


# --------------------------------------------------------------------------------------------------- worker
def buildable_targets() -> dict[str, str | None]:
    """target -> None when this machine can build (and run) it, else the reason: ONNX Runtime's cpu always,
    cuda with onnxruntime's CUDA provider, TensorRT targets only with TensorRT and the target's GPU."""
    out: dict[str, str | None] = {}
    for profile in TARGETS.values():
        if profile.name == "cpu":
            out["cpu"] = None
        elif profile.backend == "ort":
            providers = onnxruntime.get_available_providers()
            out[profile.name] = None if "CUDAExecutionProvider" in providers else "no CUDA provider in onnxruntime"
        else:
            out[profile.name] = why_no_engine(profile)
    return out


def worker_command(address: str | None, targets: list[str], slots: int, num_cpus: int | None = None) -> list[str]:
    """`ray start` joining `address` (or starting a head node when None) offering `targets`, `slots` cells each."""
    resources = {resource_name(t): slots for t in targets}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    cmd += ["--head", "--include-dashboard=false"] if address is None else ["--address", address]
    cmd += ["--resources", json.dumps(resources)]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    return cmd


def start_worker(address: str | None, targets: list[str], slots: int = 1, num_cpus: int | None = None,
                 dry_run: bool = False) -> list[str]:
    """Join (or start) a Ray cluster offering `targets`; returns the `ray start` command it ran."""
    if slots < 1:
        raise SpecError(f"--slots {slots}: a node offers at least one cell at a time")
    cmd = worker_command(address, [get_target(t).name for t in targets], slots, num_cpus)
    if dry_run:
        return cmd
    lazy_import("ray", purpose="effx worker")
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)  # its stdout (the address) shows
    if proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
        raise StepFailed(f"`ray start` failed (exit code {proc.returncode}): {last[-300:]}")
    return cmd


if __name__ == "__main__":  # python -m effx.matrix cell '{...}': one local cell, in its own process
    if len(sys.argv) == 3 and sys.argv[1] == "cell":
        _cell_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: effx matrix ... (python -m effx.matrix cell JSON is internal)")
