"""`effx::onnx_attention`: the standard ONNX `Attention` (opset 25) as a torch op, so a model can export to
it what torch's SDPA cannot express: sliding windows (`left_window_size`/`right_window_size`) and
attention-logit soft-capping (`softcap`). It exports as one `Attention` node (no effx domain, no function).

Semantics (ONNX Attention-25 on 4-D inputs, no past, no nonpad_kv_seqlen, so offset 0): query i may see key
j when attn_mask allows it, j <= i (is_causal), i - left <= j (left >= 0) and j <= i + right (right >= 0).
Scores are (scale Q) K^T, soft-capped (softcap * tanh(s / softcap)) when softcap > 0, before the mask.
A query with no allowed key gets a ZERO row (effx's own ops give the mean of the values there instead:
see effx.models.local for why the two never differ on a real token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.core.flavours import WINDOW_OPSET
from effx.plugins.common import expand_kv
from effx.plugins.onnx_body import staged_op


def onnx_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, left_window: int,
    right_window: int, scale: float, softcap: float,
) -> Tensor:
    # q (B,H,Nq,D), k/v (B,H_kv,Nk,D), attn_mask bool broadcastable to (B,H,Nq,Nk) or None
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq, device=q.device)[:, None]  # (Nq,1) query index = position (offset 0)
    j = torch.arange(nk, device=q.device)[None, :]  # (1,Nk)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed &= j <= i
    if left_window >= 0:
        allowed &= j >= i - left_window
    if right_window >= 0:
        allowed &= j <= i + right_window
    allowed = allowed[None, None] if attn_mask is None else allowed[None, None] & attn_mask  # (B|1,1|H,Nq,Nk)
    n_rep = q.shape[1] // k.shape[1]
    scores = (q * scale) @ expand_kv(k, n_rep).transpose(-1, -2)  # (B,H,Nq,Nk)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros_like(weights))  # empty row: 0
    return weights @ expand_kv(v, n_rep)


@torch.library.custom_op("effx::onnx_attention", mutates_args=())
def onnx_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, left_window: int,
    right_window: int, scale: float, softcap: float,
) -> Tensor:
    return onnx_attention_reference(q, k, v, attn_mask, is_causal, left_window, right_window, scale, softcap)


@onnx_attention.register_fake
def _(q, k, v, attn_mask, is_causal, left_window, right_window, scale, softcap):
    return torch.empty_like(q)


def _translation(q, k, v, attn_mask, is_causal: bool, left_window: int, right_window: int, scale: float,
                 softcap: float):
    attrs = {"scale": scale, "is_causal": int(is_causal)}
    if left_window >= 0:
        attrs["left_window_size"] = left_window
    if right_window >= 0:
        attrs["right_window_size"] = right_window
    if softcap > 0:
        attrs["softcap"] = softcap
    # staged: torch.onnx's version converter must not touch an op newer than what it traces (see staged_op)
    out = staged_op("Attention", WINDOW_OPSET)(q, k, v, attn_mask, **attrs)
    return out[0] if isinstance(out, tuple) else out


TRANSLATIONS = {onnx_attention._opoverload: _translation}  # standard-ONNX lowerings for the exporter
