"""Sliding-window attention (Longformer / Mistral): softmax over the keys inside the window.

Causal: query i sees keys i-w < j <= i, so w keys including itself; encoders: |i - j| < w. The math is the
op's reference (effx.plugins.local); with a ring cache only the last w keys are ever stored.
"""

from __future__ import annotations

from torch import Tensor

from effx.models.attention import SoftmaxAttention
from effx.plugins.local import local_attention


class LocalAttention(SoftmaxAttention):
    kind = "local"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        self.window = self.params.window
        self.paged_window = self.window if self.causal else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # softmax over {j : q_pos - w < k_pos <= q_pos} (causal) of (scale Q) K^T, times V
        return local_attention(q, k, v, q_pos, k_pos, self.window, self.causal, self.scale, self.softcap)
