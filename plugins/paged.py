"""effx::PagedAttention: causal softmax attention reading keys/values from a paged block pool (Kwon 2023).

The pool holds fixed-size blocks shared by the batch: k_pool, v_pool (num_blocks, block_size, H_kv, D).
Sequence b owns the physical blocks block_table[b, 0..]; its token at position p lives in block
block_table[b, p // block_size], row p % block_size. seq_lens[b] counts the tokens of sequence b that are
in the pool (the new ones included: the caller writes them first). `window` > 0 restricts each query to
the last `window` keys (sliding window); 0 means full causal attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.common import softmax_attention
from effx.plugins.local import local_allowed
from effx.plugins.onnx_body import node_op
from effx.plugins.opspec import OpSpec, register_op


def gather_pages(pool: Tensor, block_table: Tensor) -> Tensor:
    """(num_blocks, bs, H_kv, D) x (B, max_blocks) -> (B, H_kv, max_blocks * bs, D), in logical order."""
    b, max_blocks = block_table.shape
    _, bs, h, d = pool.shape
    pages = pool[block_table.reshape(-1)].reshape(b, max_blocks * bs, h, d)
    return pages.transpose(1, 2)


def paged_key_positions(seq_lens: Tensor, length: int) -> Tensor:
    """Logical positions 0..length-1 per sequence, -1 past its seq_len."""
    pos = torch.arange(length, device=seq_lens.device).expand(seq_lens.shape[0], length)
    return torch.where(pos < seq_lens[:, None], pos, torch.full_like(pos, -1))


def paged_attention_reference(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, q_pos: Tensor, seq_lens: Tensor,
    window: int, scale: float, softcap: float = 0.0,
) -> Tensor:
    # q (B,H,S,D) at positions q_pos (B,S); pools (num_blocks,bs,H_kv,D); block_table (B,max_blocks)
    k = gather_pages(k_pool, block_table)  # (B,H_kv,L,D), L = max_blocks * bs
    v = gather_pages(v_pool, block_table)
    k_pos = paged_key_positions(seq_lens, k.shape[2])  # (B,L)
    return softmax_attention(q, k, v, local_allowed(q_pos, k_pos, window if window > 0 else k.shape[2] + 1, True),
                             scale, softcap)


@torch.library.custom_op("effx::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, q_pos: Tensor, seq_lens: Tensor,
    window: int, scale: float, softcap: float = 0.0,
) -> Tensor:
    return paged_attention_reference(q, k_pool, v_pool, block_table, q_pos, seq_lens, window, scale, softcap)


@paged_attention.register_fake
def _(q, k_pool, v_pool, block_table, q_pos, seq_lens, window, scale, softcap=0.0):
    return torch.empty_like(q)


# -- ONNX ---------------------------------------------------------------------------------------------
def _body(b, static):
    def pages(pool: str) -> str:  # (NB,bs,H_kv,D) x (B,MB) -> (B,H_kv,MB*bs,D)
        rows = b.op("Gather", pool, b.op("Reshape", "block_table", b.ints(-1)), axis=0)
        shape = b.op("Concat", b.dim("block_table", 0), b.ints(-1), b.dim(pool, 2), b.dim(pool, 3), axis=0)
        return b.op("Transpose", b.op("Reshape", rows, shape), perm=[0, 2, 1, 3])

    k, v = pages("k_pool"), pages("v_pool")
    length = b.dim(k, 2)
    pos = b.op("Range", b.scalar(0), b.op("Squeeze", length), b.scalar(1))  # (L,)
    pos = b.op("Unsqueeze", pos, b.ints(0))  # (1,L)
    filled = b.op("Less", pos, b.op("Unsqueeze", "seq_lens", b.ints(1)))  # (B,L)
    k_pos = b.op("Where", filled, pos, b.ints(-1))
    qp, kp, valid = b.positions("q_pos", k_pos)
    w = b.attr_int("window")
    w = b.op("Where", b.op("Equal", w, b.ints(0)), b.op("Add", length, b.ints(1)), w)  # 0: no window
    softcap = b.attr_float_like("softcap", "q") if static["softcap"] > 0 else None
    b.output(b.softmax_attention("q", k, v, b.window_mask(qp, kp, valid, w, causal=True), softcap=softcap), "y")
    return ["q", "k_pool", "v_pool", "block_table", "q_pos", "seq_lens"], ["y"]


def _translation(q, k_pool, v_pool, block_table, q_pos, seq_lens, window: int, scale: float, softcap: float = 0.0):
    return node_op("PagedAttention")(q, k_pool, v_pool, block_table, q_pos, seq_lens, window=window, scale=scale,
                                     softcap=softcap)


SPEC = register_op(
    OpSpec(
        name="PagedAttention",
        torch_op=paged_attention,
        inputs=("q", "k_pool", "v_pool", "block_table", "q_pos", "seq_lens"),
        outputs=("y",),
        attributes={"window": int, "scale": float, "softcap": float},
        reference=paged_attention_reference,
        summary="causal (optionally windowed) attention over a paged KV block pool",
        build_body=_body,
        translation=_translation,
        structural=("softcap",),
        cuda_kernel=("attention", "paged_attention"),
    )
)
