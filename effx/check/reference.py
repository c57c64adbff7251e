"""The PyTorch reference as a runner, and how validate finds the weights an artifact was exported from.

`TorchRunner` runs the exporter's own graph modules (EncoderGraph, StepGraph) around the model, so the
comparison with an exported artifact is graph for graph, feed for feed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effx.core.errors import ArtifactError
from effx.core.manifest import Manifest
from effx.core.runner import Feed, Runner
from effx.core.spec import RunSpec
from effx.exporter.graphs import plan_graphs
from effx.models import build_model, load_model
from effx.models.hf_import import import_hf
from effx.models.transformer import weights_digest


class TorchRunner(Runner):
    """The PyTorch reference: the exporter's own graph modules around the model, on CPU or CUDA."""

    name = "torch"

    def __init__(self, model, device: str = "cpu"):
        super().__init__()
        self.model, self.device = model, device
        self._plans: dict[str, Any] = {}

    def _load(self) -> None:
        self.model.to(self.device).eval()
        self._plans = {p.name: p for p in plan_graphs(self.model)}

    def _free(self) -> None:
        self._plans = {}

    @property
    def graphs(self) -> list[str]:
        return list(self._plans)

    def output_names(self, graph: str) -> list[str]:
        return list(self._plans[graph].output_names)

    def environment(self) -> dict[str, Any]:
        return {"torch_threads": torch.get_num_threads(), "torch_device": self.device}

    def _infer(self, feed: Feed, graph: str) -> dict[str, np.ndarray]:
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

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """The model's own whole-sequence forward (a decoder's logits for every position)."""
        with torch.inference_mode():
            return self.model(torch.from_numpy(ids).to(self.device)).float().cpu().numpy()


def load_reference(manifest: Manifest, folder: Path, reference: str | Path | None = None):
    """The PyTorch model the artifact was exported from: `reference` (a model/ folder written by effx, or a
    Hugging Face folder via `hf:PATH`), else the model/ folder of an `effx run` output next to it, else the
    spec's seeded initialisation; checked against the weights digest the export recorded."""
    expected = (manifest.weights or {}).get("sha256")
    candidates: list[tuple[str, Callable[[], Any]]] = []
    if reference is not None:
        ref = str(reference)
        if ref.startswith("hf:"):
            candidates.append((ref, lambda: import_hf(ref[3:], spec_overrides(manifest))))
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


def spec_overrides(manifest: Manifest) -> dict[str, Any]:
    """Attention/cache of the exported spec, to swap into an imported Hugging Face model the same way."""
    spec = manifest.spec
    out = {f"attention.{k}": v for k, v in spec["attention"].items()}
    out |= {f"kv_cache.{k}": v for k, v in spec["kv_cache"].items()}
    return out | {"model.max_seq_len": spec["model"]["max_seq_len"]}
