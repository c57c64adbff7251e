"""Linear attention (Katharopoulos et al. 2020; Performer FAVOR+, Choromanski et al. 2020; Hedgehog, Zhang et
al. 2024).

    V'_i = phi(Q_i)^T S / (phi(Q_i)^T z + eps),  S = sum_j phi(K_j) V_j^T,  z = sum_j phi(K_j)
Encoders sum over all keys; decoders sum over j <= i through a recurrent state (prefix sums), which is
also their KV cache: S (H_kv, m, D) and z (H_kv, m) per sequence, whatever the number of tokens.
FAVOR+ random features are drawn once from the model seed and then fixed (no redraw at inference).
Hedgehog learns its feature map, per head a linear map W (D x D') for queries and one for keys:
    phi(x) = [softmax(x W), softmax(-x W)]  (m = 2 D', softmax over the feature axis)
W starts as the identity (D' = D), and `effx adapt` trains it so that each layer mimics softmax attention. The
learned map runs here, before the op, which takes the features as they are (feature_map "identity").

Exports: causal layers take ONNX's LinearAttention (opset 27) where the target's flavour for the `linear` site is
onnx (effx.core.flavours), the graph's opset has it and the graph does not keep effx nodes, with the features
computed around it and the normaliser carried as an extra value column; encoders (no causal recurrence in that
op), older opsets and the effx flavour keep effx's node.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from effx.core.errors import EffxError
from effx.models.attention import AttentionBase, takes_standard_op
from effx.plugins.linear import (
    favor_projection,
    feature_map,
    linear_attention,
    linear_attention_state,
    normalized_state_attention_standard,
)


def hedgehog_features(x: Tensor, weight: Tensor) -> Tensor:
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h: x (B,H,N,D), weight (H,D,D') -> (B,H,N,2 D')."""
    proj = x @ weight[None]  # (B,H,N,D')
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)


def hedgehog_init(heads: int, head_dim: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.eye(head_dim, dim).expand(heads, head_dim, dim).clone())  # (H,D,D'): identity-like


class LinearAttention(AttentionBase):
    kind = "linear"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        a = self.params
        self.feature_map, self.eps = a.feature_map, a.eps
        # what the op applies itself: the learned map runs here, the op takes its features as they are
        self.op_feature_map = "identity" if a.feature_map == "hedgehog" else a.feature_map
        self.n_features = self.head_dim  # m
        if a.feature_map == "favor":
            self.n_features = a.nb_features
            g = torch.Generator().manual_seed(spec.model.seed * 1000 + layer_index)
            self.register_buffer("omega", favor_projection(a.nb_features, self.head_dim, g))  # (m, D)
        else:
            self.omega = None
        if a.feature_map == "hedgehog":
            dim = a.hedgehog_dim or self.head_dim
            self.n_features = 2 * dim
            self.hedgehog_q = hedgehog_init(self.n_heads, self.head_dim, dim)  # queries' map per head (H,D,D')
            self.hedgehog_k = hedgehog_init(self.n_kv_heads, self.head_dim, dim)  # keys' map per KV head

    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """What the op's feature map takes: q, k themselves, or their Hedgehog features (B,H,N,m)."""
        if self.feature_map == "hedgehog":
            return hedgehog_features(q, self.hedgehog_q), hedgehog_features(k, self.hedgehog_k)
        return q, k

    def attend_sequence(self, q, k, v, positions, key_mask):
        q, k = self.features(q, k)
        if not self.causal:
            k_valid = None if key_mask is None else key_mask.to(q.dtype)
            return linear_attention(q, k, v, k_valid, self.omega, self.op_feature_map, self.eps)
        y, _, _ = self._state_attention(q, k, v, *self._zeros(q.shape[0], q))
        return y

    def _state_attention(self, q: Tensor, k: Tensor, v: Tensor, s0: Tensor, z0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T, z_i = z_0 + sum_{j<=i} phi(k_j); y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)
        if takes_standard_op("linear"):  # ONNX LinearAttention-27, features computed around it
            phi_q = feature_map(q, self.omega, self.op_feature_map, is_query=True)
            phi_k = feature_map(k, self.omega, self.op_feature_map, is_query=False)
            return normalized_state_attention_standard(phi_q, phi_k, v, s0, z0, self.eps)
        return linear_attention_state(q, k, v, s0, z0, self.omega, self.op_feature_map, self.eps)

    def _zeros(self, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
        s = like.new_zeros(batch, self.n_kv_heads, self.n_features, self.head_dim)  # (B,H_kv,m,D)
        return s, like.new_zeros(batch, self.n_kv_heads, self.n_features)  # (B,H_kv,m)

    def empty_state(self, batch, cache_spec, dtype, device, capacity=None, chunk=1):
        if cache_spec.layout != "state":
            raise EffxError(f"kv_cache.layout={cache_spec.layout} does not fit attention.kind=linear; use state")
        s, z = self._zeros(batch, torch.empty(0, dtype=dtype, device=device))
        return {"s": s, "z": z}

    def attend_step(self, q, k, v, state, inputs):
        # from the cached (S_0, z_0) over the new tokens
        y, s, z = self._state_attention(*self.features(q, k), v, state["s"], state["z"])
        return y, {"s": s, "z": z}
