"""Runners: every backend behind one small interface, as in Polygraphy. A runner is a context manager that
loads its artifact on entry and frees it on exit; `infer(feed, graph)` takes and returns numpy arrays by
tensor name and records its own wall time per graph. The PyTorch reference is just another runner, built
from the same graph modules the exporter traced, so the comparison is graph for graph.

- `TorchRunner`: the effx model (spec + weights) on CPU or CUDA.
- `OrtRunner`: ONNX Runtime (CPU, or CUDA EP when onnxruntime-gpu is installed) on an onnx/ or build/ folder.
- `TrtRunner`: TensorRT engines of a build folder (lazy; needs tensorrt and a GPU).

Decoders are driven by `decode_loop` / `greedy` over any runner, following the manifest's cache plan.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from effx.errors import ArtifactError, CapabilityError
from effx.manifest import Manifest

Feed = dict[str, np.ndarray]


class Runner:
    """Base: timing and the context-manager protocol. Subclasses implement `_load`, `_infer`, `_free`."""

    name = "runner"

    def __init__(self) -> None:
        self.timings_ms: dict[str, list[float]] = defaultdict(list)
        self._active = False

    def __enter__(self) -> Runner:
        self._load()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        self._free()

    @property
    def graphs(self) -> list[str]:
        raise NotImplementedError

    def output_names(self, graph: str) -> list[str]:
        raise NotImplementedError

    def infer(self, feed: Feed, graph: str | None = None) -> dict[str, np.ndarray]:
        if not self._active:
            raise RuntimeError(f"{self.name}: use the runner inside a `with` block")
        graph = graph or self.graphs[0]
        t0 = time.perf_counter()
        out = self._infer(feed, graph)
        self.timings_ms[graph].append((time.perf_counter() - t0) * 1e3)
        return out

    def _load(self) -> None:
        pass

    def _free(self) -> None:
        pass

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------- torch
class TorchRunner(Runner):
    """The PyTorch reference: the exporter's own graph modules (EncoderGraph, StepGraph) around the model."""

    name = "torch"

    def __init__(self, model, device: str = "cpu"):
        super().__init__()
        self.model, self.device = model, device
        self._plans: dict[str, Any] = {}

    def _load(self) -> None:
        from effx.exporter.graphs import plan_graphs

        self.model.to(self.device).eval()
        self._plans = {p.name: p for p in plan_graphs(self.model)}

    def _free(self) -> None:
        self._plans = {}

    @property
    def graphs(self) -> list[str]:
        return list(self._plans)

    def output_names(self, graph: str) -> list[str]:
        return list(self._plans[graph].output_names)

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        import torch

        plan = self._plans[graph]
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in plan.input_names]
        with torch.inference_mode():
            out = plan.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return {n: t.float().cpu().numpy() for n, t in zip(plan.output_names, out, strict=True)}

    def block_outputs(self, feed: Feed) -> list[np.ndarray]:
        """Hidden states after each block for the whole-sequence forward (what a prefill on an empty cache
        computes too), for locating the first diverging block."""
        import torch

        outs: list[np.ndarray] = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.float().cpu().numpy()))
                 for b in self.model.blocks]
        try:
            ids = torch.from_numpy(feed["input_ids"]).to(self.device)
            mask = feed.get("attention_mask")
            with torch.inference_mode():
                self.model(ids, None if mask is None else torch.from_numpy(mask).to(self.device))
        finally:
            for h in hooks:
                h.remove()
        return outs


