"""Attention layer base classes and the cache layouts of the softmax family.

An attention layer projects x to Q, K, V (RoPE applied at absolute positions, so cached keys are stored
rotated), runs its kind's attention, and projects back. `forward` handles a whole sequence; `step` handles
new tokens against a layer's cache state. Softmax kinds (full, local, block-sparse) only define
`attend(q, k, v, q_pos, k_pos)`; the contiguous, ring and paged layouts below feed every one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import Tensor, nn

from effx.core.errors import EffxError
from effx.core.flavours import ONNX, effective_attention_ops
from effx.core.spec import RunSpec
from effx.models.blocks import make_norm
from effx.plugins.cache_write import write_pages, write_rows
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


# Export-time choice for graphs meant for TensorRT's fused plugins (`--trt-plugins`): keep every attention
# that has an effx op as that op's node, where other graphs take the standard ONNX op for the same math.
_CUSTOM_OPS: ContextVar[bool] = ContextVar("effx_custom_attention_ops", default=False)


@contextlib.contextmanager
def custom_attention_ops(enabled: bool) -> Iterator[None]:
    token = _CUSTOM_OPS.set(enabled)
    try:
        yield
    finally:
        _CUSTOM_OPS.reset(token)


def prefer_custom_ops() -> bool:
    return _CUSTOM_OPS.get()


# Export-time ai.onnx opset of the graph being traced (None in eager PyTorch). A layer whose math has a standard
# ONNX op only from some opset on (LinearAttention, 27) takes it where the graph's opset reaches that version and
# the graph does not keep effx nodes; eager runs keep the effx ops (their fused kernels).
_EXPORT_OPSET: ContextVar[int | None] = ContextVar("effx_export_opset", default=None)


@contextlib.contextmanager
def export_opset(opset: int | None) -> Iterator[None]:
    token = _EXPORT_OPSET.set(opset)
    try:
        yield
    finally:
        _EXPORT_OPSET.reset(token)


# Export-time op flavours (effx.core.flavours): per attention site, the standard ONNX op or effx's own form, as
# the target profile chose them (None in eager PyTorch, which runs its own paths).
_FLAVOURS: ContextVar[Mapping[str, str] | None] = ContextVar("effx_attention_flavours", default=None)


@contextlib.contextmanager
def attention_flavours(choice: Mapping[str, str] | None) -> Iterator[None]:
    token = _FLAVOURS.set(choice)
    try:
        yield
    finally:
        _FLAVOURS.reset(token)


def takes_standard_op(site: str, softcap: bool = False) -> bool | None:
    """During an export: whether attention `site` becomes the standard ONNX op: its flavour is onnx, the graph's
    opset has the op (with soft-capping: Attention-25) and the graph keeps effx nodes nowhere (`--trt-plugins`).
    None in eager PyTorch."""
    choice, opset = _FLAVOURS.get(), _EXPORT_OPSET.get()
    if choice is None or opset is None:
        return None
    # one rule for the graph and for what the manifest records
    return effective_attention_ops(choice, opset, softcap, prefer_custom_ops())[site] == ONNX


def _mod(x: Tensor, n) -> Tensor:
    """x mod n for a size n that may be symbolic at export (a tensor divisor exports as ONNX Mod)."""
    return torch.remainder(x, torch.full_like(x, n))


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
        self.max_seq_len = m.max_seq_len
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

    def empty_state(self, batch: int, cache_spec, dtype: torch.dtype, device: torch.device,
                    capacity: int | None = None, chunk: int = 1) -> LayerState:
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

    def attend_cache(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """New queries against a contiguous or ring buffer (slot positions in k_pos, -1 = empty)."""
        return self.attend(q, k, v, q_pos, k_pos)

    def attend_sequence(self, q, k, v, positions, key_mask):
        k_pos = positions if key_mask is None else torch.where(key_mask.bool(), positions, -1)
        return self.attend(q, k, v, positions, k_pos)

    def empty_state(self, batch, cache_spec, dtype, device, capacity: int | None = None, chunk: int = 1) -> LayerState:
        """Contiguous: buffers of `capacity` positions (default max_seq_len); ring: window + chunk - 1 slots, so a
        step of up to `chunk` tokens can be written before it is attended; paged: the shared pools."""
        shape_kv = (self.n_kv_heads, self.head_dim)
        if cache_spec.layout in ("contiguous", "ring"):
            if cache_spec.layout == "contiguous":
                n = capacity or self.max_seq_len
            else:
                n = (cache_spec.window or self.window) + chunk - 1  # type: ignore[attr-defined]
            z = torch.zeros(batch, self.n_kv_heads, n, self.head_dim, dtype=dtype, device=device)
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

    # Every layout writes the new keys/values into the host's buffers first (one ScatterND whose data is the
    # graph input and whose output is the graph output: a runtime may bind both to one buffer and update it in
    # place), then attends over the written buffers.
    def _step_contiguous(self, q, k, v, state, inputs):
        # buffers (B,H_kv,C,D), C >= tokens the host will cache; token p lives in slot p
        k_buf, v_buf = write_rows(state["key"], k, inputs.q_pos), write_rows(state["value"], v, inputs.q_pos)
        if inputs.fresh:  # a prompt attends to itself (the whole-sequence path)
            return self.attend_sequence(q, k, v, inputs.q_pos, None), {"key": k_buf, "value": v_buf}
        # a slot's position is its index; the unwritten ones (>= lengths + S) lie in every query's future
        k_pos = arange_positions(k_buf.shape[0], k_buf.shape[2], k_buf.device)
        return self.attend_cache(q, k_buf, v_buf, inputs.q_pos, k_pos), {"key": k_buf, "value": v_buf}

    def _step_ring(self, q, k, v, state, inputs):
        ring_k, ring_v = state["key"], state["value"]  # (B,H_kv,C,D), C >= window + S - 1
        c = ring_k.shape[2]
        slot = torch.arange(c, device=k.device)[None, :]  # (1,C)
        end = inputs.lengths[:, None] + k.shape[2] - 1  # (B,1) newest position after the step
        if inputs.fresh:  # the prompt attends to itself; its last C positions fill the ring (a prompt may be > C)
            y = self.attend_sequence(q, k, v, inputs.q_pos, None)
            b, h, _, d = ring_k.shape
            new_pos = end - _mod(end - slot, c)  # (B,C) position each slot holds after the prompt
            written = (new_pos >= 0)[:, None, :, None]
            idx = new_pos.clamp(min=0)[:, None, :, None].expand(b, h, c, d)
            return y, {"key": torch.where(written, k.gather(2, idx), ring_k),
                       "value": torch.where(written, v.gather(2, idx), ring_v)}
        # token p lives in slot p mod C; writing first is safe while S <= C - window + 1 (the host's promise):
        # the slots overwritten held tokens older than any new query's window
        slots = _mod(inputs.q_pos, c)
        ring_k, ring_v = write_rows(ring_k, k, slots), write_rows(ring_v, v, slots)
        slot_pos = end - _mod(end - slot, c)  # (B,C) latest position <= end congruent to the slot
        k_pos = torch.where(slot_pos >= 0, slot_pos, -1)
        return self.attend_cache(q, ring_k, ring_v, inputs.q_pos, k_pos), {"key": ring_k, "value": ring_v}

    def _step_paged(self, q, k, v, state, inputs):
        k_pool, v_pool = state["key_pool"], state["value_pool"]  # (NB,bs,H_kv,D)
        bs = k_pool.shape[1]
        block_table = inputs.block_table
        pos = inputs.q_pos  # (B,S)
        blocks, offsets = block_table.gather(1, pos // bs), pos % bs  # (B,S) where each new token goes
        k_pool = write_pages(k_pool, k.transpose(1, 2), blocks, offsets)  # tokens (B,S,H_kv,D)
        v_pool = write_pages(v_pool, v.transpose(1, 2), blocks, offsets)
        seq_lens = inputs.lengths + inputs.new_lengths
        if self.paged_window is not None:
            y = paged_attention(q, k_pool, v_pool, block_table, pos, seq_lens, self.paged_window, self.scale,
                                self.softcap)
        else:
            k_all, v_all = gather_pages(k_pool, block_table), gather_pages(v_pool, block_table)
            y = self.attend(q, k_all, v_all, pos, paged_key_positions(seq_lens, k_all.shape[2]))
        return y, {"key_pool": k_pool, "value_pool": v_pool}
