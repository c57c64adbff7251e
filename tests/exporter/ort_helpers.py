"""Running exported folders in ONNX Runtime the way a host would (feeding the cache plan)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from effx.core.manifest import Manifest
from effx.core.protocol import decode_loop
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


def empty_cache_feed(manifest: Manifest, batch: int) -> dict[str, np.ndarray]:
    """Cache tensors before the first step, from the manifest's shapes."""
    feed = {}
    for t in manifest.kv_cache.tensors:
        shape = [batch if d == "batch" else d for d in t.shape]
        feed[t.input] = np.zeros(shape, np.float32)
    return feed


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
