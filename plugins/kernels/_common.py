"""Plumbing shared by the Triton kernels: lazy loading, device/dtype helpers, ahead-of-time PTX for TensorRT.

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
import re
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

_LOADED: dict[tuple[str, bool], ModuleType] = {}

# fp32's lowest finite value: a masked score. Finite so that a row whose keys are all masked so far never
# computes inf - inf; exp(MASK - m) underflows to exactly 0 as soon as the row has one real score.
MASK_VALUE = -3.4028234663852886e38


def triton_available() -> bool:
    """True if triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def load(family: str, interpret: bool) -> ModuleType:
    """The kernel module `effx.plugins.kernels.<family>` with its Triton functions jitted for one mode."""
    key = (family, interpret)
    if key in _LOADED:
        return _LOADED[key]
    from effx._lazy import lazy_import

    triton = lazy_import("triton", purpose="the fused attention kernels")
    tl = importlib.import_module("triton.language")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap

    source = importlib.import_module(f"effx.plugins.kernels.{family}")
    name = f"effx.plugins.kernels._jit_{family}_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, source.__file__)
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
            from triton.runtime.interpreter import InterpretedFunction

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

# torch dtype -> Triton signature type; TensorRT dtype names -> the same (used by the plugins' aot_impl)
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32"}
TRT_TO_TRITON = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT64": "i64", "INT32": "i32"}


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


# -- ahead-of-time compilation (TensorRT AOT plugins) ----------------------------------------------------
# The lowest PTX ISA that knows each architecture. TensorRT hands the PTX to the driver, which rejects an
# ISA newer than itself, and Triton by default writes the ISA of the ptxas it bundles (8.8 for sm_87 and
# 9.4 for sm_90 with triton 3.9): newer than many deployed drivers. So effx pins the ISA down to what the
# target needs; ptxas still compiles it here, so a kernel that needs more fails at build time, not on
# the device.
_MIN_PTX_ISA = {100: 86, 101: 86, 103: 88, 110: 90, 120: 87, 121: 88}
DEFAULT_PTX_ISA = 80  # PTX 8.0 (CUDA 12.0) is the first that has sm_90a


def ptx_isa_for(arch: int) -> int:
    return max(DEFAULT_PTX_ISA, _MIN_PTX_ISA.get(arch, 0))


@dataclass(frozen=True)
class CompiledPTX:
    name: str  # PTX entry (kernel) name
    ptx: str
    num_warps: int
    shared: int  # dynamic shared memory bytes the launch must provide
    params: tuple[str, ...]  # PTX parameter types of the entry, in order (".u64 .ptr" / ".u32" ...)
    arch: int


_ENTRY = re.compile(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)", re.S)


def ptx_entry_params(ptx: str) -> tuple[str, list[str]]:
    """(entry name, parameter declarations) of the single kernel entry in a PTX module."""
    found = _ENTRY.findall(ptx)
    if len(found) != 1:
        raise ValueError(f"expected one .entry in the PTX, found {len(found)}")
    name, body = found[0]
    params = [p.strip() for p in body.split(",") if p.strip()]
    return name, params


def _drop_hidden_params(ptx: str, n_visible: int, metadata: Any) -> str:
    """Remove the scratch pointers Triton appends after the visible arguments, when the kernel never uses them.

    Triton >= 3.3 appends `global_scratch` (and >= 3.5 `profile_scratch`) pointer parameters that its own
    launcher fills. A TensorRT AOT plugin launches the entry with exactly inputs + int32 extras + outputs;
    a kernel that declares more parameters than the launch supplies reads past the argument array. When
    both scratch sizes are 0 and the body never loads those parameters, dropping the declarations leaves
    a kernel whose ABI is exactly what TensorRT passes (and still correct if a launcher passes extra args,
    which the driver then ignores).
    """
    name, params = ptx_entry_params(ptx)
    hidden = params[n_visible:]
    if not hidden:
        return ptx
    if getattr(metadata, "global_scratch_size", 0) or getattr(metadata, "profile_scratch_size", 0):
        raise RuntimeError(f"{name} needs Triton scratch memory, which a TensorRT plugin launch cannot provide")
    for i in range(n_visible, len(params)):
        if re.search(rf"\[{name}_param_{i}\]", ptx):
            raise RuntimeError(f"{name} reads hidden parameter {i}; its PTX cannot be launched by TensorRT")
    head, rest = ptx.split(f".entry {name}(", 1)
    decl, tail = rest.split(")", 1)
    kept = [p for p in decl.split(",")][:n_visible]
    return f"{head}.entry {name}({','.join(kept)}\n){tail}"


def compile_ptx(family: str, kernel: str, signature: dict[str, str], constexprs: dict[str, Any], arch: int | None,
                num_warps: int = 4, num_stages: int = 2, ptx_isa: int | None = None) -> CompiledPTX:
    """Compile one kernel entry ahead of time; `arch` None compiles for the GPU of this machine.

    `signature` maps every runtime argument, in order, to its Triton type ("*fp16", "i32", ...);
    `constexprs` holds the compile-time ones. No GPU is needed when `arch` is given.
    """
    triton = importlib.import_module("triton")
    from triton.backends.compiler import GPUTarget

    if type(importlib.import_module("triton.language").max).__name__ == "InterpretedFunction":
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, which cannot compile: compile the "
                           "plugin kernels in a process without it")

    module = load(family, interpret=False)
    fn = getattr(module, kernel)
    full_sig = {}
    for param in fn.arg_names:
        if param in constexprs:
            full_sig[param] = "constexpr"
        elif param in signature:
            full_sig[param] = signature[param]
        else:
            raise KeyError(f"{kernel}: no type or value for argument {param}")
    if set(signature) - set(full_sig) or set(constexprs) - set(full_sig):
        raise KeyError(f"{kernel}: unknown arguments {sorted((set(signature) | set(constexprs)) - set(full_sig))}")
    target = None
    if arch is None:
        target = triton.runtime.driver.active.get_current_target()
        arch = int(target.arch)
    else:
        target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True,
               "ptx_version": ptx_isa or ptx_isa_for(arch)}
    src = triton.compiler.ASTSource(fn=fn, signature=full_sig, constexprs=dict(constexprs))
    compiled = triton.compile(src, target=target, options=options)
    ptx = _drop_hidden_params(compiled.asm["ptx"], len(signature), compiled.metadata)
    name, params = ptx_entry_params(ptx)
    types = tuple(re.sub(r"\s+\w+$", "", p.replace(".param", "").strip()) for p in params)
    return CompiledPTX(name, ptx, compiled.metadata.num_warps, compiled.metadata.shared, types, arch)
