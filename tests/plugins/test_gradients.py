"""Training through the effx ops (`effx adapt`): each OpSpec declares its backward; `differentiable_ops`
registers it, and the gradients equal autograd through the reference math."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effx.plugins import OPS
from effx.plugins.linear import STATE_SPEC, linear_attention_state, linear_attention_state_reference
from effx.plugins.opspec import differentiable_ops, register_op


def test_every_op_declares_a_backward_and_registration_is_idempotent():
    assert all(spec.backward == "reference" for spec in OPS.values())
    first = differentiable_ops()
    assert first == sorted(OPS) and differentiable_ops() == first


def test_an_unknown_backward_is_refused():
    with pytest.raises(ValueError, match="backward='analytic'; use 'reference' or None"):
        register_op(dataclasses.replace(STATE_SPEC, name="NotRegistered", backward="analytic"))
    assert "NotRegistered" not in OPS


@torch.enable_grad()  # tests/conftest.py turns gradients off for the suite
def test_gradients_through_the_state_op_equal_the_reference():
    """Precomputed (Hedgehog) features, wider than the values: what stage 1 backpropagates through."""
    differentiable_ops()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 12, generator=g).softmax(-1), torch.randn(2, 2, 7, 12, generator=g).softmax(-1)
    v = torch.randn(2, 2, 7, 8, generator=g)
    s0, z0 = torch.rand(2, 2, 12, 8, generator=g), torch.rand(2, 2, 12, generator=g)
    grads = []
    for fn in (linear_attention_state, linear_attention_state_reference):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        y, s, z = fn(*leaves, s0, z0, None, "identity", 1e-6)
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + s.sum() + z.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert a is not None and torch.allclose(a, b, atol=1e-6)
