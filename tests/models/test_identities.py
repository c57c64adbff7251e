"""Math identities between the attention kinds (fp32, <= 1e-5)."""

import pytest
import torch

from effx.models import build_model
from effx.plugins.common import softmax_attention
from effx.plugins.linear import favor_projection, linear_attention_quadratic, linear_attention_state
from effx.plugins.linformer import linformer_attention
from tests.helpers import decoder_spec, encoder_spec

TOL = 1e-5


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv", "layerwise"])
def test_linformer_identity_projection_equals_full(sharing, tokens):
    n = 24
    full = build_model(encoder_spec("full", max_seq_len=n))
    lin = build_model(encoder_spec("linformer", {"k": n, "sharing": sharing}, max_seq_len=n))
    missing = lin.load_state_dict(full.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith((".e", ".f", "linformer_e")) for k in missing)
    eye = torch.eye(n)[None]
    for name, p in lin.named_parameters():
        if name.endswith((".e", ".f", "linformer_e")):
            p.copy_(eye.expand_as(p))
    ids = tokens(2, n)
    assert _max_err(lin(ids), full(ids)) <= TOL


def test_linformer_op_identity_per_head_and_shorter_input():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g) for _ in range(3))
    eye = torch.eye(10).expand(4, 10, 10)
    ref = softmax_attention(q, k, v, None, 8**-0.5)
    assert _max_err(linformer_attention(q, k, v, eye, eye, 8**-0.5), ref) <= TOL


def test_linformer_rejects_input_longer_than_max_seq_len(tokens):
    from effx.core.errors import EffxError

    model = build_model(encoder_spec("linformer", {"k": 4}, max_seq_len=16))
    with pytest.raises(EffxError, match="max_seq_len"):
        model(tokens(1, 17))


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("kind,params", [("local", {"window": 64}), ("block_sparse", {"block_size": 4, "local_blocks": 16}),
                                         ("hierarchical", {"factors": [1]})])
def test_kind_reduces_to_full(family, kind, params, tokens):
    make = encoder_spec if family == "encoder" else (lambda k, a=None, **m: decoder_spec(k, "none", a, **m))
    full = build_model(make("full", {}))
    other = build_model(make(kind, params))
    other.load_state_dict(full.state_dict(), strict=True)
    ids = tokens(2, 40)
    mask = None
    if family == "encoder":
        mask = torch.ones(2, 40)
        mask[1, 31:] = 0  # a padded row: padding must be ignored the same way
    assert _max_err(other(ids, mask), full(ids, mask)) <= TOL


def test_local_window_smaller_than_n_differs_from_full(tokens):
    # the identity above must not hold by accident: a real window changes the output
    full = build_model(encoder_spec("full"))
    local = build_model(encoder_spec("local", {"window": 3}))
    local.load_state_dict(full.state_dict())
    ids = tokens(1, 20)
    assert _max_err(local(ids), full(ids)) > 1e-3


@pytest.mark.parametrize("fmap", ["elu", "favor"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_causal_linear_prefix_sums_equal_quadratic_form(fmap, heads):
    g = torch.Generator().manual_seed(0)
    hq, hkv = heads
    q = torch.randn(2, hq, 13, 8, generator=g)
    k, v = torch.randn(2, hkv, 13, 8, generator=g), torch.randn(2, hkv, 13, 8, generator=g)
    omega = favor_projection(12, 8, g) if fmap == "favor" else None
    m = 12 if fmap == "favor" else 8
    y, s, z = linear_attention_state(q, k, v, torch.zeros(2, hkv, m, 8), torch.zeros(2, hkv, m), omega, fmap, 1e-6)
    assert _max_err(y, linear_attention_quadratic(q, k, v, omega, fmap, 1e-6)) <= TOL


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,block", [(1, 4), (5, 8), (7, 3), (40, 16)])
def test_blocked_local_attention_equals_reference(causal, window, block):
    from effx.plugins.local import local_attention_blocked, local_attention_reference

    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(2, 4, 37, 8, generator=g) for _ in range(3))
    pos = torch.arange(37).expand(2, 37)
    k_pos = pos.clone()
    k_pos[1, 30:] = -1  # padding
    ref = local_attention_reference(q, k, v, pos, k_pos, window, causal, 0.3)
    got = local_attention_blocked(q, k, v, pos, k_pos, window, causal, 0.3, block=block)
    assert (got - ref).abs().max().item() <= 1e-6
