"""Sliding-window attention (Longformer / Mistral): softmax over the keys inside the window.

Causal: query i sees keys i-w < j <= i, so w keys including itself; encoders: |i - j| < w. The math is the
op's reference (effx.plugins.local); with a ring cache only the last w keys are ever stored.

Export: the target's op flavours (effx.core.flavours) pick, per site, the standard ONNX `Attention` or the
`effx::LocalAttention` node. A query with no allowed key gets the mean of the values from effx's op and a zero
row from ONNX `Attention`; that happens only to padded queries (every real query sees at least its own key:
padding masks keys, and a real token is a real key), whose outputs validation never compares and no real
token ever reads (padded keys are masked in every layer).
"""

from __future__ import annotations

from torch import Tensor

from effx.models.attention import SoftmaxAttention, attention_impl, takes_standard_op
from effx.models.full import sdpa
from effx.plugins.local import local_allowed, local_attention
from effx.plugins.standard import onnx_attention


class LocalAttention(SoftmaxAttention):
    kind = "local"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        self.window = self.params.window
        self.paged_window = self.window if self.causal else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # softmax over {j : q_pos - w < k_pos <= q_pos} (causal) of (scale Q) K^T, times V
        return local_attention(q, k, v, q_pos, k_pos, self.window, self.causal, self.scale, self.softcap)

    def attend_sequence(self, q, k, v, positions, key_mask):
        # A whole sequence (positions 0..n-1) as ONNX Attention-25: causal i-(w-1) <= j <= i is left w-1, right 0;
        # symmetric |i-j| < w is left w-1, right w-1; padding is a boolean mask over the keys (B,1,1,N)
        if takes_standard_op("local", self.softcap > 0):
            mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
            return onnx_attention(q, k, v, mask, self.causal, self.window - 1, 0 if self.causal else self.window - 1,
                                  self.scale, self.softcap)
        return super().attend_sequence(q, k, v, positions, key_mask)

    def attend_cache(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # A step over a cache buffer (a few queries, window-sized or capacity-sized keys) has no long-sequence
        # structure for the banded form to exploit: the window becomes a boolean mask over the slots and the
        # step exports as the standard ONNX Attention where the flavour says so (measured in the README's hybrid
        # decode table); Attention-25 carries soft-capping (SDPA, Attention-23 have none). Every query sees
        # itself (written before it attends), so no row of the mask is empty.
        standard = takes_standard_op("local-step", self.softcap > 0)
        if standard is False or attention_impl("sdpa") != "sdpa":
            return self.attend(q, k, v, q_pos, k_pos)
        if self.softcap:
            if not standard:  # eager PyTorch: the effx op caps the scores
                return self.attend(q, k, v, q_pos, k_pos)
            return onnx_attention(q, k, v, local_allowed(q_pos, k_pos, self.window, self.causal), False, -1, -1,
                                  self.scale, self.softcap)
        return sdpa(q, k, v, local_allowed(q_pos, k_pos, self.window, self.causal), self.scale)  # (B,1,Nq,Nk)
