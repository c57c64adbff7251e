"""Attention layer base classes and the cache layouts of the softmax family.

An attention layer projects x to Q, K, V (RoPE applied at absolute positions, so cached keys are stored
rotated), runs its kind's attention, and projects back. `forward` handles a whole sequence; `step` handles
new tokens against a layer's cache state. Softmax kinds (full, local, block-sparse) only define
`attend(q, k, v, q_pos, k_pos)`; the contiguous, ring and paged layouts below feed every one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import Tensor, nn

from effx.core.errors import EffxError
from effx.core.spec import RunSpec
from effx.models.blocks import make_norm
from effx.plugins.common import arange_positions
from effx.plugins.paged import gather_pages, paged_attention, paged_key_positions

LayerState = dict[str, Tensor]

# Export-time choice of the full-attention path, scoped (never a global patch): below ONNX opset 23 the
# exporter asks for the math path, whose graph scales Q before the first MatMul.
_ATTENTION_IMPL: ContextVar[str | None] = ContextVar("effx_attention_impl", default=None)


@contextlib.contextmanager
def attention_impl_override(impl: str | None) -> Iterator[None]:
    token = _ATTENTION_IMPL.set(impl)
    try:
        yield
    finally:
        _ATTENTION_IMPL.reset(token)


def attention_impl(default: str) -> str:
    return _ATTENTION_IMPL.get() or default


class StepInputs:
    """What a decode step knows besides the new tokens: positions and, for paged caches, the block table."""

    def __init__(
        self, lengths: Tensor, q_pos: Tensor, new_lengths: Tensor, block_table: Tensor | None = None,
        fresh: bool = False,
    ):
        self.fresh = fresh  # the cache is empty (a prompt): kinds may run their whole-sequence op
        self.lengths = lengths  # (B,) tokens cached before this step
        self.q_pos = q_pos  # (B, S) absolute positions of the new tokens
        self.new_lengths = new_lengths  # (B,) real new tokens per row (paged batches may be ragged)
        self.block_table = block_table  # (B, max_blocks) for paged


class AttentionBase(nn.Module):
    kind: ClassVar[str] = ""

    def __init__(self, spec: RunSpec, layer_index: int, rope: nn.Module | None, shared: nn.ParameterDict | None = None):
        super().__init__()
        m = spec.model
        self.layer_index = layer_index
        layer = spec.layer(layer_index)
        self.params = layer.attention  # this layer's attention spec (kind parameters)
        self.cache_layout = layer.kv_cache.layout  # how a decoder caches this layer
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, m.kv_heads, m.head_dim
        self.causal = m.causal
        self.scale = m.attn_scale if m.attn_scale is not None else self.head_dim**-0.5
        self.softcap = m.attn_softcap or 0.0  # attention-logit soft-capping (0: off)
        self.q_proj = nn.Linear(m.d_model, m.n_heads * m.head_dim, bias=m.q_k_v_bias)
        self.k_proj = nn.Linear(m.d_model, m.kv_heads * m.head_dim, bias=m.q_k_v_bias)
        self.v_proj = nn.Linear(m.d_model, m.kv_heads * m.head_dim, bias=m.q_k_v_bias)
        self.o_proj = nn.Linear(m.n_heads * m.head_dim, m.d_model, bias=m.bias)
        if m.qk_norm:  # per-head RMS norms of q and k, before RoPE (Qwen3, Gemma 3)
            kind = m.norm if m.norm != "layernorm" else "rmsnorm"
            self.q_norm = make_norm(kind, m.head_dim, m.norm_eps)
            self.k_norm = make_norm(kind, m.head_dim, m.norm_eps)
        # held in lists: the model owns these, layers only use them (no duplicate entries in state_dict)
        self._rope = [rope]
        self._shared = [shared]

    # -- projections ------------------------------------------------------------------------------------
    def qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B,H,N,D)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,H_kv,N,D)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        rope = self._rope[0]
        if rope is not None:
            q, k = rope(q, positions), rope(k, positions)
        return q, k, v

    def merge(self, y: Tensor) -> Tensor:
        b, _, n, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))  # (B,N,C)

    # -- interface ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x, positions)
        return self.merge(self.attend_sequence(q, k, v, positions, key_mask))

    def attend_sequence(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def empty_state(self, batch: int, cache_spec, dtype: torch.dtype, device: torch.device) -> LayerState:
        raise EffxError(f"attention.kind={self.kind} has no decode path")

    def step(self, x: Tensor, state: LayerState, inputs: StepInputs) -> tuple[Tensor, LayerState]:
        q, k, v = self.qkv(x, inputs.q_pos)
        y, new_state = self.attend_step(q, k, v, state, inputs)
        return self.merge(y), new_state

    def attend_step(self, q, k, v, state: LayerState, inputs: StepInputs) -> tuple[Tensor, LayerState]:
        raise EffxError(f"attention.kind={self.kind} has no decode path")


class SoftmaxAttention(AttentionBase):
    """Softmax kinds: subclasses define `attend`; this class gives them every cache layout."""

    paged_window: ClassVar[int | None] = None  # window for the fused paged op; None: gather + attend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        raise NotImplementedError

    def attend_sequence(self, q, k, v, positions, key_mask):
        k_pos = positions if key_mask is None else torch.where(key_mask.bool(), positions, -1)
        return self.attend(q, k, v, positions, k_pos)

    def empty_state(self, batch, cache_spec, dtype, device) -> LayerState:
        shape_kv = (self.n_kv_heads, self.head_dim)
        if cache_spec.layout == "contiguous":
            z = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, dtype=dtype, device=device)
            return {"key": z, "value": z.clone()}
        if cache_spec.layout == "ring":
            w = cache_spec.window or self.window  # type: ignore[attr-defined]
            z = torch.zeros(batch, self.n_kv_heads, w, self.head_dim, dtype=dtype, device=device)
            return {"key": z, "value": z.clone()}
        if cache_spec.layout == "paged":
            z = torch.zeros(cache_spec.num_blocks, cache_spec.block_size, *shape_kv, dtype=dtype, device=device)
            return {"key_pool": z, "value_pool": z.clone()}
        raise EffxError(f"kv_cache.layout={cache_spec.layout} does not fit attention.kind={self.kind}")

    def attend_step(self, q, k, v, state, inputs):
        if self.cache_layout == "paged":
            return self._step_paged(q, k, v, state, inputs)
        if self.cache_layout == "ring":
            return self._step_ring(q, k, v, state, inputs)
        return self._step_contiguous(q, k, v, state, inputs)

    def _step_contiguous(self, q, k, v, state, inputs):
        k_all = torch.cat([state["key"], k], dim=2)  # (B,H_kv,P+S,D)
        v_all = torch.cat([state["value"], v], dim=2)
        k_pos = arange_positions(k_all.shape[0], k_all.shape[2], k_all.device)
        return self.attend(q, k_all, v_all, inputs.q_pos, k_pos), {"key": k_all, "value": v_all}

    def _step_ring(self, q, k, v, state, inputs):
        ring_k, ring_v = state["key"], state["value"]  # (B,H_kv,W,D)
        b, h, w, d = ring_k.shape
        s = k.shape[2]
        p = inputs.lengths[:, None]  # (B,1) tokens seen so far
        slot = torch.arange(w, device=k.device)[None, :]  # (1,W)
        # slot s holds the latest position < P congruent to s mod W (negative: never written)
        slot_pos = (p - 1) - torch.remainder(p - 1 - slot, w)  # (B,W)
        k_pos = torch.cat([torch.where(slot_pos >= 0, slot_pos, -1), inputs.q_pos], dim=1)
        # attend before writing: a chunk longer than W would overwrite slots its first queries still need
        y = self.attend(q, torch.cat([ring_k, k], 2), torch.cat([ring_v, v], 2), inputs.q_pos, k_pos)
        end = p + s - 1
        new_pos = end - torch.remainder(end - slot, w)  # (B,W) position each slot holds after the step
        from_chunk = (new_pos >= p)[:, None, :, None]  # (B,1,W,1)
        idx = (new_pos - p).clamp(0, s - 1)[:, None, :, None].expand(b, h, w, d)
        new_k = torch.where(from_chunk, k.gather(2, idx), ring_k)
        new_v = torch.where(from_chunk, v.gather(2, idx), ring_v)
        return y, {"key": new_k, "value": new_v}

    def _step_paged(self, q, k, v, state, inputs):
        k_pool, v_pool = state["key_pool"], state["value_pool"]  # (NB,bs,H_kv,D)
        nb, bs, h, d = k_pool.shape
        block_table = inputs.block_table
        pos = inputs.q_pos  # (B,S)
        slots = (block_table.gather(1, pos // bs) * bs + pos % bs).reshape(-1)  # (B*S,) flat pool rows

        def write(pool: Tensor, new: Tensor) -> Tensor:
            rows = new.transpose(1, 2).reshape(-1, h, d)  # (B*S,H_kv,D)
            return pool.reshape(nb * bs, h, d).index_put((slots,), rows).reshape(nb, bs, h, d)

        k_pool, v_pool = write(k_pool, k), write(v_pool, v)
        seq_lens = inputs.lengths + inputs.new_lengths
        if self.paged_window is not None:
            y = paged_attention(q, k_pool, v_pool, block_table, pos, seq_lens, self.paged_window, self.scale,
                                self.softcap)
        else:
            k_all, v_all = gather_pages(k_pool, block_table), gather_pages(v_pool, block_table)
            y = self.attend(q, k_all, v_all, pos, paged_key_positions(seq_lens, k_all.shape[2]))
        return y, {"key_pool": k_pool, "value_pool": v_pool}
