"""The manifest's cache plan: how a host allocates and feeds a decoder's KV cache, step by step."""

from __future__ import annotations

from effx.core.manifest import CachePlan, CacheTensor, ControlInput, LayerCache
from effx.core.registry import CACHES
from effx.models.transformer import EffxModel

_DTYPE = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}

_PROTOCOL = {
    "contiguous": [
        "Allocate past.{i}.key/value as zeros [batch, H_kv, capacity, head_dim], capacity >= every token the host "
        "will cache (prompt + generated); run prefill.onnx on input_ids with them.",
        "Each step: feed the buffers as past.{i}.*, past_lengths = tokens already cached per sequence; token p is "
        "written to slot p. present.{i}.* is past.{i}.* after the write (graph `aliases`: bind both to one buffer "
        "to update it in place, or feed present back as past).",
    ],
    "ring": [
        "Allocate past.{i}.key/value as zeros [batch, H_kv, C, head_dim] with C >= window + S - 1, S the most "
        "tokens a step after the prompt takes (C = window for one token per step); run prefill.onnx with them.",
        "Each step: feed the buffers as past.{i}.*; past_lengths = tokens seen so far (may exceed C). Token p lives "
        "in slot p mod C; the decode graph writes before it attends, in place where `aliases` says so.",
    ],
    "state": [
        "Allocate past.{i}.s [batch, H_kv, m, head_dim] and past.{i}.z [batch, H_kv, m] as zeros (or run prefill.onnx).",
        "Each step: feed present.{i}.* back as past.{i}.*; past_lengths = tokens seen so far (positions for RoPE).",
        "The recurrent state has a fixed size whatever the number of tokens.",
    ],
    "multiscale": [
        "Allocate the key/value buffers of the factor-1 layers as zeros [batch, H_kv, capacity, head_dim], capacity "
        ">= every token the host will cache; run prefill.onnx on input_ids with them (it makes the other tensors).",
        "Each step: feed the buffers and the other present.{i}.* as past.{i}.*; past_lengths = tokens already cached "
        "per sequence. Factor-1 layers write token p to slot p (graph `aliases`: bind past and present to one buffer "
        "to update it in place, or feed present back).",
        "A factor-f level grows its pooled key/value by one row per f tokens. The first layer below each shortening "
        "by k also carries its tail (the activations since the last complete group, fewer than k: k - 1 zero rows "
        "before the first token, the causal shift) and last_out (the level's output for the newest group).",
        "A step of one token at a position p with p % first_ratio != 0 completes no group: it may run "
        "decode_fine.onnx instead, which takes only the factor-1 buffers and the first shortening's tail and "
        "last_out, and returns the buffers and that tail (every other tensor stays as it is).",
    ],
    "paged": [
        "Allocate past.{i}.key_pool/value_pool once: zeros [num_blocks, block_size, H_kv, head_dim]; they are shared "
        "by the batch.",
        "Before each step: make sure block_table[b] maps enough physical blocks for past_lengths[b] + input length "
        "(ceil(len / block_size) entries; a block belongs to one sequence); new_lengths[b] = real new tokens of row b "
        "(rows may be right-padded).",
        "Run the step (prefill.onnx for the first one, with past_lengths implicitly 0) with the pools as past.{i}.*; "
        "present.{i}.*_pool is the pool after the write (bind both to one buffer where `aliases` says so, or feed "
        "present back) and add new_lengths to past_lengths.",
    ],
}


