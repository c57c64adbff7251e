"""`effx validate`: run a built artifact and the PyTorch reference on the same inputs and say how far apart
they are, and where they part.

1. Numerics per output (max abs / rel, mean, cosine, share over tolerance; tolerance by precision from
   effx.tolerance); decoders are driven prefill + decode step by step with the manifest's cache plan
   (teacher-forced logits per step) and also generate greedily, comparing tokens with PyTorch's.
2. On failure, the first diverging block: block boundaries are found in the ONNX graph from the module
   scopes the exporter records on every node (only boundaries are exposed, so fusion inside blocks is not
   disturbed), and bisected: each probe exposes one boundary and compares it with PyTorch's hidden state.
3. Latency (warm-up, then p50/p90/p99, mean, throughput) and peak memory of the runner and the reference,
   with the environment they ran in.
4. report.json (effx.report schema), report.md, PNG plots; exit code 1 on FAIL.
"""

from __future__ import annotations

import ast
import datetime as _dt
import os
import platform
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from effx.errors import ArtifactError, SpecError, ValidationFailed
from effx.manifest import Manifest
from effx.report import (
    CaseCheck,
    DecodeCheck,
    Divergence,
    Latency,
    Memory,
    OutputCheck,
    Probe,
    ValidationReport,
    write_plots,
    write_report,
)
from effx.runners import OrtRunner, Runner, TorchRunner, decode_loop, greedy, open_runner
from effx.tolerance import Tolerance, agreement, tolerance_for

Say = Callable[[str], None]


@dataclass
class Case:
    feed: dict[str, np.ndarray]  # input_ids (+ attention_mask for encoders)

    @property
    def batch(self) -> int:
        return int(self.feed["input_ids"].shape[0])

    @property
    def seq(self) -> int:
        return int(self.feed["input_ids"].shape[1])


# ------------------------------------------------------------------------------------------------ reference
def load_reference(manifest: Manifest, folder: Path, reference: str | Path | None = None):
    """The PyTorch model the artifact was exported from: `reference` (a model/ folder written by effx, or a
    Hugging Face folder via `hf:PATH`), else the model/ folder of an `effx run` output next to it, else the
    spec's seeded initialisation; checked against the weights digest the export recorded."""
    from effx.models import build_model, load_model
    from effx.models.transformer import weights_digest
    from effx.spec import RunSpec

    expected = (manifest.weights or {}).get("sha256")
    candidates: list[tuple[str, Callable[[], Any]]] = []
    if reference is not None:
        ref = str(reference)
        if ref.startswith("hf:"):
            from effx.models.hf_import import import_hf

            candidates.append((ref, lambda: import_hf(ref[3:], _spec_overrides(manifest))))
        else:
            candidates.append((ref, lambda: load_model(reference)))
    else:
        for up in (folder.parent.parent / "model", folder.parent / "model"):
            if (up / "model.safetensors").is_file():
                candidates.append((str(up), lambda up=up: load_model(up)))
        spec = RunSpec.model_validate(manifest.spec)
        candidates.append((f"seed {spec.model.seed} of the spec", lambda: build_model(spec)))
    for source, make in candidates:
        model = make()
        digest = weights_digest(model)
        if expected is None or digest == expected:
            return model, {"source": source, "weights_sha256": digest}
        if reference is not None:
            raise ArtifactError(f"{source}: its weights (sha256 {digest[:12]}) are not the ones exported to "
                                f"{folder} ({expected[:12]}); pass the model the export was made from")
    raise ArtifactError(f"{folder}: the export was made from weights (sha256 {expected[:12]}) that are neither "
                        "the spec's seeded initialisation nor a model/ folder beside it; pass --reference MODEL_DIR")


def _spec_overrides(manifest: Manifest) -> dict[str, Any]:
    """Attention/cache of the exported spec, to swap into an imported Hugging Face model the same way."""
    spec = manifest.spec
    out = {f"attention.{k}": v for k, v in spec["attention"].items()}
    out |= {f"kv_cache.{k}": v for k, v in spec["kv_cache"].items()}
    return out | {"model.max_seq_len": spec["model"]["max_seq_len"]}


