"""effx::LocalAttention: sliding-window softmax attention.

Causal (decoders): query at position i sees keys j with i - window < j <= i (window keys incl. itself,
the Mistral/xformers convention). Symmetric (encoders): |i - j| < window.
"""

from __future__ import annotations

import torch
from onnx import TensorProto, helper
from torch import Tensor

from effx.plugins.common import expand_kv, softmax_attention, split_positions
from effx.plugins.onnx_body import node_op
from effx.plugins.opspec import MASK_VALUE, OpSpec, register_op


def local_allowed(q_pos: Tensor, k_pos: Tensor, window: int, causal: bool) -> Tensor:
    qp, kp, valid = split_positions(q_pos, k_pos)  # (B,1,Nq,1), (B,1,1,Nk)
    if causal:
        return valid & (kp <= qp) & (kp > qp - window)
    return valid & ((qp - kp).abs() < window)


def local_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool, scale: float,
    softcap: float = 0.0,
) -> Tensor:
    # q (B,H,Nq,D), k/v (B,H_kv,Nk,D), q_pos (B,Nq), k_pos (B,Nk) with -1 = empty slot; softcap 0 = off
    return softmax_attention(q, k, v, local_allowed(q_pos, k_pos, window, causal), scale, softcap)


def local_attention_blocked(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool, scale: float,
    softcap: float = 0.0, block: int = 128,
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
        y = softmax_attention(q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi], allowed, scale, softcap)
        out[:, :, start:end] = torch.where(allowed.any(-1, keepdim=True), y, v_mean)
    return out


def _whole_sequence(q_pos: Tensor, k_pos: Tensor) -> bool:
    if q_pos.shape != k_pos.shape:
        return False
    idx = torch.arange(q_pos.shape[1], device=q_pos.device)
    return bool((q_pos == idx).all() and ((k_pos == idx) | (k_pos == -1)).all())


@torch.library.custom_op("effx::local_attention", mutates_args=())
def local_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool, scale: float,
    softcap: float = 0.0,
) -> Tensor:
    # CPU: a whole sequence longer than a few windows takes the blocked path (same math, less memory);
    # caches (ring slots, offsets) take the reference
    if q.shape[2] > 2 * window + 128 and _whole_sequence(q_pos, k_pos):
        return local_attention_blocked(q, k, v, q_pos, k_pos, window, causal, scale, softcap)
    return local_attention_reference(q, k, v, q_pos, k_pos, window, causal, scale, softcap)


@local_attention.register_fake
def _(q, k, v, q_pos, k_pos, window, causal, scale, softcap=0.0):
    return torch.empty_like(q)


# -- ONNX ---------------------------------------------------------------------------------------------
def _body(b, static):
    """Two forms, chosen at run time like the torch op chooses: a whole sequence longer than a few windows
    (q_pos = arange, k_pos in {arange, -1}) takes the banded form, O(n w) memory; caches (ring slots,
    offsets, single decode steps) and short sequences take the dense masked form."""
    window = b.attr_int("window")  # attribute references stay in the function body, not in the branches
    scale = b.attr_float_like("scale", "q")
    causal = bool(static["causal"])  # structural: a causal band needs the previous key block only
    softcap = b.attr_float_like("softcap", "q") if static["softcap"] > 0 else None  # structural: on or off

    dense = type(b)(f"{b.prefix}_dense")
    qp, kp, valid = dense.positions("q_pos", "k_pos")
    y_dense = dense.softmax_attention("q", "k", "v", dense.window_mask(qp, kp, valid, window, causal), scale=scale,
                                      softcap=softcap)
    banded = type(b)(f"{b.prefix}_banded")
    y_banded = _banded(banded, window, scale, causal, softcap)

    def branch(body, y, name):
        return helper.make_graph(body.nodes, name, [], [helper.make_empty_tensor_value_info(y)])

    b.op("If", _whole_long_sequence(b, window), then_branch=branch(banded, y_banded, "banded"),
         else_branch=branch(dense, y_dense, "dense"))
    b.output(b.nodes[-1].output[0], "y")
    return ["q", "k", "v", "q_pos", "k_pos"], ["y"]


def _whole_long_sequence(b, window: str) -> str:
    """The banded form's precondition, as the torch op checks it: Nq == Nk > 2w + 128, q_pos[b, i] = i,
    k_pos[b, j] in {j, -1}."""
    nq, nk = b.dim("q", 2), b.dim("k", 2)
    same = b.op("Equal", nq, nk)
    long = b.op("Greater", nq, b.op("Add", b.op("Mul", window, b.ints(2)), b.ints(128)))
    ar_q = b.op("Range", b.scalar(0), b.op("Squeeze", nq), b.scalar(1))
    ar_k = b.op("Range", b.scalar(0), b.op("Squeeze", nk), b.scalar(1))

    def all_true(x):
        return b.op("Equal", b.op("ReduceMin", b.op("Cast", x, to=TensorProto.INT64), keepdims=0), b.scalar(1))

    q_ok = all_true(b.op("Equal", "q_pos", ar_q))
    k_ok = all_true(b.op("Or", b.op("Equal", "k_pos", ar_k), b.op("Equal", "k_pos", b.ints(-1))))
    cond = b.op("And", b.op("And", same, long), b.op("Unsqueeze", b.op("And", q_ok, k_ok), b.ints(0)))
    return b.op("Squeeze", cond)


