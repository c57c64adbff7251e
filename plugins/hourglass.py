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
from torch import Tensor

from effx.plugins.common import softmax_attention
from effx.plugins.onnx_body import node_op
from effx.plugins.opspec import OpSpec, register_op


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


# -- ONNX ---------------------------------------------------------------------------------------------
# Causality changes shapes (the f - 1 shift), so it is fixed when the function is built; encoders always
# pass k_valid, decoders never do. The factor stays an attribute: layers of one model differ in it.
def _body(b, static):
    causal = bool(static["causal"])
    f = b.attr_int("factor")
    one = b.ints(1)
    q, k, v = "q", "k", "v"
    if not causal:  # padding pools as zeros when f > 1 (f = 1 is plain attention)
        m = b.op("CastLike", b.op("Unsqueeze", "k_valid", b.ints(1, 3)), "q")  # (B,1,N,1)
        m = b.op("Max", m, b.op("CastLike", b.op("Equal", f, one), "q"))
        q, k, v = (b.op("Mul", t, m) for t in (q, k, v))
    n = b.dim("q", 2)
    shift = b.op("Sub", f, one) if causal else b.ints(0)
    groups = b.op("Div", b.op("Sub", b.op("Add", b.op("Add", n, shift), f), one), f)  # ceil((n + shift) / f)
    right = b.op("Sub", b.op("Sub", b.op("Mul", groups, f), n), shift)
    zeros2 = b.ints(0, 0)
    pads = b.op("Concat", zeros2, shift, b.ints(0), zeros2, right, b.ints(0), axis=0)

    def pool(t: str) -> str:  # (B,H,N,D) -> (B,H,J,D), mean over groups of f after the shift
        padded = b.op("Pad", t, pads)
        shape = b.op("Concat", b.dim(t, 0), b.dim(t, 1), groups, f, b.dim(t, 3), axis=0)
        return b.op("ReduceMean", b.op("Reshape", padded, shape), b.ints(3), keepdims=0)

    qc, kc, vc = pool(q), pool(k), pool(v)
    if causal:
        j = b.op("Range", b.scalar(0), b.op("Squeeze", groups), b.scalar(1))  # (J,)
        allowed = b.op("LessOrEqual", b.op("Unsqueeze", j, b.ints(0)), b.op("Unsqueeze", j, b.ints(1)))  # (J,J)
    else:
        valid = pool(b.op("CastLike", b.op("Unsqueeze", "k_valid", b.ints(1, 3)), "q"))  # (B,1,J,1)
        allowed = b.op("Transpose", b.op("Greater", valid, b.float_like(0.0, "q")), perm=[0, 1, 3, 2])
    out = b.softmax_attention(qc, kc, vc, allowed)  # (B,H,J,D)
    up_shape = b.op("Concat", b.dim(out, 0), b.dim(out, 1), groups, f, b.dim(out, 3), axis=0)
    up = b.op("Expand", b.op("Unsqueeze", out, b.ints(3)), up_shape)  # position p <- group p // f
    flat = b.op("Reshape", up, b.op("Concat", b.dim(out, 0), b.dim(out, 1), b.ints(-1), b.dim(out, 3), axis=0))
    b.output(b.op("Slice", flat, b.ints(0), n, b.ints(2)), "y")
    return ["q", "k", "v", "k_valid"], ["y"]


def _translation(q, k, v, k_valid, factor: int, causal: bool, scale: float):
    return node_op("HourglassAttention")(q, k, v, k_valid, factor=factor, causal=int(causal), scale=scale)


SPEC = register_op(
    OpSpec(
        name="HourglassAttention",
        torch_op=hourglass_attention,
        inputs=("q", "k", "v", "k_valid?"),
        outputs=("y",),
        attributes={"factor": int, "causal": bool, "scale": float},
        reference=hourglass_attention_reference,
        summary="softmax attention over f-pooled tokens, upsampled by repeat (causal: shifted by f-1)",
        build_body=_body,
        translation=_translation,
        structural=("causal",),
    )
)
