"""Hierarchical (hourglass) attention (Nawrot et al. 2021, Alg. 1).

The layers of the model form an hourglass over the shorten factors, e.g. factors [1, 4, 16] give levels
1, 4, 16, 4, 1 (layers split between them). A layer at factor f pools Q, K, V in groups of f (causal: after
a shift right by f - 1), runs softmax attention over the n/f pooled tokens and upsamples by repeat: cost
(n/f)^2 instead of n^2. Factor 1 is plain softmax attention, so factors [1] is the base model.

Decoding (multiscale cache), derived from Alg. 1 + §2.2: a factor-f layer keeps the pooled keys/values of
finished groups, the q/k/v of the group still filling (the "tail", f - 1 zero tokens at the start, which is
the shift), and its last pooled output. A group finishes at position jf; each finished group runs one
pooled query, and positions jf .. jf + f - 1 read that output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.core.errors import EffxError
from effx.models.attention import AttentionBase
from effx.plugins.common import arange_positions, causal_allowed, softmax_attention
from effx.plugins.hourglass import hourglass_attention, pool_groups


def hourglass_schedule(n_layers: int, factors: list[int]) -> list[int]:
    """Shorten factor of each layer: levels down and back up (1, 4, 16, 4, 1), extra layers to the middle.
    With fewer layers than levels the way back up is cut short (2 layers, [1, 2]: 1, 2): every level going
    down keeps its layer, so the model still starts at full resolution."""
    levels = factors + factors[-2::-1]
    if n_layers < len(levels):
        return levels[:n_layers]
    sizes = [n_layers // len(levels)] * len(levels)
    middle = len(levels) // 2
    for i in range(n_layers % len(levels)):
        sizes[middle + (i + 1) // 2 * (1 if i % 2 else -1)] += 1
    return [f for f, size in zip(levels, sizes, strict=True) for _ in range(size)]


class HierarchicalAttention(AttentionBase):
    kind = "hierarchical"

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        self.factor = hourglass_schedule(spec.model.n_layers, self.params.factors)[layer_index]

    def attend_sequence(self, q, k, v, positions, key_mask):
        # pooled softmax attention at 1/f resolution, each position reads its group's output
        k_valid = None if key_mask is None else key_mask.to(q.dtype)
        return hourglass_attention(q, k, v, k_valid, self.factor, self.causal, self.scale)

    def empty_state(self, batch, cache_spec, dtype, device):
        if cache_spec.layout != "multiscale":
            raise EffxError(f"kv_cache.layout={cache_spec.layout} does not fit attention.kind=hierarchical")

        def zeros(heads: int, n: int) -> Tensor:
            return torch.zeros(batch, heads, n, self.head_dim, dtype=dtype, device=device)

        state = {"key": zeros(self.n_kv_heads, 0), "value": zeros(self.n_kv_heads, 0)}
        if self.factor > 1:  # the f - 1 zero tokens are the causal shift of the first group
            f = self.factor
            state |= {"tail_q": zeros(self.n_heads, f - 1), "tail_k": zeros(self.n_kv_heads, f - 1),
                      "tail_v": zeros(self.n_kv_heads, f - 1), "last_out": zeros(self.n_heads, 1)}
        return state

    def attend_step(self, q, k, v, state, inputs):
        f = self.factor
        if f == 1:  # plain causal attention over a contiguous cache
            k_all, v_all = torch.cat([state["key"], k], 2), torch.cat([state["value"], v], 2)
            if inputs.fresh:
                return hourglass_attention(q, k, v, None, 1, True, self.scale), {"key": k_all, "value": v_all}
            k_pos = arange_positions(k.shape[0], k_all.shape[2], k.device)
            y = softmax_attention(q, k_all, v_all, causal_allowed(inputs.q_pos, k_pos), self.scale)
            return y, {"key": k_all, "value": v_all}
        cq = torch.cat([state["tail_q"], q], 2)  # (B,H,r+S,D): unpooled tokens since the last finished group
        ck, cv = torch.cat([state["tail_k"], k], 2), torch.cat([state["tail_v"], v], 2)
        done = cq.shape[2] // f * f  # tokens of the groups finished in this step
        pooled_k = torch.cat([state["key"], pool_groups(ck[:, :, :done], f)], 2)  # (B,H_kv,J+g,D)
        pooled_v = torch.cat([state["value"], pool_groups(cv[:, :, :done], f)], 2)
        tails = {"tail_q": cq[:, :, done:], "tail_k": ck[:, :, done:], "tail_v": cv[:, :, done:]}
        if inputs.fresh:  # a prompt: the whole-sequence op, and the last group's output read back from it
            y = hourglass_attention(q, k, v, None, f, True, self.scale)
            last = (pooled_k.shape[2] - 1) * f  # position that reads the last finished group
            return y, {"key": pooled_k, "value": pooled_v, **tails, "last_out": y[:, :, last:last + 1]}
        new_q = pool_groups(cq[:, :, :done], f)  # (B,H,g,D), pooled queries of the new groups
        j_old = state["key"].shape[2]
        b = q.shape[0]
        q_groups = arange_positions(b, new_q.shape[2], q.device) + j_old  # pooled positions J..J+g-1
        k_groups = arange_positions(b, pooled_k.shape[2], q.device)
        new_out = softmax_attention(new_q, pooled_k, pooled_v, causal_allowed(q_groups, k_groups), self.scale)
        outs = torch.cat([state["last_out"], new_out], 2)  # (B,H,1+g,D): index 0 is group J-1
        # position p reads group p // f, which sits at index p // f - (J - 1) of outs
        idx = (inputs.q_pos // f - (j_old - 1))[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        y = outs.gather(2, idx)  # (B,H,S,D)
        return y, {"key": pooled_k, "value": pooled_v, **tails, "last_out": outs[:, :, -1:]}
