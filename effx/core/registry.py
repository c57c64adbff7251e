"""Registries of attention kinds and KV-cache layouts, and the compatibility they declare.

Pure data (no torch import), so `effx models`, spec validation and the README matrices are cheap and are
generated from here, never written by hand. Each entry names its pydantic spec class in effx.core.spec
(which imports this module to check a RunSpec; `effx.core.spec.describe()` joins the two for `effx models`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from effx.core.errors import CompatibilityError


@dataclass(frozen=True)
class AttentionEntry:
    kind: str
    spec_class: str  # name in effx.core.spec
    summary: str
    families: tuple[str, ...]
    cache_layouts: tuple[str, ...]  # layouts a decoder may use with this kind ("none" always allowed)
    onnx_op: str | None  # effx-domain op the prefill/encoder graph uses (None: standard ONNX)
    why_not: dict[str, str] = field(default_factory=dict)  # layout or family -> reason it is refused


@dataclass(frozen=True)
class CacheEntry:
    layout: str
    spec_class: str
    summary: str
    grows: bool  # memory grows with decoded tokens


ATTENTION: dict[str, AttentionEntry] = {}
CACHES: dict[str, CacheEntry] = {}


def register_attention(entry: AttentionEntry) -> AttentionEntry:
    ATTENTION[entry.kind] = entry
    return entry


def register_cache(entry: CacheEntry) -> CacheEntry:
    CACHES[entry.layout] = entry
    return entry


register_cache(CacheEntry("none", "NoCacheSpec", "no cache: full forward only (encoders)", grows=False))
register_cache(CacheEntry("contiguous", "ContiguousCacheSpec", "[B,H_kv,C,D] per layer, C slots for every cached token, written in place", grows=True))
register_cache(
    CacheEntry("paged", "PagedCacheSpec", "block pool [blocks,bs,H_kv,D] + per-sequence block table", grows=True)
)
register_cache(CacheEntry("ring", "RingCacheSpec", "rolling [B,H_kv,C,D], C >= window: token p in slot p mod C", grows=False))
register_cache(CacheEntry("state", "StateCacheSpec", "recurrent S [B,H_kv,m,D] and z [B,H_kv,m]", grows=False))
register_cache(
    CacheEntry("multiscale", "MultiscaleCacheSpec", "K/V per hourglass level (1/f rows per token) + pooling tails",
               grows=True)
)

_ENCODER_ONLY = "Linformer projects keys/values over the whole sequence (future tokens included), so it cannot "
_ENCODER_ONLY += "be causal or decoded token by token: use it with model.family = encoder"

register_attention(
    AttentionEntry(
        "full", "FullAttentionSpec", "exact softmax attention (SDPA / math)", ("encoder", "decoder"),
        ("contiguous", "paged"), None,
        {"ring": "a ring buffer drops old tokens, which full attention still needs: use attention.kind = local",
         "state": "a recurrent state needs linear attention: use attention.kind = linear",
         "multiscale": "a multiscale cache needs attention.kind = hierarchical"},
    )
)
register_attention(
    AttentionEntry(
        "linformer", "LinformerSpec", "softmax(Q (E K)^T / sqrt(d)) (F V), E,F: k x n", ("encoder",), (),
        "LinformerAttention", {"decoder": _ENCODER_ONLY},
    )
)
register_attention(
    AttentionEntry(
        "local", "LocalSpec", "sliding window (causal: last w keys; encoder: |i-j| < w)", ("encoder", "decoder"),
        ("contiguous", "paged", "ring"), "LocalAttention",
        {"state": "a recurrent state needs attention.kind = linear",
         "multiscale": "a multiscale cache needs attention.kind = hierarchical"},
    )
)
register_attention(
    AttentionEntry(
        "block_sparse", "BlockSparseSpec", "fixed block layout: local + global + strided blocks",
        ("encoder", "decoder"), ("contiguous", "paged"), "BlockSparseAttention",
        {"ring": "global and strided blocks reach back beyond any window: use contiguous or paged",
         "state": "a recurrent state needs attention.kind = linear",
         "multiscale": "a multiscale cache needs attention.kind = hierarchical"},
    )
)
register_attention(
    AttentionEntry(
        "linear", "LinearSpec", "phi(Q) (phi(K)^T V) / phi(Q) sum phi(K); elu+1, FAVOR+ or Hedgehog (learned)",
        ("encoder", "decoder"), ("state",), "NormalizedLinearAttention",
        {"contiguous": "linear attention decodes from its fixed-size recurrent state: use kv_cache.layout = state",
         "paged": "linear attention decodes from its fixed-size recurrent state: use kv_cache.layout = state",
         "ring": "linear attention decodes from its fixed-size recurrent state: use kv_cache.layout = state",
         "multiscale": "a multiscale cache needs attention.kind = hierarchical"},
    )
)
register_attention(
    AttentionEntry(
        "hierarchical", "HierarchicalSpec", "hourglass: whole layers at shortened resolutions, upsampled back",
        ("encoder", "decoder"), ("multiscale",), None,
        {"contiguous": "hourglass layers cache pooled keys/values: use kv_cache.layout = multiscale",
         "paged": "hourglass layers cache pooled keys/values: use kv_cache.layout = multiscale",
         "ring": "hourglass layers cache pooled keys/values: use kv_cache.layout = multiscale",
         "state": "a recurrent state needs attention.kind = linear"},
    )
)


def compatible_layouts(kind: str, family: str) -> tuple[str, ...]:
    entry = ATTENTION[kind]
    if family not in entry.families:
        return ()
    return ("none",) + (entry.cache_layouts if family == "decoder" else ())


def check_compatible(spec: Any) -> None:
    """Raise CompatibilityError (one line: why, and what to choose instead) for an impossible combination,
    checked layer by layer for a model that mixes attention kinds (the message then names the layer)."""
    layers = spec.resolved_layers()
    mixed = spec.layers is not None
    seen: set[str] = set()
    for layer in layers:
        if layer.type in seen:
            continue
        seen.add(layer.type)
        where = f"layer {layer.index} ({layer.type}): " if mixed else ""
        try:
            _check_layer(spec, layer)
        except CompatibilityError as exc:
            raise CompatibilityError(where + str(exc)) from None
    kinds = {layer.attention.kind for layer in layers}
    if mixed and "hierarchical" in kinds and len(kinds) > 1:
        raise CompatibilityError("layers: attention.kind=hierarchical shapes the whole model (an hourglass over its "
                                 "layers) and cannot be one layer type among others")
    pools = {(layer.kv_cache.block_size, layer.kv_cache.num_blocks) for layer in layers if layer.kv_cache.layout == "paged"}
    if len(pools) > 1:
        raise CompatibilityError(f"layers: paged layers with different block_size/num_blocks {sorted(pools)}; they "
                                 "share one block table: give them one kv_cache")
    if spec.model.attn_softcap is not None and kinds - SOFTCAP_KINDS:
        raise CompatibilityError(f"model.attn_softcap is implemented for {', '.join(sorted(SOFTCAP_KINDS))} attention, "
                                 f"not {', '.join(sorted(kinds - SOFTCAP_KINDS))}; drop it or change those layers")


SOFTCAP_KINDS = {"full", "local"}  # the kinds whose ops take attention-logit soft-capping


def _check_layer(spec: Any, layer: Any) -> None:
    kind, family = layer.attention.kind, spec.model.family
    layout = layer.kv_cache.layout
    entry = ATTENTION[kind]
    if family not in entry.families:
        raise CompatibilityError(f"attention.kind={kind} with model.family={family}: {entry.why_not[family]}")
    if family == "encoder" and layout != "none":
        raise CompatibilityError(
            f"kv_cache.layout={layout} with model.family=encoder: encoders do not decode; set kv_cache.layout = none"
        )
    if layout != "none" and layout not in entry.cache_layouts:
        reason = entry.why_not.get(layout, "not supported")
        choose = ", ".join(entry.cache_layouts) or "none"
        raise CompatibilityError(
            f"kv_cache.layout={layout} with attention.kind={kind}: {reason} (compatible: {choose})"
        )
    _check_params(spec.model, layer.attention, layer.kv_cache)


def _check_params(m: Any, a: Any, c: Any) -> None:
    if a.kind == "linformer" and a.k > m.max_seq_len:
        raise CompatibilityError(f"attention.k={a.k} exceeds model.max_seq_len={m.max_seq_len}; choose k <= max_seq_len")
    if a.kind == "hierarchical":
        if m.n_layers < len(a.factors):
            raise CompatibilityError(
                f"model.n_layers={m.n_layers} is too few for attention.factors={a.factors}: an hourglass needs a "
                f"layer per level ({len(a.factors)}); raise n_layers or drop a factor"
            )
        if m.max_seq_len < a.factors[-1]:
            raise CompatibilityError(
                f"attention.factors={a.factors}: largest factor exceeds model.max_seq_len={m.max_seq_len}"
            )
    if c.layout == "ring" and a.kind == "local" and c.window is not None and c.window < a.window:
        raise CompatibilityError(
            f"kv_cache.window={c.window} is smaller than attention.window={a.window}: the ring would drop keys "
            "the window still sees; leave kv_cache.window unset or make it >= attention.window"
        )
    if c.layout == "paged" and c.num_blocks * c.block_size < m.max_seq_len:
        raise CompatibilityError(
            f"kv_cache.num_blocks={c.num_blocks} x block_size={c.block_size} holds fewer tokens than "
            f"model.max_seq_len={m.max_seq_len}; raise num_blocks"
        )
