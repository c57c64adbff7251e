"""effx::LinformerAttention (Wang et al. 2020, eq. 7): head_i = softmax(Q_i (E_i K_i)^T / sqrt(d)) (F_i V_i).

E and F are k x n projections along the sequence axis of the already-projected keys and values, so the
score matrix is n x k instead of n x n. The caller slices E, F to the first n columns for inputs shorter
than max_seq_len, and zeroes padded key/value rows so padding adds nothing to the projected keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.common import softmax_attention
from effx.plugins.onnx_body import node_op
from effx.plugins.opspec import OpSpec, register_op


def linformer_attention_reference(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, scale: float) -> Tensor:
    # q, k, v (B,H,N,D); e, f (H or 1, k, N): one projection per head, or one shared by all heads
    k_proj = e @ k  # (B,H,k,D)
    v_proj = f @ v  # (B,H,k,D)
    return softmax_attention(q, k_proj, v_proj, None, scale)  # (B,H,N,D), scores (B,H,N,k)


@torch.library.custom_op("effx::linformer_attention", mutates_args=())
def linformer_attention(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, scale: float) -> Tensor:
    return linformer_attention_reference(q, k, v, e, f, scale)


@linformer_attention.register_fake
def _(q, k, v, e, f, scale):
    torch._check(e.shape[-1] == k.shape[-2], lambda: "Linformer E must be sliced to the sequence length")
    return torch.empty_like(q)


# -- ONNX ---------------------------------------------------------------------------------------------
def _body(b, static):
    k_proj = b.op("MatMul", "e", "k")  # (H|1,k,N) @ (B,H,N,D) -> (B,H,k,D)
    v_proj = b.op("MatMul", "f", "v")
    b.output(b.softmax_attention("q", k_proj, v_proj, None), "y")
    return ["q", "k", "v", "e", "f"], ["y"]


def _translation(q, k, v, e, f, scale: float):
    return node_op("LinformerAttention")(q, k, v, e, f, scale=scale)


SPEC = register_op(
    OpSpec(
        name="LinformerAttention",
        torch_op=linformer_attention,
        inputs=("q", "k", "v", "e", "f"),
        outputs=("y",),
        attributes={"scale": float},
        reference=linformer_attention_reference,
        summary="softmax(Q (E K)^T * scale) (F V) with sequence projections E, F",
        build_body=_body,
        translation=_translation,
        cuda_kernel=("linformer", "linformer_attention"),
    )
)
