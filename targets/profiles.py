"""Target profiles: one declarative row per deployment target. Builds choose from the row; requests a row
cannot honour fail before any work starts. Facts not confirmed from a primary source carry their field
name in `unverified` and are shown as such (sources: ../shared/notes/tensorrt-facts.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from effx.core.errors import CapabilityError
from effx.core.flavours import ORT_CPU_ATTENTION_OPS, format_attention_ops, resolve_attention_ops

# not measured for the row's runtime: the export effx wrote before flavours existed (ONNX Attention for full
# attention and cached local steps, effx's banded body for whole-sequence windows; `effx build` lowers what an
# older TensorRT cannot parse, `--trt-plugins` keeps effx nodes)
_PORTABLE = ("full=onnx", "local=effx", "local-step=onnx", "linear=effx")
_ORT_CPU = tuple(format_attention_ops(ORT_CPU_ATTENTION_OPS).split(","))
_ORT_CPU_SOURCE = ("benchmarks/attention_flavours.py -> benchmarks/results/attention_flavours.json (local, full); "
                   "benchmarks/results/hybrid_decode.json (local-step); "
                   "benchmarks/results/attention_flavours_linear.json (linear)")

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4w")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    backend: str  # "ort" | "tensorrt"
    summary: str
    aliases: tuple[str, ...] = ()
    sm: int | None = None  # compute capability x10 (87 = sm_87)
    tensorrt: tuple[str, ...] = ()  # TensorRT versions that ship for the target ("10.3 (JetPack 6)")
    tensorrt_major_minor: tuple[int, int] | None = None  # the version build scripts target
    precisions: tuple[str, ...] = ("fp32",)
    dla_cores: int = 0
    memory_gb: float | None = None
    workspace_gb: float = 1.0  # default builder memory pool limit
    # which op each attention site exports to, "site=onnx|effx" for every site of effx.core.flavours.SITES: the
    # standard ONNX op or effx's node/body. `effx run --target` exports with it (`--attention-ops` overrides sites)
    op_flavours: tuple[str, ...] = _PORTABLE
    op_flavours_source: str = ""  # the measurement the choice comes from; empty: not measured (see unverified)
    unverified: tuple[str, ...] = ()  # fields whose value is not confirmed by a primary source
    notes: str = ""
    ort_providers: tuple[str, ...] = field(default=())
    unsupported: str = ""  # why effx refuses to build for this row (before any work), empty when it builds

    def attention_ops(self, override: str | None = None) -> dict[str, str]:
        """The op flavour per attention site for this target; `override` (the export option) replaces sites."""
        return resolve_attention_ops(self.op_flavours, override)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensorrt_major_minor"] = ".".join(map(str, self.tensorrt_major_minor)) if self.tensorrt_major_minor else None
        if not self.op_flavours_source and "op_flavours" not in self.unverified:  # not measured for this runtime
            d["unverified"] = (*self.unverified, "op_flavours")
        return d


_DC = ("fp32", "fp16", "int8")
TARGETS: dict[str, TargetProfile] = {}


def _add(p: TargetProfile) -> None:
    TARGETS[p.name] = p


_add(TargetProfile("cpu", "ort", "ONNX Runtime, CPU execution provider (the embedded default)",
                   precisions=("fp32", "fp16", "int8"), op_flavours=_ORT_CPU, op_flavours_source=_ORT_CPU_SOURCE,
                   ort_providers=("CPUExecutionProvider",),
                   notes="fp16 runs but is slower than fp32 on most CPUs; int8 is static QDQ or dynamic"))
_add(TargetProfile("cuda", "ort", "ONNX Runtime, CUDA execution provider (pip install 'effx[gpu]')",
                   precisions=("fp32", "fp16", "int8"), op_flavours=_ORT_CPU, unverified=("op_flavours",),
                   op_flavours_source="not measured on a GPU (none here): the cpu row's measurement",
                   ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
_TRT_DC = ("10.x", "11.x")
_add(TargetProfile("t4", "tensorrt", "NVIDIA T4 (Turing)", sm=75, tensorrt=_TRT_DC, tensorrt_major_minor=(11, 4),
                   precisions=_DC, memory_gb=16, workspace_gb=4,
                   notes="no bf16/fp8 on Turing; int4 weight-only treated as unsupported (TRT-RTX matrix: no)"))
_add(TargetProfile("a100", "tensorrt", "NVIDIA A100 (Ampere)", sm=80, tensorrt=_TRT_DC, tensorrt_major_minor=(11, 4),
                   precisions=_DC + ("bf16", "int4w"), memory_gb=80, workspace_gb=8))
_add(TargetProfile("l4", "tensorrt", "NVIDIA L4 (Ada)", sm=89, tensorrt=_TRT_DC, tensorrt_major_minor=(11, 4),
                   precisions=_DC + ("bf16", "fp8", "int4w"), memory_gb=24, workspace_gb=4))
_add(TargetProfile("h100", "tensorrt", "NVIDIA H100 (Hopper)", sm=90, tensorrt=_TRT_DC, tensorrt_major_minor=(11, 4),
                   precisions=_DC + ("bf16", "fp8", "int4w"), memory_gb=80, workspace_gb=8))
_add(TargetProfile("b200", "tensorrt", "NVIDIA B200 (Blackwell)", sm=100, tensorrt=_TRT_DC,
                   tensorrt_major_minor=(11, 4), precisions=_DC + ("bf16", "fp8", "int4w"), memory_gb=180,
                   workspace_gb=8,
                   notes="also NVFP4/MXFP8 in TensorRT (not offered by effx yet)"))
_add(TargetProfile("jetson-orin", "tensorrt", "Jetson AGX Orin / Orin NX (JetPack 6: TRT 10.3; JetPack 7.2: TRT 10.x)",
                   aliases=("jetson",), sm=87, tensorrt=("10.3 (JetPack 6.1/6.2)", "10.x (JetPack 7.2)"),
                   tensorrt_major_minor=(10, 3), precisions=_DC + ("bf16", "int4w"), dla_cores=2, memory_gb=64,
                   workspace_gb=2,
                   unverified=("memory_gb", "op_flavours"),
                   notes="DLA: fp16/int8 only; attention falls back to the GPU. TRT 10.3 predates ONNX Attention "
                         "import (10.14) and QDP AOT plugins: the function bodies are the fallback; export with --opset 20"))
_add(TargetProfile("jetson-orin-nano", "tensorrt", "Jetson Orin Nano (JetPack 6: TRT 10.3)", sm=87,
                   tensorrt=("10.3 (JetPack 6.1/6.2)", "10.x (JetPack 7.2)"), tensorrt_major_minor=(10, 3),
                   precisions=_DC + ("bf16", "int4w"), dla_cores=0, memory_gb=8, workspace_gb=1,
                   unverified=("dla_cores",),
                   notes="sources conflict on DLA for Orin Nano; the datasheet lists none"))
_add(TargetProfile("jetson-xavier", "tensorrt", "Jetson AGX Xavier (JetPack 5.1: TRT 8.5)", sm=72,
                   tensorrt=("8.5.2 (JetPack 5.1.x)",), tensorrt_major_minor=(8, 5), precisions=_DC, dla_cores=2,
                   memory_gb=32, workspace_gb=1, unverified=("tensorrt",),
                   notes="no bf16/fp8; CUDA 13 dropped sm_72",
                   unsupported="TensorRT 8.5 (JetPack 5.1) parses ONNX opset <= 17 and inlines no ONNX local "
                               "functions (both from onnx-tensorrt release/8.5-GA and its changelog), while effx "
                               "exports opset >= 18 with effx function bodies. Use jetson-orin (JetPack 6, TensorRT 10.3) or ONNX Runtime (--target cpu/cuda)"))
_add(TargetProfile("jetson-thor", "tensorrt", "Jetson AGX Thor (JetPack 7: TRT 10.13.x)", sm=110,
                   tensorrt=("10.13.x (JetPack 7.0/7.1)", "10.x (JetPack 7.2)"), tensorrt_major_minor=(10, 13),
                   precisions=_DC + ("bf16", "fp8", "int4w"), dla_cores=0, memory_gb=128, workspace_gb=4,
                   unverified=("tensorrt", "op_flavours"),
                   notes="sm_101 before CUDA 13; no DLA"))


def get_target(name: str) -> TargetProfile:
    for p in TARGETS.values():
        if name == p.name or name in p.aliases:
            return p
    names = ", ".join(p.name + (f" ({'/'.join(p.aliases)})" if p.aliases else "") for p in TARGETS.values())
    raise CapabilityError(f"unknown target {name!r}; choose one of: {names}")


def targets_table() -> list[dict[str, Any]]:
    return [p.row() for p in TARGETS.values()]
