"""KV-cache layouts: typed containers of per-layer state carried between decode steps.

Every cache holds `lengths` (B,) int64, the tokens already cached per sequence, and `layers`, one dict of
tensors per layer whose keys the layout fixes (they become ONNX names `past.{i}.{key}`). Steps are
functional: `model.step` returns a new cache object, which is what an exported decode graph does too.
Only the paged cache has host-side bookkeeping (its block allocator), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

from effx.core.errors import EffxError


@dataclass
class KVCache:
    layout: ClassVar[str] = ""
    lengths: Tensor  # (B,) int64
    layers: list[dict[str, Tensor]]

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (what the layout costs in memory)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def replaced(self, lengths: Tensor, layers: list[dict[str, Tensor]]) -> KVCache:
        return replace(self, lengths=lengths, layers=layers)


@dataclass
class ContiguousCache(KVCache):
    """Per layer key/value (B, H_kv, P, D), concatenated each step: memory grows with P."""

    layout: ClassVar[str] = "contiguous"


@dataclass
class RingCache(KVCache):
    """Per layer key/value (B, H_kv, W, D); token p lives in slot p mod W. Fixed size."""

    layout: ClassVar[str] = "ring"
    window: int = 0


@dataclass
class StateCache(KVCache):
    """Per layer s (B, H_kv, m, D) = sum phi(k) v^T and z (B, H_kv, m) = sum phi(k). Fixed size."""

    layout: ClassVar[str] = "state"


@dataclass
class MultiscaleCache(KVCache):
    """Hourglass: factor-1 layers keep key/value; factor-f layers keep pooled key/value (B,H_kv,J,D), the
    tail of the group being pooled (tail_q/k/v, fewer than f tokens) and their last pooled output."""

    layout: ClassVar[str] = "multiscale"
    factors: list[int] = field(default_factory=list)


@dataclass
class PagedCache(KVCache):
    """Per layer key_pool/value_pool (num_blocks, block_size, H_kv, D) shared by the batch, plus the
    block table (B, max_blocks) mapping each sequence's logical blocks to physical ones."""

    layout: ClassVar[str] = "paged"
    block_table: Tensor = None  # type: ignore[assignment]
    block_size: int = 16
    free_blocks: list[int] = field(default_factory=list)
    blocks_used: list[int] = field(default_factory=list)  # per sequence

    def reserve(self, new_tokens: int) -> PagedCache:
        """Allocate blocks so every sequence can take `new_tokens` more positions (host-side bookkeeping)."""
        free = list(self.free_blocks)
        table = self.block_table.clone()
        used = list(self.blocks_used)
        for b in range(self.batch):
            need = -(-(int(self.lengths[b]) + new_tokens) // self.block_size)
            if need > table.shape[1]:
                raise EffxError(
                    f"paged cache: sequence {b} needs {need} blocks, the block table holds {table.shape[1]}; "
                    "raise kv_cache.num_blocks or model.max_seq_len"
                )
            while used[b] < need:
                if not free:
                    raise EffxError("paged cache: the block pool is full; raise kv_cache.num_blocks")
                table[b, used[b]] = free.pop(0)
                used[b] += 1
        return replace(self, block_table=table, free_blocks=free, blocks_used=used)

    def nbytes_in_use(self) -> int:
        """Bytes of the blocks sequences actually hold (the pool itself is allocated up front)."""
        per_block = sum(t[0].numel() * t.element_size() for layer in self.layers for t in layer.values())
        return per_block * sum(self.blocks_used)


@dataclass
class HybridCache(PagedCache):
    """Layers with different layouts (Gemma-style: ring buffers for local layers, contiguous or paged for global
    ones, state for linear ones): `layouts[i]` is layer i's. The block table and allocator serve the paged
    layers, when there are any (block_table is None otherwise)."""

    layout: ClassVar[str] = "hybrid"
    layouts: list[str] = field(default_factory=list)

    def nbytes_in_use(self) -> int:
        """Bytes of the paged layers' blocks in use plus every other layer's tensors."""
        used = sum(self.blocks_used)
        total = 0
        for kind, layer in zip(self.layouts, self.layers, strict=True):
            for t in layer.values():
                total += t[0].numel() * t.element_size() * used if kind == "paged" else t.numel() * t.element_size()
        return total


def zeros_lengths(batch: int, device: torch.device | None = None) -> Tensor:
    return torch.zeros(batch, dtype=torch.int64, device=device)
