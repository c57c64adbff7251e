"""One spec per custom attention op; everything about an op hangs off its spec.

An OpSpec is complete when it is constructed (frozen): the torch custom op (CPU = the readable reference
math the models call), the ONNX node (domain `effx`, version 1, typed attributes) and its model-local
function body of standard ONNX, and the fused Triton kernel that serves CUDA tensors. The TensorRT plugin
of an op is described from its spec in effx.plugins.trt. No op is described twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DOMAIN = "effx"
DOMAIN_VERSION = 1

# A masked attention score, everywhere: the torch reference, the ONNX bodies and the Triton kernels.
# -65504 is fp16's lowest finite value: the weight of a masked key is exactly 0 in fp32, fp16 and bf16
# (exp(-65504 - m) underflows once a row has one real score), a row with no allowed key stays finite
# (uniform weights: the mean of the values), and fp16-converted graphs do not overflow to -inf.
MASK_VALUE = -65504.0


@dataclass(frozen=True)
class OpSpec:
    name: str  # ONNX op_type and TensorRT plugin name, e.g. "LinformerAttention"
    torch_op: Any  # the torch.library custom op (callable; .default is the OpOverload)
    inputs: tuple[str, ...]  # tensor inputs in order; optional ones end with "?"
    outputs: tuple[str, ...]
    attributes: dict[str, type]  # non-tensor arguments in order, with their python type (int, float, str, bool)
    reference: Callable[..., Any]  # the readable math (same signature as the torch op)
    summary: str
    # ONNX side: build_body(body, static) -> (input names, output names) in standard ONNX; `static` holds the
    # attribute values that shape the body (`structural`), equal on every node of the op in one model
    build_body: Callable[..., tuple[list[str], list[str]]]
    translation: Callable[..., Any]  # torch.onnx custom translation emitting the bare node
    structural: tuple[str, ...] = ()
    # the fused kernel for CUDA tensors: (family module in effx.plugins.kernels, launcher function); None:
    # CUDA tensors run the reference (e.g. hourglass: pooling + standard attention, which SDPA covers)
    cuda_kernel: tuple[str, str] | None = None
    # training through the op (`effx adapt` backpropagates through the student's attention): "reference" recomputes
    # the reference math under autograd in the backward (the kernels are inference-only and define none); None:
    # the op has no gradient (autograd refuses to backpropagate through it)
    backward: str | None = "reference"

    @property
    def qualified_name(self) -> str:
        return f"{DOMAIN}::{self.name}"


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in OPS:
        raise RuntimeError(f"op {spec.name} registered twice")
    if spec.backward not in (None, "reference"):
        raise ValueError(f"op {spec.name}: backward={spec.backward!r}; use 'reference' or None")
    OPS[spec.name] = spec
    return spec


# -- gradients ---------------------------------------------------------------------------------------------
_DIFFERENTIABLE: set[str] = set()


def differentiable_ops() -> list[str]:
    """Register the backward each op's spec declares (`backward="reference"`: recompute the op's reference math,
    the function its CPU implementation runs, under autograd). Inference never needs gradients, so the ops are
    registered without; training (effx adapt) calls this first. Idempotent; returns the differentiable ops."""
    for spec in OPS.values():
        if spec.backward is None or spec.name in _DIFFERENTIABLE:
            continue
        torch.library.register_autograd(spec.torch_op, _recompute_backward(spec.reference), setup_context=_keep_inputs)
        _DIFFERENTIABLE.add(spec.name)
    return sorted(_DIFFERENTIABLE)


def _keep_inputs(ctx, inputs, output) -> None:
    ctx.op_inputs = inputs  # tensors and attributes as called; the backward recomputes from them


def _recompute_backward(reference: Callable[..., Any]):
    def backward(ctx, *grads):
        args = [a.detach().requires_grad_(True) if isinstance(a, Tensor) and need and a.is_floating_point() else a
                for a, need in zip(ctx.op_inputs, ctx.needs_input_grad, strict=False)]
        args += list(ctx.op_inputs[len(args):])
        with torch.enable_grad():
            out = reference(*args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs and wrt else [None] * len(wrt))
        return tuple(next(got) if isinstance(a, Tensor) and a.requires_grad else None for a in args)

    return backward
