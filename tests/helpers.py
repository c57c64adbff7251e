"""Tiny-config helpers shared by the tests."""

from effx.core.spec import RunSpec

# small but not trivial: 2-3 layers, d_model 64, GQA where decoders allow it
DECODER_CASES = [
    ("full", "contiguous", {}, {}),
    ("full", "paged", {}, {"block_size": 4, "num_blocks": 24}),
    ("local", "contiguous", {"window": 5}, {}),
    ("local", "ring", {"window": 5}, {}),
    ("local", "paged", {"window": 5}, {"block_size": 4, "num_blocks": 24}),
    ("block_sparse", "contiguous", {"block_size": 4, "stride_blocks": 3}, {}),
    ("block_sparse", "paged", {"block_size": 4, "global_blocks": 1}, {"block_size": 4, "num_blocks": 24}),
    ("linear", "state", {"feature_map": "elu"}, {}),
    ("linear", "state", {"feature_map": "favor", "nb_features": 24}, {}),
    ("hierarchical", "multiscale", {"factors": [1, 3]}, {}),
    ("hierarchical", "multiscale", {"factors": [1, 2, 4], "shorten": "linear", "upsample": "linear"}, {}),
]
ENCODER_CASES = [
    ("full", {}),
    ("linformer", {"k": 8, "sharing": "none"}),
    ("linformer", {"k": 8, "sharing": "layerwise"}),
    ("local", {"window": 4}),
    ("block_sparse", {"block_size": 4, "stride_blocks": 2}),
    ("linear", {"feature_map": "elu"}),
    ("linear", {"feature_map": "favor", "nb_features": 16}),
    ("hierarchical", {"factors": [1, 2]}),
]


def case_id(case) -> str:
    """Readable test id: kind[-layout][-param value...]."""
    names = [c for c in case if isinstance(c, str)]
    params = [f"{k}{v}" for c in case if isinstance(c, dict) for k, v in c.items()]
    return "-".join(names + params)


def decoder_spec(kind, layout, attention=None, cache=None, **model) -> RunSpec:
    m = {"family": "decoder", "n_layers": 3, "max_seq_len": 48, "n_heads": 4, "n_kv_heads": 2} | model
    return RunSpec.parse({"model": m, "attention": {"kind": kind} | (attention or {}),
                          "kv_cache": {"layout": layout} | (cache or {})})


def encoder_spec(kind, attention=None, **model) -> RunSpec:
    m = {"family": "encoder", "n_layers": 3, "max_seq_len": 48} | model
    return RunSpec.parse({"model": m, "attention": {"kind": kind} | (attention or {})})


def decode_chunks(model, ids, chunks):
    """Feed `ids` to model.step in chunks of the given sizes; returns (logits of all steps, final cache)."""
    import torch

    cache = model.empty_cache(ids.shape[0])
    outs, start = [], 0
    for size in chunks:
        logits, cache = model.step(ids[:, start:start + size], cache)
        outs.append(logits)
        start += size
    return torch.cat(outs, 1), cache