_HYBRID = [
    "Layers differ (see `layers`): allocate every past.{i}.* from the shapes below as zeros; run prefill.onnx on "
    "the prompt with the buffers of the contiguous, ring and paged layers.",
    "Each step: feed the buffers as past.{i}.* (present.{i}.* is each buffer after the step, in place where the "
    "graph's `aliases` says so); past_lengths = tokens already cached per sequence.",
]
_LAYOUT_NOTE = {
    "contiguous": "contiguous layers: buffers of `capacity` slots (>= tokens cached), token p in slot p.",
    "ring": "ring layers: C >= window + S - 1 slots (`ring_{i}`, S the longest step after the prompt); token p in "
            "slot p mod C.",
    "state": "state layers: a recurrent state of fixed size.",
    "multiscale": "multiscale layers: factor-1 key/value in buffers of `capacity` slots (token p in slot p); "
                  "pooled key/value grow by one row per f tokens.",
    "paged": "paged layers: one block table for all of them; before each step make sure block_table[b] maps enough "
             "physical blocks for past_lengths[b] + input length; new_lengths[b] = real new tokens of row b.",
}


def _layer_params(layout: str, layer_cache, state: dict, attn) -> dict:
    if layout == "ring":  # the attention window (what the slot count must cover)
        return {"window": int(attn.window)}
    if layout == "paged":
        return {"block_size": layer_cache.block_size, "num_blocks": layer_cache.num_blocks}
    if layout == "state":
        return {"features": int(state["s"].shape[2])}
    return {}


def cache_plan(model: EffxModel) -> CachePlan | None:
    spec = model.spec
    if spec.model.family != "decoder" or spec.kv_cache.layout == "none":
        return None
    layout = spec.cache_layout
    resolved = spec.resolved_layers()
    cache = model.empty_cache(1)
    dtype = _DTYPE[str(cache.layers[0][next(iter(cache.layers[0]))].dtype)]
    tensors, layers = [], []
    for i, (layer, state) in enumerate(zip(resolved, cache.layers, strict=True)):
        lay = layer.kv_cache.layout
        for name, t in state.items():
            shape: list[int | str] = list(t.shape)
            if lay != "paged":
                shape[0] = "batch"
            if lay in ("contiguous", "ring"):  # the host sizes the buffer: `capacity` or `ring_{i}` slots
                shape[2] = "capacity" if lay == "contiguous" else f"ring_{i}"
            if lay == "multiscale" and cache.factors[i] == 1 and name in ("key", "value"):  # contiguous buffers
                shape[2] = "capacity"
            tensors.append(CacheTensor(input=f"past.{i}.{name}", output=f"present.{i}.{name}", dtype=dtype, shape=shape))
        params = _layer_params(lay, layer.kv_cache, state, model.blocks[i].attn)
        if lay == "multiscale":
            params["factor"] = int(cache.factors[i])
        layers.append(LayerCache(index=i, kind=layer.attention.kind, layout=lay, tensors=[f"past.{i}.{n}" for n in state],
                                 grows=CACHES[lay].grows, params=params))
    controls = [ControlInput(name="past_lengths", dtype="int64", shape=["batch"],
                             meaning="tokens already in the cache per sequence (decode graph)")]
    paged = next((layer.kv_cache for layer in resolved if layer.kv_cache.layout == "paged"), None)
    if paged is not None:
        max_blocks = int(cache.block_table.shape[1])
        controls += [
            ControlInput(name="new_lengths", dtype="int64", shape=["batch"], meaning="real new tokens per row"),
            ControlInput(name="block_table", dtype="int64", shape=["batch", max_blocks],
                         meaning="physical block of each logical block of each sequence"),
        ]
    if layout == "hybrid":
        params = paged.model_dump(exclude={"layout", "dtype"}) if paged is not None else {}
        present = list(dict.fromkeys(layer.kv_cache.layout for layer in resolved))
        protocol = _HYBRID + [_LAYOUT_NOTE[x] for x in present]
    else:
        params = spec.kv_cache.model_dump(exclude={"layout", "dtype"})
        if layout == "multiscale":
            params["layer_factors"] = list(cache.factors)
            if model.hourglass.first_ratio is not None:  # decode_fine's condition
                params["first_ratio"] = model.hourglass.first_ratio
        if layout == "ring":
            params["window"] = cache.window
        protocol = _PROTOCOL[layout]
    return CachePlan(layout=layout, dtype=dtype, tensors=tensors, controls=controls,
                     grows=any(x.grows for x in layers), params=params, protocol=protocol, layers=layers)
