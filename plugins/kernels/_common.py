"""Plumbing shared by the Triton kernels: lazy loading, device/dtype helpers. (Ahead-of-time PTX for the
TensorRT plugins is in effx.plugins.trt.ptx.)

Why kernels are jitted lazily: `import effx` (and every effx submodule, see tests/test_imports.py) must not
import triton, which costs about a second and is optional. The kernel modules therefore hold *plain*
Python functions written against a module-global `tl` that is None until `load()` runs; `load()` executes
a fresh copy of the module, binds `tl` and wraps every name listed in the module's `TRITON_FUNCTIONS`.

Why a fresh copy per mode: a Triton function resolves the helpers it calls through its module globals,
so one namespace cannot hold interpreter and compiled versions at once. `load(family, interpret=True)`
gives `InterpretedFunction`s (what `triton.jit` returns under TRITON_INTERPRET=1: the kernel runs on torch
CPU tensors), `interpret=False` gives `JITFunction`s, which launch on CUDA and which `triton.compile` turns
into PTX for the TensorRT plugins. Both copies run the same source lines.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from effx.core.lazy import lazy_import
from effx.plugins.opspec import MASK_VALUE as OP_MASK_VALUE

_LOADED: dict[tuple[str, bool], ModuleType] = {}

# a masked score (effx.plugins.opspec): finite so that a row whose keys are all masked so far never computes
# inf - inf; exp(MASK - m) underflows to exactly 0 as soon as the row has one real score
MASK_VALUE = OP_MASK_VALUE


def triton_available() -> bool:
    """True if triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def load(family: str, interpret: bool) -> ModuleType:
    """The kernel module `effx.plugins.kernels.<family>` with its Triton functions jitted for one mode."""
    key = (family, interpret)
    if key in _LOADED:
        return _LOADED[key]
    triton = lazy_import("triton", purpose="the fused attention kernels")
    tl = lazy_import("triton.language")
    if interpret:
        wrap = lazy_import("triton.runtime.interpreter").InterpretedFunction
    else:
        wrap = lazy_import("triton.runtime.jit").JITFunction

    name = f"effx.plugins.kernels._jit_{family}_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{family}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton looks functions' modules up by name (cache keys, source lines)
    spec.loader.exec_module(module)
    module.tl = _InterpreterLanguage(tl) if interpret else tl
    # the interpreter patches the triton.language modules it finds in a kernel's globals; with these two
    # in sight one patch at launch also covers the library functions called directly (see above)
    module._triton_language, module._triton_language_core = tl, tl.core
    module.triton = triton
    module.INTERPRETED = interpret  # device code works around interpreter gaps (see attention._dot)
    for const in getattr(module, "TRITON_CONSTANTS", ()):
        # a Triton function may only read module globals that are constexpr
        setattr(module, const, tl.constexpr(getattr(module, const)))
    for fn_name in module.TRITON_FUNCTIONS:
        fn = wrap(getattr(module, fn_name))
        if interpret and fn_name.startswith("_"):
            # A device helper runs inside a kernel launch, which has already switched triton.language to the
            # interpreter; calling the rewritten function directly skips a per-call re-patch that costs
            # ~1.5 ms and dominated the CPU test time. Kernels (no underscore) keep the launcher.
            fn = fn.rewrite()
        setattr(module, fn_name, fn)
    module.IS_INTERPRETED = interpret  # plain bool for host code
    _LOADED[key] = module
    return module


class _InterpreterLanguage:
    """triton.language as interpreted kernels see it, with its library functions (tl.max, tl.sum, ...)
    called directly as interpreted Python.

    Two reasons. Inside a launch the interpreter has already patched the language, and the per-call
    re-patch these functions otherwise do made up a third of the CPU test time. And triton jits its
    library at import time according to TRITON_INTERPRET: when triton was imported without it (another
    library imported it first), the library functions are compiled-mode JITFunctions, which the
    interpreter cannot call; rewriting their Python source for the interpreter here makes the kernels run
    in the interpreter whatever the import order.
    """

    def __init__(self, language: ModuleType):
        self._language = language
        self._direct: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._language, name)  # looked up each time: the interpreter swaps builtins in and out
        kind = type(value).__name__
        if kind not in ("InterpretedFunction", "JITFunction"):
            return value
        if name not in self._direct:
            InterpretedFunction = lazy_import("triton.runtime.interpreter").InterpretedFunction  # noqa: N806
            fn = value if kind == "InterpretedFunction" else InterpretedFunction(value.fn)
            self._direct[name] = fn.rewrite()
        return self._direct[name]


def interpret_for(t: torch.Tensor) -> bool:
    """CPU tensors run in the Triton interpreter (tests, CI); CUDA tensors run the compiled kernel."""
    if t.device.type == "cuda":
        return False
    if t.device.type == "cpu":
        return True
    raise ValueError(f"effx Triton kernels run on cuda (compiled) or cpu (interpreter), not {t.device}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_dim(n: int, minimum: int = 16) -> int:
    """Tile extent for a dimension of size n: a power of two, at least 16 (tl.dot's smallest operand)."""
    return max(minimum, next_pow2(n))


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch dtype -> Triton signature type
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32"}


def check_float(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"effx kernels take fp32, fp16 or bf16 inputs, got {dtype}")
    for t in tensors[1:]:
        if t.dtype != dtype:
            raise TypeError(f"effx kernels need one float dtype for all inputs, got {dtype} and {t.dtype}")


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter has no SMs; a small number still exercises the split path in tests
