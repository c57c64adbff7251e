"""The manifest's cache plan: how a host allocates and feeds a decoder's KV cache, step by step."""

from __future__ import annotations

from effx.core.manifest import CachePlan, CacheTensor, ControlInput
from effx.core.registry import CACHES
from effx.models.transformer import EffxModel

_DTYPE = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}

_PROTOCOL = {
    "contiguous": [
        "Before the prompt: run prefill.onnx on input_ids; keep every present.{i}.* output.",
        "Each step: feed the previous present.{i}.* as past.{i}.*, past_lengths = tokens already cached per sequence.",
        "present.{i}.key/value grow by the new tokens along axis 2 (past_sequence).",
    ],
    "ring": [
        "Allocate past.{i}.key/value as zeros [batch, H_kv, window, head_dim] (or run prefill.onnx on the prompt).",
        "Each step: feed present.{i}.* back as past.{i}.*; past_lengths = tokens seen so far (may exceed the window).",
        "Token p lives in slot p mod window; the tensors never grow.",
    ],
    "state": [
        "Allocate past.{i}.s [batch, H_kv, m, head_dim] and past.{i}.z [batch, H_kv, m] as zeros (or run prefill.onnx).",
        "Each step: feed present.{i}.* back as past.{i}.*; past_lengths = tokens seen so far (positions for RoPE).",
        "The recurrent state has a fixed size whatever the number of tokens.",
    ],
    "multiscale": [
        "Allocate every past.{i}.* from the shapes below as zeros (or run prefill.onnx on the prompt).",
        "Each step: feed present.{i}.* back as past.{i}.*; past_lengths = tokens seen so far.",
        "Factor-1 layers grow key/value by one row per token; factor-f layers grow their pooled key/value by one row "
        "per f tokens and keep fewer than f unpooled tokens in tail_q/k/v (start: f - 1 zero rows).",
    ],
    "paged": [
        "Allocate past.{i}.key_pool/value_pool once: zeros [num_blocks, block_size, H_kv, head_dim]; they are shared "
        "by the batch.",
        "Before each step: make sure block_table[b] maps enough physical blocks for past_lengths[b] + input length "
        "(ceil(len / block_size) entries; a block belongs to one sequence); new_lengths[b] = real new tokens of row b "
        "(rows may be right-padded).",
        "Run the step (prefill.onnx for the first one, with past_lengths implicitly 0); feed present.{i}.*_pool back "
        "as past.{i}.*_pool and add new_lengths to past_lengths.",
    ],
}


def cache_plan(model: EffxModel) -> CachePlan | None:
    spec = model.spec
    layout = spec.kv_cache.layout
    if spec.model.family != "decoder" or layout == "none":
        return None
    cache = model.empty_cache(1)
    dtype = _DTYPE[str(cache.layers[0][next(iter(cache.layers[0]))].dtype)]
    tensors = []
    for i, layer in enumerate(cache.layers):
        for name, t in layer.items():
            shape: list[int | str] = list(t.shape)
            if layout != "paged":
                shape[0] = "batch"
            tensors.append(CacheTensor(input=f"past.{i}.{name}", output=f"present.{i}.{name}", dtype=dtype, shape=shape))
    controls = [ControlInput(name="past_lengths", dtype="int64", shape=["batch"],
                             meaning="tokens already in the cache per sequence (decode graph)")]
    if layout == "paged":
        max_blocks = int(cache.block_table.shape[1])
        controls += [
            ControlInput(name="new_lengths", dtype="int64", shape=["batch"], meaning="real new tokens per row"),
            ControlInput(name="block_table", dtype="int64", shape=["batch", max_blocks],
                         meaning="physical block of each logical block of each sequence"),
        ]
    params = spec.kv_cache.model_dump(exclude={"layout", "dtype"})
    if layout == "multiscale":
        params["layer_factors"] = list(cache.factors)
    if layout == "ring":
        params["window"] = cache.window
    return CachePlan(layout=layout, dtype=dtype, tensors=tensors, controls=controls, grows=CACHES[layout].grows,
                     params=params, protocol=_PROTOCOL[layout])
