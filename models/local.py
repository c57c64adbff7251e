"""Sliding-window attention (Longformer / Mistral): softmax over the keys inside the window.

Causal: query i sees keys i-w < j <= i, so w keys including itself; encoders: |i - j| < w. The math is the
op's reference (effx.plugins.local); with a ring cache only the last w keys are ever stored.
"""

from __future__ import annotations

from torch import Tensor

from effx.models.attention import SoftmaxAttention, attention_impl, prefer_custom_ops
from effx.models.full import sdpa
from effx.plugins.local import local_allowed, local_attention


class LocalAttention(SoftmaxAttention):
    kind = "local"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        self.window = self.params.window
        self.paged_window = self.window if self.causal else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # softmax over {j : q_pos - w < k_pos <= q_pos} (causal) of (scale Q) K^T, times V
        return local_attention(q, k, v, q_pos, k_pos, self.window, self.causal, self.scale, self.softcap)

    def attend_cache(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # A step over a cache buffer (a few queries, window-sized or capacity-sized keys) has no long-sequence
        # structure for the banded form to exploit: the window becomes a boolean mask over the slots and the
        # step exports as the standard ONNX Attention (ONNX Runtime's fused kernel; measured in the README's
        # hybrid decode table). Graphs for TensorRT's plugins (--trt-plugins), soft-capping (SDPA has none) and
        # exports below opset 23 keep the effx op. Every query sees itself (written before it attends), so no
        # row of the mask is empty.
        if prefer_custom_ops() or self.softcap or attention_impl("sdpa") != "sdpa":
            return self.attend(q, k, v, q_pos, k_pos)
        allowed = local_allowed(q_pos, k_pos, self.window, self.causal)  # (B,1,Nq,Nk)
        return sdpa(q, k, v, allowed, self.scale)
