"""Cache writes that a runtime can run in place: `effx::scatter_nd` is ONNX ScatterND exactly.

A decode step writes its new keys/values into the host's buffers: rows (B,H_kv,S,D) at slots (B,S) of a
contiguous or ring buffer (B,H_kv,C,D), or tokens (B,S,H_kv,D) at (block, offset) of a paged pool
(NB,bs,H_kv,D). torch.onnx lowers `index_put` through transposes and reshapes, which leaves the graph input
feeding other nodes and the graph output produced by something else; this op exports as one standard
ScatterND whose data is the buffer as it came in, so the exporter can prove the write safe to alias (the
manifest's `aliases`) and ONNX Runtime, bound with IOBinding, writes the buffer in place (its ScatterND
kernel skips the copy when output and data share memory).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from torch import Tensor


@torch.library.custom_op("effx::scatter_nd", mutates_args=())
def scatter_nd(data: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    """ONNX ScatterND (reduction none): a copy of data with data[indices[..., :]] = updates."""
    out = data.clone()
    out[tuple(indices.unbind(-1))] = updates
    return out


@scatter_nd.register_fake
def _(data, indices, updates):
    return torch.empty_like(data)


def _translation(data, indices, updates):
    return op.ScatterND(data, indices, updates)


def write_rows(buf: Tensor, rows: Tensor, slots: Tensor) -> Tensor:
    """buf (B,H,C,D) with rows (B,H,S,D) written at slots (B,S) of every head."""
    b, h, s = rows.shape[0], rows.shape[1], rows.shape[2]
    bi = torch.arange(b, device=buf.device)[:, None, None].expand(b, h, s)
    hi = torch.arange(h, device=buf.device)[None, :, None].expand(b, h, s)
    si = slots[:, None, :].expand(b, h, s)
    return scatter_nd(buf, torch.stack([bi, hi, si], dim=-1), rows)


def write_pages(pool: Tensor, tokens: Tensor, blocks: Tensor, offsets: Tensor) -> Tensor:
    """pool (NB,bs,H,D) with tokens (B,S,H,D) written at (blocks, offsets) (B,S)."""
    return scatter_nd(pool, torch.stack([blocks, offsets], dim=-1), tokens)


TRANSLATIONS = {scatter_nd._opoverload: _translation}  # standard-ONNX lowerings for the exporter
