"""One spec per custom attention op; everything about an op hangs off its spec.

From an OpSpec follow: the torch custom op (CPU = the readable reference math the models call), the ONNX
node (domain `effx`, version 1, typed attributes) and its model-local function body of standard ONNX
(effx.exporter), the fused Triton kernel(s) and the TensorRT plugin registration (effx.plugins.kernels,
effx.plugins.tensorrt). No op is described twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DOMAIN = "effx"
DOMAIN_VERSION = 1


@dataclass
class OpSpec:
    name: str  # ONNX op_type and TensorRT plugin name, e.g. "LinformerAttention"
    torch_op: Any  # the torch.library custom op (callable; .default is the OpOverload)
    inputs: tuple[str, ...]  # tensor inputs in order ("" suffix-free names); optional ones end with "?"
    outputs: tuple[str, ...]
    attributes: dict[str, type]  # non-tensor arguments in order, with their python type (int, float, str, bool)
    reference: Callable[..., Any]  # the readable math (same signature as the torch op)
    summary: str
    # ONNX side: build_body(body, static) -> (input names, output names) in standard ONNX; `static` holds the
    # attribute values that shape the body (`structural`), equal on every node of the op in one model
    build_body: Callable[..., tuple[list[str], list[str]]] | None = None
    structural: tuple[str, ...] = ()
    translation: Callable[..., Any] | None = None  # torch.onnx custom translation emitting the bare node
    kernels: dict[str, Callable[..., Any]] = field(default_factory=dict)  # fused kernels by device kind

    @property
    def qualified_name(self) -> str:
        return f"{DOMAIN}::{self.name}"


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    if spec.name in OPS:
        raise RuntimeError(f"op {spec.name} registered twice")
    OPS[spec.name] = spec
    return spec