# --------------------------------------------------------------------------------------------------- inputs
def make_cases(manifest: Manifest, inputs: str, seqs: list[int], batches: list[int], seed: int = 0) -> list[Case]:
    spec = manifest.spec["model"]
    encoder = manifest.family == "encoder"
    if inputs != "random":
        path = Path(inputs)
        if not path.is_file():
            raise SpecError(f"--inputs {inputs}: no such file; pass `random` or an .npz with input_ids (B, N)")
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
            ids = rng.integers(0, spec["vocab_size"], (batch, seq), dtype=np.int64)
            feed = {"input_ids": ids}
            if encoder:
                mask = np.ones_like(ids)
                if batch > 1 and seq > 2:
                    mask[-1, seq - seq // 4:] = 0  # one padded row, so the mask path is checked too
                feed["attention_mask"] = mask
            cases.append(Case(feed))
    return cases


# ------------------------------------------------------------------------------------------------- numerics
def _check(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> OutputCheck:
    a = agreement(got, ref, tol)
    return OutputCheck(name=name, shape=list(got.shape), **a.as_dict())


def _encoder_case(runner: Runner, reference: TorchRunner, case: Case, tol: Tolerance, errors: dict) -> CaseCheck:
    graph = runner.graphs[0]
    feed = case.feed if "attention_mask" in case.feed else {"input_ids": case.feed["input_ids"]}
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
    return CaseCheck(batch=case.batch, seq=case.seq, outputs=checks, passed=all(c.passed for c in checks))


def _decoder_case(runner: Runner, reference: TorchRunner, manifest: Manifest, case: Case, tol: Tolerance,
                  steps: int, errors: dict) -> CaseCheck:
    ids = case.feed["input_ids"]
    n = ids.shape[1]
    prompt = max(1, n // 2)
    got = decode_loop(runner.infer, manifest, ids, prompt)
    whole = _model_logits(reference.model, ids)  # the model's own whole-sequence forward
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


def _model_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(ids)).float().cpu().numpy()


def _drift(model, cases: list[Case], manifest: Manifest, say: Say) -> list[OutputCheck]:
    """For an imported model whose attention was swapped: how far the reference itself has moved from the
    original (full-attention) model on the same inputs. Informational: swapped models need fine-tuning."""
    origin = getattr(model, "origin", None)
    if not origin or "hf" not in origin or manifest.spec["attention"]["kind"] == "full":
        return []
    import torch

    from effx.models.hf_import import import_hf

    say("drift from the original model")
    spec = manifest.spec
    original = import_hf(origin["hf"], {"model.max_seq_len": spec["model"]["max_seq_len"],
                                        "kv_cache.layout": spec["kv_cache"]["layout"]})
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


# ---------------------------------------------------------------------------------------------- bisection
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)$")


def _scope(node) -> tuple[int | None, bool]:
    """(block index, belongs to a module) of an ONNX node, from the exporter's name-scope metadata."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None, False
            for s in scopes:
                m = _BLOCK.search(s)
                if m:
                    return int(m.group(1)), True
            return None, any(s.startswith("model.") or s == "model" for s in scopes)
    return None, False


def block_boundaries(path: Path) -> dict[int, str]:
    """Per block, the tensor that carries its output to what follows: the last tensor a block's nodes
    produce that is consumed by nodes of another scope (looking through scope-less nodes such as the
    Q/DQ pairs a quantiser inserts)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    scopes = [_scope(n) for n in graph.node]
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)

    def scoped_consumers(tensor: str, seen: set[str]) -> list[int]:
        out = []
        for j in consumers.get(tensor, []):
            if scopes[j][1]:
                out.append(j)
            else:
                for t in graph.node[j].output:
                    if t not in seen:
                        seen.add(t)
                        out += scoped_consumers(t, seen)
        return out

    boundaries: dict[int, str] = {}
    for i, n in enumerate(graph.node):
        block = scopes[i][0]
        if block is None:
            continue
        for t in n.output:
            if any(scopes[j][0] != block for j in scoped_consumers(t, {t})):
                boundaries[block] = t  # later nodes overwrite: the last one wins
    return boundaries


def find_divergence(runner: Runner, reference: TorchRunner, case: Case, tol: Tolerance, say: Say) -> Divergence:
    """Bisect over block boundaries of the graph that sees the whole input (encoder / prefill)."""
    if not isinstance(runner, OrtRunner):
        return Divergence(graph="", block=None, layer="not located", probes=[],
                          note="bisection exposes ONNX tensors: run `effx validate` on the onnx/ folder or an ORT "
                               "build of the same export to locate the layer")
    graph = runner.graphs[0]
    path = runner._files[graph]
    marks = block_boundaries(path)
    n_blocks = len(reference.model.blocks)
    if sorted(marks) != list(range(n_blocks)):
        return Divergence(graph=graph, block=None, layer="not located", probes=[],
                          note=f"{path.name} carries no module scopes for every block (found {sorted(marks)})")
    feed = {"input_ids": case.feed["input_ids"]}
    if "attention_mask" in case.feed:
        feed["attention_mask"] = case.feed["attention_mask"]
    else:
        from effx.runners import prefill_feed

        feed = prefill_feed(runner.manifest, feed["input_ids"], feed["input_ids"].shape[1])
    hidden = reference.block_outputs(feed)
    probes: dict[int, Probe] = {}

    def probe(block: int) -> bool:
        say(f"bisect: probing the output of block {block}")
        with OrtRunner(runner.folder, runner.manifest, extra_outputs={graph: [marks[block]]}) as r:
            got = r.infer(feed, graph)[marks[block]]
        ref = hidden[block]
        if "attention_mask" in feed:
            keep = feed["attention_mask"].astype(bool)
            got, ref = got[keep], ref[keep]
        a = agreement(got, ref, tol)
        probes[block] = Probe(block=block, tensor=marks[block], max_abs=a.max_abs, cosine=a.cosine, passed=a.passed)
        return a.passed

    if probe(n_blocks - 1):
        block, layer, note = None, "the head after the last block (final norm / lm_head)", \
            "every block output agrees with PyTorch"
    else:
        lo, hi = 0, n_blocks - 1  # invariant: block hi diverges; the first diverging block is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid + 1
            else:
                hi = mid
        block, layer = lo, f"model.blocks.{lo}"
        note = f"{len(probes)} probes over {n_blocks} blocks; blocks before {lo} agree"
        if lo == 0:
            note += " (or the embeddings before block 0)"
    return Divergence(graph=graph, block=block, layer=layer, probes=sorted(probes.values(), key=lambda p: p.block),
                      note=note)