def _banded(b, window: str, scale: str, causal: bool, softcap: str | None) -> str:
    """Queries in blocks of w against the previous and own key block (causal: 2w keys), and the next one
    (symmetric: 3w keys): scores (B, H, n/w, w, 2w or 3w) instead of (B, H, n, n). A query with no allowed key gets the mean of every value,
    as in the dense form."""
    k, v = b.expand_kv("k", "q"), b.expand_kv("v", "q")  # (B,H,N,D)
    n = b.dim("q", 2)
    nb = b.op("Div", b.op("Sub", b.op("Add", n, window), b.ints(1)), window)  # ceil(n / w)
    pad = b.op("Sub", b.op("Mul", nb, window), n)
    zeros2 = b.ints(0, 0)

    def pad_seq(x, begin, end, rank, value=None):  # pad axis 2 (rank 4) or axis 1 (rank 2)
        if rank == 4:
            pads = b.op("Concat", zeros2, begin, b.ints(0), zeros2, end, b.ints(0), axis=0)
        else:
            pads = b.op("Concat", b.ints(0), begin, b.ints(0), end, axis=0)
        return b.op("Pad", x, pads, *([value] if value is not None else []))

    def blocks(x, rank):  # (..., nb * w, [D]) -> (..., nb, w, [D])
        shape = b.op("Concat", zeros2, nb, window, b.ints(-1), axis=0) if rank == 4 else \
            b.op("Concat", b.ints(0), nb, window, axis=0)
        return b.op("Reshape", x, shape)

    def neighbours(x, rank, value=None):  # previous | own (| next) block of keys: (..., nb, 2w or 3w, [D])
        full = pad_seq(x, window, b.op("Add", pad, window), rank, value)  # w before, pad + w after
        axis = 2 if rank == 4 else 1
        parts = []
        starts = (b.ints(0), window) if causal else (b.ints(0), window, b.op("Mul", window, b.ints(2)))
        for start in starts:
            end = b.op("Add", start, b.op("Mul", nb, window))
            parts.append(blocks(b.op("Slice", full, start, end, b.ints(axis)), rank))
        return b.op("Concat", *parts, axis=axis + 1)  # along the block's w axis

    minus1 = b.op("Constant", value=_int64_scalar(-1))
    q_blocks = blocks(pad_seq("q", b.ints(0), pad, 4), 4)  # (B,H,nb,w,D)
    k3, v3 = neighbours(k, 4), neighbours(v, 4)  # (B,H,nb,2w|3w,D)
    qp = blocks(pad_seq("q_pos", b.ints(0), pad, 2), 2)  # (B,nb,w)
    kp = neighbours("k_pos", 2, minus1)  # (B,nb,2w|3w), -1 beyond the sequence
    qp5 = b.op("Unsqueeze", qp, b.ints(1, 4))  # (B,1,nb,w,1)
    kp5 = b.op("Unsqueeze", kp, b.ints(1, 3))  # (B,1,nb,1,2w|3w)
    allowed = b.window_mask(qp5, kp5, b.op("GreaterOrEqual", kp5, b.ints(0)), window, causal)
    scores = b.cap(b.op("MatMul", b.op("Mul", q_blocks, scale), b.op("Transpose", k3, perm=[0, 1, 2, 4, 3])), softcap)
    scores = b.op("Where", allowed, scores, b.float_like(MASK_VALUE, scores))
    y = b.op("MatMul", b.op("Softmax", scores, axis=-1), v3)  # (B,H,nb,w,D)
    any_key = b.op("Cast", b.op("ReduceMax", b.op("Cast", allowed, to=TensorProto.INT32), b.ints(-1), keepdims=1),
                   to=TensorProto.BOOL)  # (B,1,nb,w,1)
    v_mean = b.op("Unsqueeze", b.op("ReduceMean", v, b.ints(2), keepdims=1), b.ints(2))  # (B,H,1,1,D)
    y = b.op("Where", any_key, y, v_mean)
    y = b.op("Reshape", y, b.op("Concat", zeros2, b.ints(-1), b.dim("q", 3), axis=0))  # (B,H,nb*w,D)
    return b.op("Slice", y, b.ints(0), n, b.ints(2))


def _int64_scalar(value: int):
    return helper.make_tensor("c", TensorProto.INT64, [], [value])


def _translation(q, k, v, q_pos, k_pos, window: int, causal: bool, scale: float, softcap: float = 0.0):
    return node_op("LocalAttention")(q, k, v, q_pos, k_pos, window=window, causal=int(causal), scale=scale,
                                     softcap=softcap)


SPEC = register_op(
    OpSpec(
        name="LocalAttention",
        torch_op=local_attention,
        inputs=("q", "k", "v", "q_pos", "k_pos"),
        outputs=("y",),
        attributes={"window": int, "causal": bool, "scale": float, "softcap": float},
        reference=local_attention_reference,
        summary="sliding-window softmax attention over absolute positions",
        build_body=_body,
        translation=_translation,
        structural=("causal", "softcap"),
        cuda_kernel=("attention", "local_attention"),
    )
)