# --------------------------------------------------------------------------------------------------- ORT
def _ort_providers(preferred: str | None = None) -> list[str]:
    import onnxruntime as ort

    if preferred not in (None, "cpu", "cuda"):
        from effx.errors import SpecError

        raise SpecError(f"--provider {preferred}: ONNX Runtime runners take cpu or cuda (TensorRT builds run as engines)")
    available = ort.get_available_providers()
    if preferred == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise CapabilityError("ONNX Runtime has no CUDAExecutionProvider here; pip install 'effx[gpu]' "
                                  "(onnxruntime-gpu) on a CUDA machine, or validate on the CPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner(Runner):
    """ONNX Runtime sessions over the graphs of an onnx/ or build/ folder (the files its manifest lists)."""

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest | None = None, provider: str | None = None,
                 threads: int = 0, extra_outputs: dict[str, list[str]] | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)
        self.providers = _ort_providers(provider)
        self.threads = threads
        self.extra_outputs = extra_outputs or {}
        self._sessions: dict[str, Any] = {}
        files = self.manifest.build.graphs if self.manifest.build else self.manifest.graphs
        self._files = {name: self.folder / g.file for name, g in files.items()}

    @property
    def graphs(self) -> list[str]:
        return list(self._files)

    def output_names(self, graph: str) -> list[str]:
        return [o.name for o in self._sessions[graph].get_outputs()]

    def _load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        for name, path in self._files.items():
            extra = self.extra_outputs.get(name)
            source: str | bytes = str(path) if not extra else with_outputs(path, extra)
            self._sessions[name] = ort.InferenceSession(source, opts, providers=self.providers)

    def _free(self) -> None:
        self._sessions = {}

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        sess = self._sessions[graph]
        names = [i.name for i in sess.get_inputs()]
        out = sess.run(None, {n: feed[n] for n in names})
        return dict(zip(self.output_names(graph), out, strict=True))


def with_outputs(path: Path, names: list[str]) -> bytes:
    """The ONNX model at `path` with the named intermediate tensors added as graph outputs (serialised:
    weights inline, fine below protobuf's 2 GB, which is where bisection is used: the model under test)."""
    import onnx

    model = onnx.load(str(path))
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString()


# -------------------------------------------------------------------------------------------------- TensorRT
class TrtRunner(Runner):
    """TensorRT engines of a build folder, with I/O in torch CUDA tensors (TensorRT 10/11 name-based API:
    set_input_shape, set_tensor_address, execute_async_v3)."""

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)
        info = self.manifest.build
        if info is None or info.backend != "tensorrt" or not info.engine_built:
            raise ArtifactError(f"{self.folder}: no TensorRT engines here (a device kit? build it on the device)")
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}

    @property
    def graphs(self) -> list[str]:
        return list(self.manifest.build.graphs)

    def output_names(self, graph: str) -> list[str]:
        return [t.name for t in self.manifest.build.graphs[graph].outputs]

    def _load(self) -> None:
        from effx._lazy import lazy_import
        from effx.targets.tensorrt_build import _register_plugins

        trt = lazy_import("tensorrt", extra="tensorrt", purpose="running TensorRT engines")
        _register_plugins()
        self._trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        for name, g in self.manifest.build.graphs.items():
            engine = runtime.deserialize_cuda_engine((self.folder / g.file).read_bytes())
            if engine is None:
                raise ArtifactError(f"{self.folder / g.file}: TensorRT could not deserialize the engine "
                                    f"(built with TensorRT {self.manifest.build.tensorrt_version}, sm_{self.manifest.build.sm})")
            self._engines[name] = engine
            self._contexts[name] = engine.create_execution_context()

    def _free(self) -> None:
        self._contexts, self._engines = {}, {}

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
        import torch

        trt = self._trt
        engine, ctx = self._engines[graph], self._contexts[graph]
        keep: list[torch.Tensor] = []
        outputs: dict[str, torch.Tensor] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.from_numpy(np.ascontiguousarray(feed[name])).cuda()
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
                keep.append(t)
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = _torch_dtype(engine.get_tensor_dtype(name))
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
                ctx.set_tensor_address(name, t.data_ptr())
                outputs[name] = t
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed on {graph}")
        stream.synchronize()
        return {n: outputs[n].float().cpu().numpy() for n in self.output_names(graph)}


