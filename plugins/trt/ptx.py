"""Ahead-of-time PTX for the TensorRT AOT plugins: a Triton kernel entry compiled for a GPU architecture
(no GPU needed when the arch is given), with the PTX ISA pinned down and the entry's ABI made exactly what a
TensorRT plugin launch passes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from effx.core.lazy import lazy_import
from effx.plugins.kernels._common import load

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
    triton = lazy_import("triton", purpose="compiling the effx plugin kernels")
    GPUTarget = lazy_import("triton.backends.compiler", extra="triton").GPUTarget  # noqa: N806

    if type(lazy_import("triton.language").max).__name__ == "InterpretedFunction":
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
