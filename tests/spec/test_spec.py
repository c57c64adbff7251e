"""Spec validation: every invalid value or combination is one line naming the field."""

import pytest

from effx.core.errors import CompatibilityError, SpecError
from effx.core.registry import ATTENTION, CACHES, compatible_layouts
from effx.core.spec import RunSpec

INVALID = [
    ({"model": {"d_model": 65}}, "model.d_model"),
    ({"model": {"n_heads": 0}}, "model.n_heads"),
    ({"model": {"family": "decoder", "n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads"),
    ({"model": {"n_kv_heads": 2}}, "model.n_kv_heads"),
    ({"model": {"family": "seq2seq"}}, "model.family"),
    ({"model": {"norm": "batchnorm"}}, "model.norm"),
    ({"model": {"max_seq_len": 1}}, "model.max_seq_len"),
    ({"model": {"vocab": 10}}, "model.vocab"),
    ({"attention": {"kind": "sparse"}}, "attention"),
    ({"attention": {"kind": "linformer", "k": 0}}, "attention.k"),
    ({"attention": {"kind": "linformer", "k": 512}}, "attention.k"),
    ({"attention": {"kind": "linformer", "sharing": "all"}}, "attention.sharing"),
    ({"attention": {"kind": "local", "window": 0}}, "attention.window"),
    ({"attention": {"kind": "block_sparse", "block_size": 0}}, "attention.block_size"),
    ({"attention": {"kind": "linear", "feature_map": "relu"}}, "attention.feature_map"),
    ({"attention": {"kind": "linear", "hedgehog_dim": 8}}, "attention.hedgehog_dim"),
    ({"attention": {"kind": "linear", "feature_map": "hedgehog", "hedgehog_dim": 0}}, "attention.hedgehog_dim"),
    ({"attention": {"kind": "hierarchical", "factors": [2, 4]}}, "attention.factors"),
    ({"attention": {"kind": "hierarchical", "factors": [1, 3, 4]}}, "attention.factors"),
    ({"attention": {"kind": "hierarchical", "factors": [1, 2, 4]}, "model": {"n_layers": 2}}, "model.n_layers"),
    ({"model": {"family": "decoder"}, "attention": {"kind": "linformer"}}, "attention.kind=linformer"),
    ({"kv_cache": {"layout": "contiguous"}}, "kv_cache.layout=contiguous"),
    ({"model": {"family": "decoder"}, "kv_cache": {"layout": "ring"}}, "kv_cache.layout=ring"),
    ({"model": {"family": "decoder"}, "attention": {"kind": "full"}, "kv_cache": {"layout": "state"}},
     "kv_cache.layout=state"),
    ({"model": {"family": "decoder"}, "attention": {"kind": "linear"}, "kv_cache": {"layout": "paged"}},
     "kv_cache.layout=paged"),
    ({"model": {"family": "decoder"}, "attention": {"kind": "local", "window": 8},
      "kv_cache": {"layout": "ring", "window": 4}}, "kv_cache.window"),
    ({"model": {"family": "decoder"}, "kv_cache": {"layout": "paged", "num_blocks": 2}}, "kv_cache.num_blocks"),
    ({"kv_cache": {"layout": "lru"}}, "kv_cache"),
]


@pytest.mark.parametrize("data,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_spec_is_one_line_naming_the_field(data, field):
    with pytest.raises(SpecError) as err:
        RunSpec.parse(data)
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_compatibility_errors_say_what_to_choose():
    with pytest.raises(CompatibilityError, match="use it with model.family = encoder"):
        RunSpec.parse({"model": {"family": "decoder"}, "attention": {"kind": "linformer"}})
    with pytest.raises(CompatibilityError, match="use attention.kind = local"):
        RunSpec.parse({"model": {"family": "decoder"}, "kv_cache": {"layout": "ring"}})
    with pytest.raises(CompatibilityError, match="needs linear attention"):
        RunSpec.parse({"model": {"family": "decoder"}, "kv_cache": {"layout": "state"}})


def test_every_declared_compatible_pair_validates():
    for kind in ATTENTION:
        for family in ("encoder", "decoder"):
            for layout in compatible_layouts(kind, family):
                attention = {"kind": kind} | ({"factors": [1, 2]} if kind == "hierarchical" else {})
                RunSpec.parse({"model": {"family": family, "n_layers": 3}, "attention": attention,
                               "kv_cache": {"layout": layout}})
    assert set(CACHES) == {"none", "contiguous", "paged", "ring", "state", "multiscale"}


def test_toml_round_trip_and_overrides(tmp_path):
    from effx.core.spec_toml import spec_to_commented_toml

    spec = RunSpec.parse({"model": {"family": "decoder", "n_kv_heads": 2},
                          "attention": {"kind": "local", "window": 8}, "kv_cache": {"layout": "ring"}})
    path = tmp_path / "s.toml"
    path.write_text(spec_to_commented_toml(spec))
    assert RunSpec.from_toml(path) == spec
    changed = spec.with_overrides({"attention.kind": "full", "kv_cache.layout": "paged", "kv_cache.block_size": 8})
    assert changed.attention.kind == "full" and changed.kv_cache.block_size == 8
    same_kind = spec.with_overrides({"attention.window": 16})
    assert same_kind.attention.window == 16 and same_kind.kv_cache.layout == "ring"


def test_unreadable_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nd_model = 3")
    with pytest.raises(SpecError) as err:
        RunSpec.from_toml(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
