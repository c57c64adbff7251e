"""Linear attention (Katharopoulos et al. 2020; Performer FAVOR+, Choromanski et al. 2020).

    V'_i = phi(Q_i)^T S / (phi(Q_i)^T z + eps),  S = sum_j phi(K_j) V_j^T,  z = sum_j phi(K_j)
Encoders sum over all keys; decoders sum over j <= i through a recurrent state (prefix sums), which is
also their KV cache: S (H_kv, m, D) and z (H_kv, m) per sequence, whatever the number of tokens.
FAVOR+ random features are drawn once from the model seed and then fixed (no redraw at inference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.core.errors import EffxError
from effx.models.attention import AttentionBase
from effx.plugins.linear import favor_projection, linear_attention, linear_attention_state


class LinearAttention(AttentionBase):
    kind = "linear"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        a = self.params
        self.feature_map, self.eps = a.feature_map, a.eps
        self.n_features = a.nb_features if a.feature_map == "favor" else self.head_dim
        if a.feature_map == "favor":
            g = torch.Generator().manual_seed(spec.model.seed * 1000 + layer_index)
            self.register_buffer("omega", favor_projection(a.nb_features, self.head_dim, g))  # (m, D)
        else:
            self.omega = None

    def attend_sequence(self, q, k, v, positions, key_mask):
        if not self.causal:
            k_valid = None if key_mask is None else key_mask.to(q.dtype)
            return linear_attention(q, k, v, k_valid, self.omega, self.feature_map, self.eps)
        y, _, _ = linear_attention_state(q, k, v, *self._zeros(q.shape[0], q), self.omega, self.feature_map, self.eps)
        return y

    def _zeros(self, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
        s = like.new_zeros(batch, self.n_kv_heads, self.n_features, self.head_dim)  # (B,H_kv,m,D)
        return s, like.new_zeros(batch, self.n_kv_heads, self.n_features)  # (B,H_kv,m)

    def empty_state(self, batch, cache_spec, dtype, device, capacity=None, chunk=1):
        if cache_spec.layout != "state":
            raise EffxError(f"kv_cache.layout={cache_spec.layout} does not fit attention.kind=linear; use state")
        s, z = self._zeros(batch, torch.empty(0, dtype=dtype, device=device))
        return {"s": s, "z": z}

    def attend_step(self, q, k, v, state, inputs):
        # S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T over the new tokens, from the cached (S_0, z_0)
        y, s, z = linear_attention_state(q, k, v, state["s"], state["z"], self.omega, self.feature_map, self.eps)
        return y, {"s": s, "z": z}
