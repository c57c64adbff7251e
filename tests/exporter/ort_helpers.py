"""Running exported folders in ONNX Runtime the way a host would (feeding the cache plan)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver, decode_loop
from effx.core.runner import Runner
from effx.targets.ort import OrtRunner


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def decode_in_ort(folder: Path, manifest: Manifest, ids: np.ndarray, prompt: int, block_table: np.ndarray | None = None):
    """Prefill `prompt` tokens, then decode the rest one by one through the host protocol; returns logits
    (B, N, V)."""
    with OrtRunner(folder, manifest, threads=1) as runner:
        return np.concatenate(decode_loop(runner.infer, manifest, ids, prompt, block_table), axis=1)


class ReferenceRunner(Runner):
    """onnx's own reference evaluator as a runner: the second ONNX runtime the exports must agree with."""

    name = "onnx-reference"

    def __init__(self, folder: Path, manifest: Manifest):
        super().__init__()
        self.folder, self.manifest = Path(folder), manifest

    @property
    def graphs(self) -> list[str]:
        return list(self.manifest.graphs)

    def _load(self) -> None:
        self._sessions = {n: ReferenceEvaluator(str(self.folder / g.file)) for n, g in self.manifest.graphs.items()}

    def _infer(self, feed, graph):
        sess = self._sessions[graph]
        return dict(zip(sess.output_names, sess.run(None, {n: feed[n] for n in sess.input_names}), strict=True))


def runtimes_agree(folder: Path, manifest: Manifest, ids: np.ndarray, prompt: int | None = None,
                   mask: np.ndarray | None = None) -> float:
    """Max abs difference between ONNX Runtime and onnx's reference evaluator on the same feeds: the encoder
    graph, or every step of a decode loop (prefill `prompt` tokens, then one by one)."""
    with OrtRunner(folder, manifest, threads=1) as ort_runner, ReferenceRunner(folder, manifest) as ref:
        if prompt is None:
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else mask}
            return float(np.abs(ort_runner.infer(feed, "model")["last_hidden_state"]
                                - ref.infer(feed, "model")["last_hidden_state"]).max())
        got = [decode_loop(r.infer, manifest, ids, prompt) for r in (ort_runner, ref)]
    return max(float(np.abs(a - b).max()) for a, b in zip(*got, strict=True))


def empty_cache_feed(manifest: Manifest, batch: int, total: int = 16, chunk: int = 4) -> dict[str, np.ndarray]:
    """Cache tensors before the first step: the host's buffers sized as DecodeDriver sizes them (contiguous
    `capacity`, rings for steps of `chunk` tokens), every other growing axis empty."""
    sizes = DecodeDriver(manifest, batch, total, chunk=chunk).sizes
    return {t.input: np.zeros([d if isinstance(d, int) else sizes.get(d, 0) for d in t.shape], np.dtype(t.dtype))
            for t in manifest.kv_cache.tensors}


def encoder_error(path: Path, model, batch: int, n: int, pad_last: int = 0) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch model on seeded tokens (last row padded)."""
    import torch

    ids = torch.randint(0, model.spec.model.vocab_size, (batch, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones(batch, n, dtype=torch.int64)
    if pad_last:
        mask[-1, n - pad_last:] = 0
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float(np.abs(got - ref).max())