# ------------------------------------------------------------------------------------------ latency, memory
class PeakRss:
    """Peak resident memory growth while the block runs, sampled every 2 ms (ORT and TensorRT allocate
    outside Python, so tracemalloc cannot see them). Allocators keep freed memory, so this reads high when
    an earlier stage already grew the process: compare runners measured in the same order."""

    method = "sampled RSS growth (/proc/self/statm)"

    def __init__(self) -> None:
        self.peak_mb: float | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None

    def __enter__(self) -> PeakRss:
        self._base = self._rss()
        self._peak = self._base or 0
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._peak = max(self._peak, self._rss() or 0)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._base is not None:
            self._peak = max(self._peak, self._rss() or 0)
            self.peak_mb = (self._peak - self._base) / 2**20


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def _time(runner: Runner, feed: dict, graph: str, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        runner.infer(feed, graph)
    start = len(runner.timings_ms[graph])
    for _ in range(iters):
        runner.infer(feed, graph)
    return runner.timings_ms[graph][start:]


def measure(runner: Runner, manifest: Manifest, case: Case, warmup: int, iters: int,
            samples: dict[str, list[float]]) -> list[Latency]:
    """Latency of the runner's graphs on `case`: the encoder forward, or a prefill and one decode step."""
    batch, seq = case.batch, case.seq
    out = []
    if manifest.family == "encoder" or "decode" not in runner.graphs:
        graph = runner.graphs[0]
        feed = case.feed if "attention_mask" in case.feed else {"input_ids": case.feed["input_ids"]}
        ms = _time(runner, feed, graph, warmup, iters)
        p = percentiles(ms)
        out.append(Latency(runner=runner.name, graph=graph, batch=batch, seq=seq, warmup=warmup, iters=iters, **p,
                           throughput=batch * seq / (p["mean_ms"] / 1e3), unit="tokens/s"))
        samples[f"{runner.name} {graph}"] = ms
        return out
    from effx.runners import cache_feed, prefill_feed, step_feed

    ids = case.feed["input_ids"]
    pre = prefill_feed(manifest, ids[:, :-1], seq)
    ms = _time(runner, pre, "prefill", warmup, iters)
    p = percentiles(ms)
    out.append(Latency(runner=runner.name, graph="prefill", batch=batch, seq=seq - 1, warmup=warmup, iters=iters, **p,
                       throughput=batch * (seq - 1) / (p["mean_ms"] / 1e3), unit="tokens/s"))
    samples[f"{runner.name} prefill"] = ms
    outs = runner.infer(pre, "prefill")
    step = step_feed(manifest, ids[:, -1:], seq - 1, cache_feed(outs), pre.get("block_table"))
    ms = _time(runner, step, "decode", warmup, iters)
    p = percentiles(ms)
    out.append(Latency(runner=runner.name, graph="decode", batch=batch, seq=1, warmup=warmup, iters=iters, **p,
                       throughput=batch / (p["mean_ms"] / 1e3), unit="tokens/s"))
    samples[f"{runner.name} decode"] = ms
    return out


def environment(runner: Runner) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    import effx

    env: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                           "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "python": platform.python_version(), "effx": effx.__version__,
                           "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                           "numpy": np.__version__}
    if isinstance(runner, OrtRunner):
        env["ort_providers"] = runner.providers
        env["ort_intra_op_threads"] = runner.threads or "default (physical cores)"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    if runner.name == "tensorrt":
        env["tensorrt"] = getattr(runner, "_trt", None) and runner._trt.__version__
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -------------------------------------------------------------------------------------------------- validate
def validate(artifact: str | Path, against: str = "torch", inputs: str = "random", seqs: list[int] | None = None,
             batches: list[int] | None = None, steps: int = 8, reference: str | Path | None = None,
             output: str | Path | None = None, warmup: int = 3, iters: int = 20, plots: bool = True,
             provider: str | None = None, bisect: bool = True, progress: Say | None = None,
             raise_on_fail: bool = True) -> ValidationReport:
    """Validate the artifact folder (a build/ or an onnx/ folder) against PyTorch; writes report.json,
    report.md and plots to `output` (default: `<artifact>.validate` beside it) and returns the report. Raises
    ValidationFailed (exit code 1) after writing the report when it fails."""
    from effx.atomic import atomic_dir

    say = progress or (lambda _m: None)
    if against != "torch":
        raise SpecError(f"--against {against}: effx validates against the PyTorch reference only (`torch`)")
    folder = Path(artifact)
    manifest = Manifest.read(folder)
    manifest.verify_files(folder)
    info = manifest.build
    precision = info.precision if info else "fp32"
    tol = tolerance_for(precision)
    max_len = manifest.spec["model"]["max_seq_len"]
    seqs = seqs or [min(16, max_len)]
    batches = batches or [2]
    cases = make_cases(manifest, inputs, seqs, batches, seed=manifest.spec["model"]["seed"] + 1)
    out_dir = Path(output) if output is not None else folder.parent / f"{folder.name}.validate"
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "report.json").is_file():
        raise ArtifactError(f"{out_dir} exists and is not an effx report folder; choose another -o")

    say("reference model")
    with PeakRss() as ref_mem:
        model, ref_info = load_reference(manifest, folder, reference)
    runner = open_runner(folder, manifest, provider=provider)
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
            latency += measure(ref_runner, manifest, cases[-1], warmup, iters, samples)
        with PeakRss() as run_mem, runner:
            for case in cases:
                say(f"numerics at batch {case.batch} x seq {case.seq}")
                if manifest.family == "encoder" or "decode" not in runner.graphs:
                    checks.append(_encoder_case(runner, ref_runner, case, tol, errors))
                else:
                    checks.append(_decoder_case(runner, ref_runner, manifest, case, tol, steps, errors))
            say("latency")
            latency = measure(runner, manifest, cases[-1], warmup, iters, samples) + latency
        passed = all(c.passed for c in checks)
        if not passed and bisect:
            bad = next(c for c, chk in zip(cases, checks, strict=True) if not chk.passed)
            with runner:
                divergence = find_divergence(runner, ref_runner, bad, tol, say)
    drift = _drift(model, cases, manifest, say)
    memory = [Memory(runner=runner.name, peak_mb=run_mem.peak_mb, method=PeakRss.method),
              Memory(runner="torch (load)", peak_mb=ref_mem.peak_mb, method=PeakRss.method),
              Memory(runner="torch (run)", peak_mb=ref_run_mem.peak_mb, method=PeakRss.method)]
    spec = manifest.spec
    report = ValidationReport(
        output=str(out_dir),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), artifact=str(folder),
        stage=manifest.stage, target=info.target if info else "onnx (ONNX Runtime CPU)",
        backend=info.backend if info else "ort", precision=precision, family=manifest.family,
        attention=spec["attention"]["kind"], kv_cache=spec["kv_cache"]["layout"], runner=runner.name,
        against=against, reference=ref_info,
        inputs=inputs if inputs != "random" else f"random tokens, seq {seqs} x batch {batches}",
        tolerance=tol.as_dict(), cases=checks, divergence=divergence, drift=drift, latency=latency, memory=memory,
        environment=environment(runner), passed=passed,
    )
    with atomic_dir(out_dir, overwrite=True) as tmp:
        if plots:
            say("plots")
            from effx._lazy import has_module

            if has_module("matplotlib"):
                report.plots = write_plots(tmp, errors, samples)
            else:
                report.environment["plots"] = "skipped: pip install 'effx[plot]' (matplotlib)"
        write_report(report, tmp)
    if raise_on_fail:
        check_passed(report, out_dir)
    return report


def check_passed(report: ValidationReport, out_dir: Path) -> None:
    """Raise ValidationFailed (exit code 1) naming the first failing output and diverging layer."""
    if not report.passed:
        raise ValidationFailed(f"{report.artifact}: FAIL against PyTorch ({report.precision} tolerance): "
                               f"{report.failure_summary()}; report: {Path(out_dir) / 'report.md'}")


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{flag} {text!r}: expected comma-separated integers, e.g. {flag} 128,512") from None
    if not values or min(values) < 1:
        raise SpecError(f"{flag} {text!r}: expected positive integers, e.g. {flag} 128,512")
    return values


