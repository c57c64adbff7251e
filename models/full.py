"""Full attention: softmax(Q K^T / sqrt(d)) V, exact. The fused SDPA path and the readable math path
compute the same thing; `attention.impl` picks one (export turns SDPA into ONNX `Attention` at opset 23).
Soft-capping (Gemma 2) exports as ONNX `Attention`-25's `softcap` where the target's flavour for `full` is the
standard op and the opset reaches 25, else as the decomposed math."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from effx.models.attention import SoftmaxAttention, attention_impl, takes_standard_op
from effx.plugins.common import causal_allowed, softmax_attention, split_positions
from effx.plugins.standard import onnx_attention


def sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float, is_causal: bool = False) -> Tensor:
    """SDPA over grouped KV heads as they are: q (B,H,Nq,D), k/v (B,H_kv,Nk,D). The exporter turns it into one
    ONNX `Attention` node that reads the H_kv heads itself; expanding K/V to H heads first would copy the whole
    KV cache H/H_kv times on every decode step."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


class FullAttention(SoftmaxAttention):
    kind = "full"
    paged_window = 0  # the paged op with no window is full causal attention

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        self.impl = getattr(self.params, "impl", "sdpa")  # hourglass layers: SDPA

    def attend_sequence(self, q, k, v, positions, key_mask):
        if key_mask is None and attention_impl(self.impl) == "sdpa" and not self.softcap:  # no padding: SDPA's own causal flag, no mask tensor
            return sdpa(q, k, v, None, self.scale, is_causal=self.causal)
        if self.softcap and takes_standard_op("full", softcap=True):  # Attention-25: causal flag, padding over keys
            mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
            return onnx_attention(q, k, v, mask, self.causal, -1, -1, self.scale, self.softcap)
        return super().attend_sequence(q, k, v, positions, key_mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        # (B,H,Nq,D) x (B,H_kv,Nk,D); allowed (B,1,Nq,Nk): a real key, and not in the future for decoders
        if self.causal:
            allowed = causal_allowed(q_pos, k_pos)
        else:  # padding only; spelled out over the query axis (ONNX Runtime's Attention wants (.., Nq, Nk))
            allowed = split_positions(q_pos, k_pos)[2].expand(-1, -1, q.shape[2], -1)
        if attention_impl(self.impl) == "sdpa" and not self.softcap:  # SDPA has no soft-capping
            return sdpa(q, k, v, allowed, self.scale)
        if self.softcap and takes_standard_op("full", softcap=True):  # Attention-25 has softcap
            return onnx_attention(q, k, v, allowed, False, -1, -1, self.scale, self.softcap)
        return softmax_attention(q, k, v, allowed, self.scale, self.softcap)
