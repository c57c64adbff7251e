"""Linformer (Wang et al. 2020): head_i = softmax(Q_i (E_i K_i)^T / sqrt(d)) (F_i V_i), E_i, F_i: k x n.

Parameter sharing (paper §4): `none` one E and F per head and layer; `headwise` one E and F per layer for all
heads; `kv` one matrix per layer used as E and F; `layerwise` one matrix for every layer, head, K and V
(owned by the model). Inputs shorter than max_seq_len use the first n columns of E/F; longer ones are an
error. Padded positions have their keys and values zeroed, so they add nothing to E K and F V.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from effx.core.errors import EffxError
from effx.models.attention import AttentionBase
from effx.plugins.linformer import linformer_attention


def init_projection(heads: int, k: int, n: int) -> nn.Parameter:
    # E ~ N(0, 1/k): the Johnson-Lindenstrauss projection of the paper's Theorem 1
    return nn.Parameter(torch.randn(heads, k, n) / math.sqrt(k))


class LinformerAttention(AttentionBase):
    kind = "linformer"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        a, m = self.params, spec.model
        self.sharing, self.max_seq_len = a.sharing, m.max_seq_len
        heads = m.n_heads if a.sharing == "none" else 1
        if a.sharing in ("none", "headwise"):
            self.e = init_projection(heads, a.k, m.max_seq_len)  # (H or 1, k, n_max)
            self.f = init_projection(heads, a.k, m.max_seq_len)
        elif a.sharing == "kv":
            self.e = init_projection(1, a.k, m.max_seq_len)  # E = F

    def projections(self) -> tuple[Tensor, Tensor]:
        if self.sharing == "layerwise":
            e = self._shared[0]["linformer_e"]
            return e, e
        if self.sharing == "kv":
            return self.e, self.e
        return self.e, self.f

    def attend_sequence(self, q, k, v, positions, key_mask):
        n = k.shape[2]
        if not torch.compiler.is_compiling() and n > self.max_seq_len:
            raise EffxError(
                f"Linformer input length {n} exceeds model.max_seq_len={self.max_seq_len}: E/F project "
                "exactly that many positions; truncate the input or rebuild with a larger max_seq_len"
            )
        if key_mask is not None:
            m = key_mask[:, None, :, None].to(k.dtype)
            k, v = k * m, v * m  # (B,H,N,D), padding rows zeroed
        e, f = self.projections()
        # softmax(Q (E[:, :, :n] K)^T * scale) (F[:, :, :n] V)
        return linformer_attention(q, k, v, e[:, :, :n], f[:, :, :n], self.scale)
