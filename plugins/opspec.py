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

    @property
    def qualified_name(self) -> str:
        return f"{DOMAIN}::{self.name}"


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in OPS:
        raise RuntimeError(f"op {spec.name} registered twice")
    OPS[spec.name] = spec
    return spec