def _torch_dtype(trt_dtype: Any):
    import torch

    return {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
            "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}[str(trt_dtype).split(".")[-1]]


def open_runner(folder: Path, manifest: Manifest, provider: str | None = None, threads: int = 0) -> Runner:
    """The runner for what `folder` holds: TensorRT engines, or ONNX graphs for ONNX Runtime."""
    info = manifest.build
    if info is not None and info.backend == "tensorrt":
        if not info.engine_built:
            raise ArtifactError(f"{folder}: a device build kit, no engine yet; run build_on_device.sh on the device, "
                                "then validate the folder it writes")
        return TrtRunner(folder, manifest)
    return OrtRunner(folder, manifest, provider=provider, threads=threads)


# ------------------------------------------------------------------------------------------ decoder driving
def cache_feed(outs: dict[str, np.ndarray]) -> Feed:
    """A step's present.* outputs renamed to the next step's past.* inputs."""
    return {k.replace("present.", "past.", 1): v for k, v in outs.items() if k.startswith("present.")}


def paged_controls(plan, batch: int, total: int, prompt: int) -> Feed:
    """A block table giving every sequence its own consecutive blocks (enough for `total` tokens)."""
    bs, num_blocks = int(plan.params["block_size"]), int(plan.params["num_blocks"])
    max_blocks = next(c.shape[1] for c in plan.controls if c.name == "block_table")
    need = -(-total // bs)
    if need * batch > num_blocks:
        from effx.errors import EffxError

        raise EffxError(f"{batch} sequences of {total} tokens need {need * batch} paged blocks, the pool has "
                        f"{num_blocks}; lower --batch/--seq or raise kv_cache.num_blocks")
    table = np.zeros((batch, max_blocks), np.int64)
    for b in range(batch):
        table[b, :need] = np.arange(b * need, (b + 1) * need)
    return {"new_lengths": np.full(batch, prompt, np.int64), "block_table": table}


def prefill_feed(manifest: Manifest, ids: np.ndarray, total: int, block_table: np.ndarray | None = None) -> Feed:
    """Inputs of the prefill graph for prompt `ids` in a sequence that will reach `total` tokens."""
    plan = manifest.kv_cache
    feed: Feed = {"input_ids": ids}
    if plan is not None and plan.layout == "paged":
        controls = paged_controls(plan, ids.shape[0], total, ids.shape[1])
        if block_table is not None:
            controls["block_table"] = block_table
        feed |= controls | {t.input: np.zeros(t.shape, np.float32) for t in plan.tensors}
    return feed


def step_feed(manifest: Manifest, ids: np.ndarray, position: int, cache: Feed, block_table: np.ndarray | None) -> Feed:
    batch = ids.shape[0]
    feed = {"input_ids": ids, "past_lengths": np.full(batch, position, np.int64)} | cache
    if block_table is not None:
        feed |= {"new_lengths": np.ones(batch, np.int64), "block_table": block_table}
    return feed


def decode_loop(infer: Callable[[Feed, str], dict[str, np.ndarray]], manifest: Manifest, ids: np.ndarray,
                prompt: int, block_table: np.ndarray | None = None) -> list[np.ndarray]:
    """Teacher-forced decoding as a host does it: prefill `prompt` tokens, then feed the rest one by one,
    carrying the cache from each step's outputs. Returns the logits of each step: [(B, prompt, V), (B, 1, V)...]."""
    batch, n = ids.shape
    feed = prefill_feed(manifest, ids[:, :prompt], n, block_table)
    table = feed.get("block_table")
    outs = infer(feed, "prefill")
    logits = [outs["logits"]]
    for t in range(prompt, n):
        outs = infer(step_feed(manifest, ids[:, t:t + 1], t, cache_feed(outs), table), "decode")
        logits.append(outs["logits"])
    return logits


def greedy(infer: Callable[[Feed, str], dict[str, np.ndarray]], manifest: Manifest, prompt_ids: np.ndarray,
           steps: int) -> np.ndarray:
    """Greedy generation of `steps` tokens after the prompt; returns (B, steps) token ids."""
    prompt = prompt_ids.shape[1]
    feed = prefill_feed(manifest, prompt_ids, prompt + steps)
    table = feed.get("block_table")
    outs = infer(feed, "prefill")
    tokens = []
    for t in range(steps):
        nxt = outs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1)
        tokens.append(nxt)
        if t + 1 < steps:
            outs = infer(step_feed(manifest, nxt, prompt + t, cache_feed(outs), table), "decode")
    return np.concatenate(tokens, axis=1)

