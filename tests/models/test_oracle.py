"""effx's models against the test oracle (tests/oracle.py: the papers' definitions, written again from the
weights), on sharp models: attention far from uniform, so a 1% scale error or a wrong mask, window edge,
head mapping or padding rule moves the outputs far beyond fp32 tolerance."""

from __future__ import annotations

import pytest
import torch

from effx.models import build_model
from tests import oracle
from tests.helpers import case_id, decoder_spec, encoder_spec

TOL = 1e-4
ENCODERS = [
    ("full", {}, {}),
    ("linformer", {"k": 8, "sharing": "none"}, {}),
    ("linformer", {"k": 8, "sharing": "headwise"}, {}),
    ("linformer", {"k": 8, "sharing": "kv"}, {}),
    ("linformer", {"k": 8, "sharing": "layerwise"}, {}),
    ("local", {"window": 4}, {}),
    ("local", {"window": 1}, {}),
    ("block_sparse", {"block_size": 4, "stride_blocks": 2}, {}),
    ("block_sparse", {"block_size": 3, "local_blocks": 2, "global_blocks": 0}, {}),
    ("linear", {"feature_map": "elu"}, {}),
    ("linear", {"feature_map": "favor", "nb_features": 16}, {}),
    ("hierarchical", {"factors": [1, 2]}, {"n_layers": 3}),
    ("hierarchical", {"factors": [1, 3]}, {"n_layers": 2}),
    ("full", {}, {"norm_position": "post", "embed_norm": True, "final_norm": False, "activation": "gelu"}),
    ("local", {"window": 3}, {"norm": "rmsnorm", "activation": "swiglu", "bias": False}),
    ("linear", {"feature_map": "hedgehog"}, {}),
    ("linear", {"feature_map": "hedgehog", "hedgehog_dim": 6}, {}),
]
DECODERS = [
    ("full", {}, {}),
    ("full", {}, {"n_kv_heads": 1}),
    ("local", {"window": 5}, {}),
    ("local", {"window": 2}, {"n_kv_heads": 1, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("block_sparse", {"block_size": 4, "stride_blocks": 3}, {}),
    ("block_sparse", {"block_size": 2, "global_blocks": 2, "local_blocks": 2}, {"n_kv_heads": 4}),
    ("linear", {"feature_map": "elu"}, {}),
    ("linear", {"feature_map": "favor", "nb_features": 24}, {}),
    ("hierarchical", {"factors": [1, 3]}, {"n_layers": 3}),
    ("hierarchical", {"factors": [1, 2, 4]}, {"n_layers": 5}),
    ("full", {}, {"positional": "learned", "norm": "rmsnorm", "activation": "swiglu"}),
    ("linear", {"feature_map": "hedgehog", "hedgehog_dim": 6}, {}),
]


def _sharp(spec):
    model = oracle.sharpen(build_model(spec))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # learned feature maps off their identity start: a swapped or misplaced map shows
        for name, p in model.named_parameters():
            if "hedgehog" in name:
                p.add_(torch.randn(p.shape, generator=g))
    return model


def _inputs(vocab: int, batch: int = 3, n: int = 21):
    ids = torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones_like(ids)
    mask[1, n - 6:] = 0  # a padded row
    return ids, mask


@pytest.mark.parametrize("case", ENCODERS, ids=case_id)
def test_encoder_equals_the_oracle(case):
    kind, attention, model_kw = case
    model = _sharp(encoder_spec(kind, attention, **({"n_layers": 2} | model_kw)))
    ids, mask = _inputs(model.spec.model.vocab_size)
    with torch.no_grad():
        got, want = model(ids, mask), oracle.forward(model, ids, mask)
    keep = mask.bool()
    assert (got - want)[keep].abs().max() <= TOL


@pytest.mark.parametrize("case", DECODERS, ids=case_id)
def test_decoder_equals_the_oracle(case):
    kind, attention, model_kw = case
    layout = {"linear": "state", "hierarchical": "multiscale"}.get(kind, "contiguous")
    model = _sharp(decoder_spec(kind, layout, attention, **({"n_layers": 2} | model_kw)))
    ids, _ = _inputs(model.spec.model.vocab_size)  # 21 tokens: 4x the largest window
    with torch.no_grad():
        got, want = model(ids), oracle.forward(model, ids)
    assert (got - want).abs().max() <= TOL * max(1.0, float(want.abs().max()) / 4)


@pytest.mark.parametrize("case", [c for c in ENCODERS[:13] if c[0] != "linear" and c[1].get("window") != 1],
                         ids=case_id)
def test_the_test_models_are_sharp_enough_that_a_1_percent_scale_error_shows(case):
    """Scale sensitivity: the oracle comparison above would catch a 1% error in the attention scale (linear
    attention has no scale; a window of 1 has one key). This is what makes those tests bite."""
    kind, attention, model_kw = case
    model = _sharp(encoder_spec(kind, attention, **({"n_layers": 2} | model_kw)))
    ids, mask = _inputs(model.spec.model.vocab_size)
    assert oracle.attention_entropy_ratio(model, ids) < 0.6  # far from uniform (1.0)
    with torch.no_grad():
        want = oracle.forward(model, ids, mask)
        for block in model.blocks:
            block.attn.scale *= 1.01
        got = model(ids, mask)
    assert (got - want)[mask.bool()].abs().max() > 10 * TOL


MIXED = {
    "local-full-linear": {"model": {"family": "decoder", "n_layers": 3, "n_kv_heads": 2, "max_seq_len": 48},
                          "attention": {"kind": "local", "window": 3}, "kv_cache": {"layout": "contiguous"},
                          "layers": {"pattern": ["local", "full", "linear"]}},
    "gemma-shaped": {"model": {"family": "decoder", "n_layers": 4, "n_kv_heads": 2, "max_seq_len": 48, "d_model": 64,
                               "attention_head_dim": 24, "norm": "gemma_rmsnorm", "norm_position": "sandwich",
                               "activation": "geglu_tanh", "bias": False, "qk_norm": True, "attn_scale": 0.3,
                               "attn_softcap": 1.5, "final_softcap": 2.0, "embed_scale": 8.0, "tie_embeddings": True,
                               "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}},
                     "kv_cache": {"layout": "contiguous"},
                     "layers": {"pattern": ["local", "local", "local", "global"],
                                "types": {"local": {"attention": {"kind": "local", "window": 4},
                                                    "rope": {"theta": 10000.0}},
                                          "global": {"attention": {"kind": "full"}}}}},
    "qwen2-shaped": {"model": {"family": "decoder", "n_layers": 3, "n_kv_heads": 2, "max_seq_len": 48,
                               "norm": "rmsnorm", "activation": "swiglu", "bias": False, "qkv_bias": True},
                     "kv_cache": {"layout": "paged", "block_size": 4, "num_blocks": 40},
                     "layers": {"pattern": ["full", "local", "local"],
                                "types": {"local": {"attention": {"kind": "local", "window": 5}}}}},
}


@pytest.mark.parametrize("name", MIXED)
def test_models_mixing_layers_equal_the_oracle_and_decode_with_the_hybrid_cache(name):
    from effx.core.spec import RunSpec
    from tests.helpers import decode_chunks

    spec = RunSpec.parse(MIXED[name])
    model = _sharp(spec)
    ids, _ = _inputs(model.spec.model.vocab_size)
    with torch.no_grad():
        got, want = model(ids), oracle.forward(model, ids)
        assert (got - want).abs().max() <= TOL * max(1.0, float(want.abs().max()) / 4)
        stepped, cache = decode_chunks(model, ids, [6, 1, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1])
        assert (stepped - got).abs().max() <= TOL
    layouts = [layer.kv_cache.layout for layer in spec.resolved_layers()]
    assert spec.cache_layout == "hybrid" and len(set(layouts)) > 1
    for layout, state in zip(layouts, cache.layers, strict=True):  # ring layers stay window-sized
        if layout == "ring":
            assert state["key"].shape[2] == spec.layer(layouts.index("ring")).attention.window
