"""effx::HourglassAttention: attention at a shortened resolution, pooled down and upsampled back
(Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models", Alg. 1).

For shorten factor f, queries, keys and values are average-pooled in groups of f, softmax attention runs
over the n/f pooled tokens, and each position takes the output of its group (upsampling by repeat).
Causal layers first shift right by f - 1 (App. A.2): pooled token j averages positions jf-f+1 .. jf, and
position p reads pooled output floor(p / f), whose group ends at or before p, so no future token leaks.
With f = 1 this is plain softmax attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from effx.plugins.common import softmax_attention
from effx.plugins.opspec import OpSpec, register_op
from torch import Tensor


def pool_groups(x: Tensor, factor: int) -> Tensor:
    """(B,H,L,D) with L a multiple of factor -> (B,H,L/factor,D), mean over each group."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n // factor, factor, d).mean(3)


def hourglass_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, k_valid: Tensor | None, factor: int, causal: bool, scale: float
) -> Tensor:
    # q (B,H,N,D), k/v (B,H_kv,N,D), k_valid (B,N) 1 = token, 0 = padding (encoders only)
    n = q.shape[2]
    if k_valid is not None and factor > 1:
        m = k_valid[:, None, :, None].to(q.dtype)
        q, k, v = q * m, k * m, v * m  # padding pools as zeros
    shift = factor - 1 if causal else 0
    groups = -(-(n + shift) // factor)  # ceil
    pad = (0, 0, shift, groups * factor - n - shift)  # left shift, right fill up to whole groups
    qc, kc, vc = (pool_groups(F.pad(t, pad), factor) for t in (q, k, v))  # (B,H,J,D)
    j = torch.arange(groups, device=q.device)
    if causal:
        allowed = j[None, :] <= j[:, None]  # (J, J): pooled query j sees pooled keys <= j
    elif k_valid is not None:
        group_valid = pool_groups(F.pad(k_valid[:, None, :, None].to(q.dtype), pad), factor) > 0  # (B,1,J,1)
        allowed = group_valid.transpose(-1, -2)  # (B,1,1,J): a pooled key is real if any of its tokens is
    else:
        allowed = None
    out = softmax_attention(qc, kc, vc, allowed, scale)  # (B,H,J,D)
    return out.repeat_interleave(factor, dim=2)[:, :, :n]  # position p <- pooled output p // f


@torch.library.custom_op("effx::hourglass_attention", mutates_args=())
def hourglass_attention(
    q: Tensor, k: Tensor, v: Tensor, k_valid: Tensor | None, factor: int, causal: bool, scale: float
) -> Tensor:
    return hourglass_attention_reference(q, k, v, k_valid, factor, causal, scale)


@hourglass_attention.register_fake
def _(q, k, v, k_valid, factor, causal, scale):
    return torch.empty_like(q)


SPEC = register_op(
    OpSpec(
        name="HourglassAttention",
        torch_op=hourglass_attention,
        inputs=("q", "k", "v", "k_valid?"),
        outputs=("y",),
        attributes={"factor": int, "causal": bool, "scale": float},
        reference=hourglass_attention_reference,
        summary="softmax attention over f-pooled tokens, upsampled by repeat (causal: shifted by f-1)",
    )
)
