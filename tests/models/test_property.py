"""Random valid specs build, run forward and decode without error (hypothesis)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effx.core.registry import ATTENTION, compatible_layouts
from effx.core.spec import RunSpec
from effx.models import build_model


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(sorted(ATTENTION)))
    family = draw(st.sampled_from(ATTENTION[kind].families))
    layout = draw(st.sampled_from(compatible_layouts(kind, family)))
    n_heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 12]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0])) if family == "decoder" else None
    max_seq_len = draw(st.integers(8, 24))
    attention = {"kind": kind}
    if kind == "linformer":
        attention |= {"k": draw(st.integers(1, max_seq_len)),
                      "sharing": draw(st.sampled_from(["none", "headwise", "kv", "layerwise"]))}
    elif kind == "local":
        attention["window"] = draw(st.integers(1, 12))
    elif kind == "block_sparse":
        attention |= {"block_size": draw(st.integers(1, 6)), "local_blocks": draw(st.integers(1, 3)),
                      "global_blocks": draw(st.integers(0, 2)), "stride_blocks": draw(st.integers(0, 3))}
    elif kind == "linear":
        attention |= {"feature_map": draw(st.sampled_from(["elu", "favor"])), "nb_features": draw(st.integers(1, 12))}
    elif kind == "hierarchical":
        attention["factors"] = draw(st.sampled_from([[1], [1, 2], [1, 3], [1, 2, 4]]))
    n_layers = draw(st.integers(1, 2)) if kind != "hierarchical" else 2 * len(attention["factors"]) - 1
    cache = {"layout": layout}
    if layout == "paged":
        bs = draw(st.integers(1, 8))
        cache |= {"block_size": bs, "num_blocks": -(-max_seq_len // bs) * 3}  # room for batch 3
    model = {"family": family, "n_heads": n_heads, "d_model": n_heads * head_dim, "n_kv_heads": kv,
             "n_layers": n_layers, "d_ff": 16, "max_seq_len": max_seq_len, "vocab_size": 50,
             "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
             "positional": draw(st.sampled_from([None, "learned", "rope"])), "seed": draw(st.integers(0, 5)),
             "norm_position": draw(st.sampled_from(["pre", "post"])),
             "activation": draw(st.sampled_from(["gelu_tanh", "gelu", "swiglu"])), "bias": draw(st.booleans()),
             "embed_norm": draw(st.booleans()), "final_norm": draw(st.booleans()),
             "rope_scaling": draw(st.sampled_from([None, {"type": "linear", "factor": 2.0},
                                                   {"type": "llama3", "factor": 8.0,
                                                    "original_max_position_embeddings": 16}]))}
    return RunSpec.parse({"model": model, "attention": attention, "kv_cache": cache})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), batch=st.integers(1, 3), data=st.data())
def test_random_valid_specs_forward_and_decode(spec, batch, data):
    model = build_model(spec)
    n = data.draw(st.integers(2, spec.model.max_seq_len))
    ids = torch.randint(0, spec.model.vocab_size, (batch, n))
    out = model(ids)
    width = spec.model.vocab_size if spec.model.family == "decoder" else spec.model.d_model
    assert out.shape == (batch, n, width) and torch.isfinite(out).all()
    if spec.model.family == "decoder" and spec.kv_cache.layout != "none":
        split = data.draw(st.integers(1, n - 1))
        cache = model.empty_cache(batch)
        first, cache = model.step(ids[:, :split], cache)
        rest, cache = model.step(ids[:, split:], cache)
        assert (torch.cat([first, rest], 1) - out).abs().max().item() <= 1e-4
