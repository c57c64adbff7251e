"""effx::BlockSparseAttention: softmax attention restricted to a fixed block layout.

Blocks of `block_size` positions. A query block qb sees key block kb when any rule holds:
  local   |qb - kb| < local_blocks            (causal: 0 <= qb - kb < local_blocks)
  global  kb < global_blocks                  (encoders: also qb < global_blocks, global rows see all)
  strided stride_blocks > 0 and (qb - kb) % stride_blocks == 0   (causal: qb >= kb)
Decoders add the element-level causal mask j <= i. Every rule is deterministic (no random blocks), so
the layout is the same in PyTorch, ONNX and the fused kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.common import softmax_attention, split_positions
from effx.plugins.onnx_body import node_op
from effx.plugins.opspec import OpSpec, register_op


def block_layout_allowed(
    qb: Tensor, kb: Tensor, local_blocks: int, global_blocks: int, stride_blocks: int, causal: bool
) -> Tensor:
    """Block-level rule for query blocks qb and key blocks kb (broadcastable int tensors)."""
    diff = qb - kb
    if causal:
        allowed = (diff >= 0) & (diff < local_blocks)
        allowed = allowed | ((kb < global_blocks) & (diff >= 0))
        if stride_blocks > 0:
            allowed = allowed | ((diff >= 0) & (diff % stride_blocks == 0))
    else:
        allowed = diff.abs() < local_blocks
        allowed = allowed | (kb < global_blocks) | (qb < global_blocks)
        if stride_blocks > 0:
            allowed = allowed | (diff.abs() % stride_blocks == 0)
    return allowed


def block_sparse_allowed(
    q_pos: Tensor, k_pos: Tensor, block_size: int, local_blocks: int, global_blocks: int, stride_blocks: int,
    causal: bool,
) -> Tensor:
    qp, kp, valid = split_positions(q_pos, k_pos)
    allowed = valid & block_layout_allowed(
        qp // block_size, kp.clamp(min=0) // block_size, local_blocks, global_blocks, stride_blocks, causal
    )
    return allowed & (kp <= qp) if causal else allowed


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, block_size: int, local_blocks: int,
    global_blocks: int, stride_blocks: int, causal: bool, scale: float,
) -> Tensor:
    # q (B,H,Nq,D), k/v (B,H_kv,Nk,D); the readable form masks the dense score matrix, the fused kernel
    # visits only the allowed blocks.
    allowed = block_sparse_allowed(q_pos, k_pos, block_size, local_blocks, global_blocks, stride_blocks, causal)
    return softmax_attention(q, k, v, allowed, scale)


@torch.library.custom_op("effx::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, block_size: int, local_blocks: int,
    global_blocks: int, stride_blocks: int, causal: bool, scale: float,
) -> Tensor:
    return block_sparse_attention_reference(
        q, k, v, q_pos, k_pos, block_size, local_blocks, global_blocks, stride_blocks, causal, scale
    )


@block_sparse_attention.register_fake
def _(q, k, v, q_pos, k_pos, block_size, local_blocks, global_blocks, stride_blocks, causal, scale):
    return torch.empty_like(q)


# -- ONNX ---------------------------------------------------------------------------------------------
def _body(b, static):
    qp, kp, valid = b.positions("q_pos", "k_pos")
    bs, local, glob, stride = (b.attr_int(a) for a in ("block_size", "local_blocks", "global_blocks", "stride_blocks"))
    zero = b.ints(0)
    qb = b.op("Div", qp, bs)  # positions are >= 0, so integer Div is floor
    kb = b.op("Div", b.op("Max", kp, zero), bs)
    diff = b.op("Sub", qb, kb)
    stride_on = b.op("Greater", stride, zero)
    safe_stride = b.op("Max", stride, b.ints(1))  # Mod by 0 is undefined: the rule is off anyway
    forward = b.op("GreaterOrEqual", diff, zero)
    causal_rule = b.op("Or", b.op("And", forward, b.op("Less", diff, local)), b.op("And", forward, b.op("Less", kb, glob)))
    causal_rule = b.op("Or", causal_rule, b.op("And", b.op("And", forward, stride_on),
                                               b.op("Equal", b.op("Mod", diff, safe_stride), zero)))
    causal_rule = b.op("And", causal_rule, b.op("LessOrEqual", kp, qp))
    dist = b.op("Abs", diff)
    sym_rule = b.op("Or", b.op("Less", dist, local), b.op("Or", b.op("Less", kb, glob), b.op("Less", qb, glob)))
    sym_rule = b.op("Or", sym_rule, b.op("And", stride_on, b.op("Equal", b.op("Mod", dist, safe_stride), zero)))
    allowed = b.op("And", valid, b.select("causal", causal_rule, sym_rule))
    b.output(b.softmax_attention("q", "k", "v", allowed), "y")
    return ["q", "k", "v", "q_pos", "k_pos"], ["y"]


def _translation(q, k, v, q_pos, k_pos, block_size: int, local_blocks: int, global_blocks: int, stride_blocks: int,
                 causal: bool, scale: float):
    return node_op("BlockSparseAttention")(
        q, k, v, q_pos, k_pos, block_size=block_size, local_blocks=local_blocks, global_blocks=global_blocks,
        stride_blocks=stride_blocks, causal=int(causal), scale=scale)


SPEC = register_op(
    OpSpec(
        name="BlockSparseAttention",
        torch_op=block_sparse_attention,
        inputs=("q", "k", "v", "q_pos", "k_pos"),
        outputs=("y",),
        attributes={"block_size": int, "local_blocks": int, "global_blocks": int, "stride_blocks": int,
                    "causal": bool, "scale": float},
        reference=block_sparse_attention_reference,
        summary="softmax attention on a local + global + strided block layout",
        build_body=_body,
        translation=_translation,
        cuda_kernel=("attention", "block_sparse_attention"),
    )
)
