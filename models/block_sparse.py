"""Block-sparse attention (Sparse Transformer / BigBird without random blocks): softmax restricted to a
fixed layout of local, global and strided blocks (rules in effx.plugins.block_sparse)."""

from __future__ import annotations

from torch import Tensor

from effx.models.attention import SoftmaxAttention
from effx.plugins.block_sparse import block_sparse_attention


class BlockSparseAttention(SoftmaxAttention):
    kind = "block_sparse"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        a = self.params
        self.block_size, self.local_blocks = a.block_size, a.local_blocks
        self.global_blocks, self.stride_blocks = a.global_blocks, a.stride_blocks

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # softmax over keys whose block (k_pos // block) the layout allows for the query's block
        return block_sparse_attention(
            q, k, v, q_pos, k_pos, self.block_size, self.local_blocks, self.global_blocks, self.stride_blocks,
            self.causal, self.scale,
        )
