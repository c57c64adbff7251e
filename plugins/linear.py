"""effx::NormalizedLinearAttention and effx::NormalizedLinearAttentionState: kernelised attention with a feature
map phi, normalised by phi(Q) sum phi(K) (ONNX's own LinearAttention, opset 27, has no normaliser: hence the name,
which also keeps runtimes that check a node against the standard op of the same name from confusing the two).

Non-causal (Katharopoulos et al. 2020, eq. 5):  V'_i = phi(Q_i)^T (sum_j phi(K_j) V_j^T) / (phi(Q_i)^T sum_j phi(K_j) + eps)
Causal, from a recurrent state (eq. 16-20):     S_i = S_{i-1} + phi(K_i) V_i^T,  z_i = z_{i-1} + phi(K_i)
                                                V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T z_i + eps)
The state op starts from (S_0, z_0): zeros for a prompt, the cached state for decode steps.

Feature maps: `elu` is elu(x) + 1; `favor` is FAVOR+ (Choromanski et al. 2020, Lemma 1) with positive
orthogonal random features omega (m x d, seeded, fixed after init):
    phi(x) = exp(omega x' - |x'|^2 / 2 - c) / sqrt(m),  x' = x d^(-1/4)
c is the per-row max for queries (it scales numerator and denominator alike, so it cancels) and 0 for
keys, because a key stabiliser over all positions would depend on future tokens and break streaming.
`identity` takes q and k as features already (m = their last dim, which may differ from v's): learned
feature maps (Hedgehog) run in the model, before the op.

`effx::linear_attention_recurrence` is ONNX's own LinearAttention (opset 27, update_rule "linear") exactly:
packed (B, T, H*d) inputs, o_t = scale q_t^T S_t, S_t = S_{t-1} + k_t v_t^T, no normaliser. Causal linear
attention takes it with the features computed around it and the normaliser as an extra value column
(v' = [v, 1]: the last output column is phi(q)^T z), where the graph's opset has it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from effx.core.flavours import LINEAR_ATTENTION_OPSET
from effx.plugins.common import expand_kv
from effx.plugins.onnx_body import node_op, staged_op
from effx.plugins.opspec import OpSpec, register_op


def favor_projection(nb_features: int, dim: int, generator: torch.Generator) -> Tensor:
    """Orthogonal random features (m, d): stacked QR blocks, rows rescaled to chi-distributed norms."""
    blocks = []
    for _ in range(math.ceil(nb_features / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.T)
    w = torch.cat(blocks)[:nb_features]  # (m, d), orthonormal rows within a block
    norms = torch.randn(nb_features, dim, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


def feature_map(x: Tensor, omega: Tensor | None, kind: str, is_query: bool) -> Tensor:
    if kind == "identity":
        return x  # features computed before the op (learned maps)
    if kind == "elu":
        return F.elu(x) + 1.0  # (..., D)
    assert omega is not None, "favor needs its projection omega"
    x = x * x.shape[-1] ** -0.25
    logits = x @ omega.transpose(0, 1) - (x * x).sum(-1, keepdim=True) / 2  # (..., m)
    if is_query:
        logits = logits - logits.amax(-1, keepdim=True)
    return torch.exp(logits) / math.sqrt(omega.shape[0])


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, k_valid: Tensor | None, omega: Tensor | None, feature_map_kind: str, eps: float
) -> Tensor:
    # q (B,H,N,D), k/v (B,H_kv,N,D), k_valid (B,N) 1 = real token, 0 = padding
    phi_q = feature_map(q, omega, feature_map_kind, is_query=True)  # (B,H,N,m)
    phi_k = feature_map(k, omega, feature_map_kind, is_query=False)  # (B,H_kv,N,m)
    if k_valid is not None:
        phi_k = phi_k * k_valid[:, None, :, None].to(phi_k.dtype)  # padding leaves both sums
    n_rep = q.shape[1] // k.shape[1]
    kv = expand_kv(phi_k.transpose(-1, -2) @ v, n_rep)  # (B,H,m,D)
    z = expand_kv(phi_k.sum(-2, keepdim=True), n_rep)  # (B,H,1,m)
    return (phi_q @ kv) / ((phi_q * z).sum(-1, keepdim=True) + eps)  # (B,H,N,D)


def linear_attention_state_reference(
    q: Tensor, k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, omega: Tensor | None, feature_map_kind: str, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # q (B,H,N,D), k/v (B,H_kv,N,D), s0 (B,H_kv,m,D), z0 (B,H_kv,m); prefix sums over the N new tokens
    phi_q = feature_map(q, omega, feature_map_kind, is_query=True)  # (B,H,N,m)
    phi_k = feature_map(k, omega, feature_map_kind, is_query=False)  # (B,H_kv,N,m)
    s = s0[:, :, None] + (phi_k[..., :, None] * v[..., None, :]).cumsum(2)  # (B,H_kv,N,m,D): S_i
    z = z0[:, :, None] + phi_k.cumsum(2)  # (B,H_kv,N,m): z_i
    n_rep = q.shape[1] // k.shape[1]
    num = (phi_q[..., None, :] @ expand_kv(s, n_rep)).squeeze(-2)  # (B,H,N,D)
    den = (phi_q * expand_kv(z, n_rep)).sum(-1, keepdim=True) + eps  # (B,H,N,1)
    return num / den, s[:, :, -1], z[:, :, -1]


def linear_attention_quadratic(
    q: Tensor, k: Tensor, v: Tensor, omega: Tensor | None, feature_map_kind: str, eps: float
) -> Tensor:
    """Causal linear attention in its quadratic masked form: the check for the prefix-sum form."""
    phi_q = feature_map(q, omega, feature_map_kind, is_query=True)
    phi_k = expand_kv(feature_map(k, omega, feature_map_kind, is_query=False), q.shape[1] // k.shape[1])
    a = (phi_q @ phi_k.transpose(-1, -2)).tril()  # (B,H,N,N), j <= i
    return (a @ expand_kv(v, q.shape[1] // v.shape[1])) / (a.sum(-1, keepdim=True) + eps)


@torch.library.custom_op("effx::linear_attention", mutates_args=())
def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, k_valid: Tensor | None, omega: Tensor | None, feature_map_kind: str, eps: float
) -> Tensor:
    return linear_attention_reference(q, k, v, k_valid, omega, feature_map_kind, eps)


def _like_values(q: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])  # (B,H,N,D_v): identity features may be wider than D_v


@linear_attention.register_fake
def _(q, k, v, k_valid, omega, feature_map_kind, eps):
    return _like_values(q, v)


@torch.library.custom_op("effx::linear_attention_state", mutates_args=())
def linear_attention_state(
    q: Tensor, k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, omega: Tensor | None, feature_map_kind: str, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return linear_attention_state_reference(q, k, v, s0, z0, omega, feature_map_kind, eps)


@linear_attention_state.register_fake
def _(q, k, v, s0, z0, omega, feature_map_kind, eps):
    return _like_values(q, v), torch.empty_like(s0), torch.empty_like(z0)


# -- ONNX ---------------------------------------------------------------------------------------------
# The feature map changes the body's structure, so it is fixed when the function is built (one model uses
# one feature map); the node keeps it as an attribute for plugins.
def _body(b, static):
    kind = static["feature_map"]
    phi_q = b.feature_map("q", kind, is_query=True)  # (B,H,N,m)
    mask = b.op("Unsqueeze", "k_valid", b.ints(1, 3))  # (B,1,N,1)
    phi_k = b.op("Mul", b.feature_map("k", kind, is_query=False), mask)  # (B,H_kv,N,m)
    kv = b.expand_kv(b.op("MatMul", b.op("Transpose", phi_k, perm=[0, 1, 3, 2]), "v"), "q")  # (B,H,m,D)
    z = b.expand_kv(b.op("ReduceSum", phi_k, b.ints(2), keepdims=1), "q")  # (B,H,1,m)
    den = b.op("Add", b.op("ReduceSum", b.op("Mul", phi_q, z), b.ints(-1), keepdims=1), b.attr_float_like("eps", "q"))
    b.output(b.op("Div", b.op("MatMul", phi_q, kv), den), "y")
    return ["q", "k", "v", "k_valid", "omega"], ["y"]


def _state_body(b, static):
    kind = static["feature_map"]
    phi_q = b.feature_map("q", kind, is_query=True)  # (B,H,N,m)
    phi_k = b.feature_map("k", kind, is_query=False)  # (B,H_kv,N,m)
    outer = b.op("Mul", b.op("Unsqueeze", phi_k, b.ints(-1)), b.op("Unsqueeze", "v", b.ints(-2)))  # (B,H_kv,N,m,D)
    s = b.op("Add", b.op("Unsqueeze", "s0", b.ints(2)), b.op("CumSum", outer, b.scalar(2)))  # S_i
    z = b.op("Add", b.op("Unsqueeze", "z0", b.ints(2)), b.op("CumSum", phi_k, b.scalar(2)))  # z_i (B,H_kv,N,m)
    # expand the per-KV-head prefix states to the query heads (flatten m x D to reuse the 4-D expansion)
    flat = b.op("Reshape", s, b.op("Concat", b.op("Shape", s, end=3), b.ints(-1), axis=0))
    s_q = b.op("Reshape", b.expand_kv(flat, "q"),
               b.op("Concat", b.op("Shape", "q", end=3), b.op("Shape", s, start=3), axis=0))  # (B,H,N,m,D)
    num = b.op("Squeeze", b.op("MatMul", b.op("Unsqueeze", phi_q, b.ints(-2)), s_q), b.ints(-2))  # (B,H,N,D)
    den = b.op("Add", b.op("ReduceSum", b.op("Mul", phi_q, b.expand_kv(z, "q")), b.ints(-1), keepdims=1),
               b.attr_float_like("eps", "q"))
    b.output(b.op("Div", num, den), "y")
    last = b.ints(-1)
    big = b.ints(2**62)
    b.output(b.op("Squeeze", b.op("Slice", s, last, big, b.ints(2)), b.ints(2)), "s")
    b.output(b.op("Squeeze", b.op("Slice", z, last, big, b.ints(2)), b.ints(2)), "z")
    return ["q", "k", "v", "s0", "z0", "omega"], ["y", "s", "z"]


def _translation(q, k, v, k_valid, omega, feature_map_kind: str, eps: float):
    return node_op("NormalizedLinearAttention")(q, k, v, k_valid, omega, feature_map=feature_map_kind, eps=eps)


def _state_translation(q, k, v, s0, z0, omega, feature_map_kind: str, eps: float):
    return node_op("NormalizedLinearAttentionState")(q, k, v, s0, z0, omega, feature_map=feature_map_kind, eps=eps)


SPEC = register_op(
    OpSpec(
        name="NormalizedLinearAttention",
        torch_op=linear_attention,
        inputs=("q", "k", "v", "k_valid?", "omega?"),
        outputs=("y",),
        attributes={"feature_map": str, "eps": float},
        reference=linear_attention_reference,
        summary="non-causal linear attention phi(Q)(phi(K)^T V) / phi(Q) sum phi(K)",
        build_body=_body,
        translation=_translation,
        structural=("feature_map",),
        cuda_kernel=("linear", "linear_attention"),
    )
)
STATE_SPEC = register_op(
    OpSpec(
        name="NormalizedLinearAttentionState",
        torch_op=linear_attention_state,
        inputs=("q", "k", "v", "s0", "z0", "omega?"),
        outputs=("y", "s", "z"),
        attributes={"feature_map": str, "eps": float},
        reference=linear_attention_state_reference,
        summary="causal linear attention from a recurrent state (prefix sums); returns the new state",
        build_body=_state_body,
        translation=_state_translation,
        structural=("feature_map",),
        cuda_kernel=("linear", "linear_attention_state"),
    )
)


# -- ONNX LinearAttention (opset 27) ---------------------------------------------------------------------


def linear_attention_recurrence_reference(
    query: Tensor, key: Tensor, value: Tensor, past_state: Tensor, q_num_heads: int, kv_num_heads: int, scale: float
) -> tuple[Tensor, Tensor]:
    """ONNX LinearAttention, update_rule "linear": S_t = S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t (no normaliser;
    scale is used as given, the caller resolves ONNX's 0 = 1/sqrt(d_k))."""
    b, t, _ = query.shape
    q = query.view(b, t, q_num_heads, -1).transpose(1, 2)  # (B,H,T,d_k)
    k = key.view(b, t, kv_num_heads, -1).transpose(1, 2)  # (B,H_kv,T,d_k)
    v = value.view(b, t, kv_num_heads, -1).transpose(1, 2)  # (B,H_kv,T,d_v)
    if t == 0:
        return query.new_zeros(b, 0, q_num_heads * v.shape[-1]), past_state.clone()
    s = past_state[:, :, None] + (k[..., :, None] * v[..., None, :]).cumsum(2)  # (B,H_kv,T,d_k,d_v): S_t
    y = scale * (q[..., None, :] @ expand_kv(s, q_num_heads // kv_num_heads)).squeeze(-2)  # (B,H,T,d_v)
    return y.transpose(1, 2).reshape(b, t, -1), s[:, :, -1]


@torch.library.custom_op("effx::linear_attention_recurrence", mutates_args=())
def linear_attention_recurrence(
    query: Tensor, key: Tensor, value: Tensor, past_state: Tensor, q_num_heads: int, kv_num_heads: int, scale: float
) -> tuple[Tensor, Tensor]:
    return linear_attention_recurrence_reference(query, key, value, past_state, q_num_heads, kv_num_heads, scale)


@linear_attention_recurrence.register_fake
def _(query, key, value, past_state, q_num_heads, kv_num_heads, scale):
    d_v = past_state.shape[-1]
    return query.new_empty(query.shape[0], query.shape[1], q_num_heads * d_v), torch.empty_like(past_state)


def _recurrence_translation(query, key, value, past_state, q_num_heads: int, kv_num_heads: int, scale: float):
    # scale is always set: ONNX reads 0 (its default) as 1/sqrt(d_k)
    return staged_op("LinearAttention", LINEAR_ATTENTION_OPSET)(
        query, key, value, past_state, q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, update_rule="linear",
        scale=scale)


def normalized_state_attention_standard(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """effx::NormalizedLinearAttentionState from features, through ONNX LinearAttention: the normaliser rides as an
    extra value column (v' = [v, 1], so column D of the output is phi(q)^T z_t) and the state as [S, z].
    phi_q (B,H,N,m), phi_k (B,H_kv,N,m), v (B,H_kv,N,D), s0 (B,H_kv,m,D), z0 (B,H_kv,m) -> y, S, z."""
    b, h, n, _ = phi_q.shape
    h_kv, d = v.shape[1], v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B,H_kv,N,D+1)
    state = torch.cat([s0, z0[..., None]], -1)  # (B,H_kv,m,D+1)

    def pack(x: Tensor) -> Tensor:  # (B,H,N,d) -> (B,N,H*d)
        return x.transpose(1, 2).reshape(b, n, -1)

    y, state = linear_attention_recurrence(pack(phi_q), pack(phi_k), pack(v1), state, h, h_kv, 1.0)
    y = y.view(b, n, h, d + 1).transpose(1, 2)  # (B,H,N,D+1)
    return y[..., :d] / (y[..., d:] + eps), state[..., :d], state[..., d]


TRANSLATIONS = {linear_attention_recurrence._opoverload: _recurrence_translation}  # standard-ONNX lowerings
