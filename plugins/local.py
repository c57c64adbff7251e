"""effx::LocalAttention: sliding-window softmax attention.

Causal (decoders): query at position i sees keys j with i - window < j <= i (window keys incl. itself,
the Mistral/xformers convention). Symmetric (encoders): |i - j| < window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.common import expand_kv, softmax_attention, split_positions
from effx.plugins.onnx_body import node_op
from effx.plugins.opspec import OpSpec, register_op


def local_allowed(q_pos: Tensor, k_pos: Tensor, window: int, causal: bool) -> Tensor:
    qp, kp, valid = split_positions(q_pos, k_pos)  # (B,1,Nq,1), (B,1,1,Nk)
    if causal:
        return valid & (kp <= qp) & (kp > qp - window)
    return valid & ((qp - kp).abs() < window)


def local_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool, scale: float
) -> Tensor:
    # q (B,H,Nq,D), k/v (B,H_kv,Nk,D), q_pos (B,Nq), k_pos (B,Nk) with -1 = empty slot
    return softmax_attention(q, k, v, local_allowed(q_pos, k_pos, window, causal), scale)


def local_attention_blocked(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool, scale: float,
    block: int = 128,
) -> Tensor:
    """The same attention for a whole sequence (q_pos[b, i] = i, k_pos[b, j] in {j, -1}), one query block at a
    time against only the keys its window can reach: O(n (block + 2w)) memory instead of O(n^2)."""
    n = q.shape[2]
    out = torch.empty_like(q)
    # a query with no allowed key gets the plain average of every value (what the dense form gives it)
    v_mean = expand_kv(v, q.shape[1] // v.shape[1]).mean(dim=2, keepdim=True)  # (B,H,1,D)
    for start in range(0, n, block):
        end = min(start + block, n)
        lo = max(0, start - window + 1)
        hi = end if causal else min(n, end + window - 1)
        allowed = local_allowed(q_pos[:, start:end], k_pos[:, lo:hi], window, causal)  # (B,1,bq,bk)
        y = softmax_attention(q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi], allowed, scale)
        out[:, :, start:end] = torch.where(allowed.any(-1, keepdim=True), y, v_mean)
    return out


def _whole_sequence(q_pos: Tensor, k_pos: Tensor) -> bool:
    if q_pos.shape != k_pos.shape:
        return False
    idx = torch.arange(q_pos.shape[1], device=q_pos.device)
    return bool((q_pos == idx).all() and ((k_pos == idx) | (k_pos == -1)).all())


@torch.library.custom_op("effx::local_attention", mutates_args=())
def local_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool, scale: float
) -> Tensor:
    # CPU: a whole sequence longer than a few windows takes the blocked path (same math, less memory);
    # caches (ring slots, offsets) take the reference
    if q.shape[2] > 2 * window + 128 and _whole_sequence(q_pos, k_pos):
        return local_attention_blocked(q, k, v, q_pos, k_pos, window, causal, scale)
    return local_attention_reference(q, k, v, q_pos, k_pos, window, causal, scale)


@local_attention.register_fake
def _(q, k, v, q_pos, k_pos, window, causal, scale):
    return torch.empty_like(q)


SPEC = register_op(
    OpSpec(
        name="LocalAttention",
        torch_op=local_attention,
        inputs=("q", "k", "v", "q_pos", "k_pos"),
        outputs=("y",),
        attributes={"window": int, "causal": bool, "scale": float},
        reference=local_attention_reference,
        summary="sliding-window softmax attention over absolute positions",
    )
)


# -- ONNX ---------------------------------------------------------------------------------------------
def _body(b, static):
    qp, kp, valid = b.positions("q_pos", "k_pos")
    allowed = b.local_mask(qp, kp, valid, b.attr_int("window"))
    b.output(b.softmax_attention("q", "k", "v", allowed), "y")
    return ["q", "k", "v", "q_pos", "k_pos"], ["y"]


def _translation(q, k, v, q_pos, k_pos, window: int, causal: bool, scale: float):
    return node_op("LocalAttention")(q, k, v, q_pos, k_pos, window=window, causal=int(causal), scale=scale)


SPEC.build_body = _body
SPEC.translation = _translation
