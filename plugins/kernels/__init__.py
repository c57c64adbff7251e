"""effx.plugins.kernels: fused Triton kernels for the effx ops, and their CUDA registration.

Importing this package never imports triton. `install()` (called by effx.plugins) registers a CUDA
implementation for every op whose spec names a kernel (`OpSpec.cuda_kernel`); that implementation imports
the kernel module, and with it triton, on its first call, and falls back to the op's reference for inputs
the kernels do not take.
On CPU tensors the torch ops keep running their reference; the kernels run on CPU only inside the Triton
interpreter (tests), by calling the functions of the family modules directly.

Kernel families: `attention` (LocalAttention, BlockSparseAttention, PagedAttention, and the dense
attention Linformer uses), `linformer`, `linear` (LinearAttention, LinearAttentionState).
The hourglass (attention.kind = hierarchical) needs no kernel of its own: its layers are standard softmax
attention over a shortened sequence, which PyTorch's SDPA and TensorRT's fused attention already cover.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from effx.plugins.kernels import attention, linear, linformer
from effx.plugins.kernels._common import triton_available
from effx.plugins.opspec import OPS, OpSpec

MAX_HEAD_DIM = 256  # one head row is one register tile; larger heads take the reference
FAMILIES = {"attention": attention, "linear": linear, "linformer": linformer}  # plain Python until loaded
CUDA_IMPLS: dict[str, Callable[..., Any]] = {}  # op name -> the implementation registered for CUDA tensors


def _supported(op_name: str, args: tuple) -> str | None:
    """Why the kernels cannot take these arguments (None: they can)."""
    q = args[0]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if q.dim() != 4 or q.shape[-1] > MAX_HEAD_DIM:
        return f"q of shape {tuple(q.shape)} (head dim at most {MAX_HEAD_DIM})"
    # operands that meet in one tl.dot must share the dtype (the others are read as fp32 or int)
    same = args[:5] if op_name == "LinformerAttention" else args[:3]
    if any(t.dtype != q.dtype for t in same):
        return "mixed float dtypes"
    return None


def with_kernels() -> dict[str, OpSpec]:
    """The ops that have a fused kernel, by name."""
    return {name: spec for name, spec in OPS.items() if spec.cuda_kernel is not None}


def cuda_impl(op_name: str) -> Callable[..., Any]:
    """The CUDA implementation of an op: the fused kernel, imported on first call."""
    spec = OPS[op_name]
    family, function = spec.cuda_kernel
    reference = spec.reference
    signature = inspect.signature(reference)

    @functools.wraps(reference)
    def impl(*args: Any, **kwargs: Any) -> Any:
        args = tuple(signature.bind(*args, **kwargs).arguments.values())
        reason = _supported(op_name, args)
        if reason is not None:
            warnings.warn(f"effx {op_name}: no fused kernel for {reason}; running the reference", stacklevel=2)
            return reference(*args)
        return getattr(FAMILIES[family], function)(*args)

    impl.__name__ = f"{op_name}_cuda"
    return impl


def install() -> bool:
    """Register the fused kernels as the CUDA implementations of the torch ops (once).

    Without triton nothing is registered and CUDA tensors run the reference (the op's default kernel).
    """
    if not triton_available():
        return False
    for name, spec in with_kernels().items():
        if name not in CUDA_IMPLS:
            CUDA_IMPLS[name] = cuda_impl(name)
            spec.torch_op.register_kernel("cuda")(CUDA_IMPLS[name])
    return True
