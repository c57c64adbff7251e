"""TensorRT Quickly-Deployable Plugins (`tensorrt.plugin`) for the effx ops, ahead-of-time.

Each plugin's `aot_impl` compiles the op's Triton kernel to PTX, so the engine embeds the kernel and runs
from trtexec or the C++ runtime without Python. `PLUGIN_SPECS` describes every plugin in plain Python
(usable without TensorRT): the exporter stamps `node_attributes()` onto the ONNX nodes and the device
build kit lists the plugins from it.

Rules of TensorRT 11.4's QDP implementation this module follows (read in tensorrt_bindings/plugin/):
* namespace "effx" (non-empty; "", trt, tensorrt, std are reserved), version "1", no '.' in names;
* the AOT build passes *all* plugin attributes positionally in field order, and the ONNX parser creates
  the fields in the creator's (= registration) order, skipping absent ones: so `aot_impl` declares every
  attribute in registration order, and ONNX nodes must carry every attribute;
* the kernel is launched with (input pointers, int32 extra args, output pointers): the Triton entry
  signatures in effx.plugins.kernels follow that order, floats are compile-time constants;
* a QDP has a fixed tensor input list: op inputs that are optional in ONNX must be present on the node
  (`PluginSpec.materialise` says with what);
* ONNX nodes select the plugin by op_type, `plugin_namespace` (or the node domain, TRT >= 10.10) and
  `plugin_version`; `aot=1` asks for the AOT implementation (no Python at run time).
TensorRT engines are built on the device: `aot_impl` compiles for the GPU it runs on unless an arch is
given, and pins the PTX ISA down (see effx.plugins.trt.ptx.ptx_isa_for).
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from effx.core.errors import EffxError
from effx.core.lazy import lazy_import
from effx.plugins.opspec import DOMAIN, OPS
from effx.plugins.trt.ptx import compile_ptx

PLUGIN_NAMESPACE = DOMAIN  # "effx"
PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class PluginSpec:
    name: str  # = ONNX op_type = OpSpec.name
    extra_args: tuple[str, ...]  # int32 kernel arguments between the input and the output pointers
    kernel_family: str  # effx.plugins.kernels.<family>
    kernels: tuple[str, ...]  # Triton entries aot_impl may choose from (all with this plugin's argument order)
    int_inputs: tuple[str, ...] = ()  # INT64 inputs; every other input and output shares one float type
    materialise: dict[str, str] = field(default_factory=dict)  # ONNX-optional inputs the node must carry
    tactics: tuple[int, ...] = (1,)  # tile configurations TensorRT times (see _softmax_tiles)

    @property
    def op(self):
        return OPS[self.name]

    @property
    def namespace(self) -> str:
        return PLUGIN_NAMESPACE

    @property
    def plugin_id(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.name}"

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(n.rstrip("?") for n in self.op.inputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.op.outputs)

    @property
    def attributes(self) -> tuple[tuple[str, type], ...]:
        """(name, python type) in registration order: the order TensorRT hands them to aot_impl."""
        return tuple(self.op.attributes.items())

    def kernel_arguments(self) -> tuple[str, ...]:
        """Runtime arguments of the kernel entries, in launch order."""
        return (*(f"{n}_ptr" for n in self.inputs), *self.extra_args, *(f"{n}_ptr" for n in self.outputs))

    def node_attributes(self) -> dict[str, Any]:
        """Attributes the exporter adds to the op's ONNX node so TensorRT picks this plugin, AOT."""
        return node_attributes()


def node_attributes() -> dict[str, Any]:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}


_SOFTMAX_TACTICS = (1, 2)  # 1: 64-row tiles (prefill), 2: 16-row tiles (decode: few query rows per KV head)

PLUGIN_SPECS: dict[str, PluginSpec] = {
    s.name: s
    for s in (
        PluginSpec("LocalAttention", ("H", "H_KV", "NQ", "NK", "WINDOW"), "attention", ("local_attention_kernel",),
                   int_inputs=("q_pos", "k_pos"), tactics=_SOFTMAX_TACTICS),
        PluginSpec("BlockSparseAttention",
                   ("H", "H_KV", "NQ", "NK", "BLOCK_SIZE", "LOCAL_BLOCKS", "GLOBAL_BLOCKS", "STRIDE_BLOCKS"),
                   "attention", ("block_sparse_attention_kernel",), int_inputs=("q_pos", "k_pos"),
                   tactics=_SOFTMAX_TACTICS),
        PluginSpec("PagedAttention", ("H", "H_KV", "NQ", "PAGE", "MAX_BLOCKS", "WINDOW"), "attention",
                   ("paged_attention_kernel",), int_inputs=("block_table", "q_pos", "seq_lens"),
                   tactics=_SOFTMAX_TACTICS),
        PluginSpec("LinformerAttention", ("H", "H_KV", "N", "KP", "E_HEADS"), "linformer",
                   ("linformer_attention_kernel",)),
        PluginSpec("NormalizedLinearAttention", ("H", "H_KV", "N"), "linear", ("linear_attention_kernel",),
                   materialise={"k_valid": "ones (B, N) in q's dtype when there is no padding",
                                "omega": "for feature_map='elu' a (1, D) tensor in q's dtype (never read)"}),
        PluginSpec("NormalizedLinearAttentionState", ("H", "H_KV", "N"), "linear",
                   ("linear_attention_state_kernel", "linear_attention_decode_kernel"),
                   materialise={"omega": "for feature_map='elu' a (1, D) tensor in q's dtype (never read)"}),
    )
}
# the hourglass has no plugin: its layers are standard attention over a shortened sequence (ONNX Attention or
# MatMul/Softmax), which TensorRT imports and fuses as it is.


# -- what each kernel is compiled with (pure python: also used by the PTX tests) ---------------------------
@dataclass(frozen=True)
class Tiles:
    constexprs: dict[str, Any]
    block_m: int  # query rows per program (grid x) or value columns per program (linear family)
    num_warps: int
    num_stages: int


def _block_dim(n: int) -> int:
    return max(16, 1 << max(0, (int(n) - 1).bit_length()))


def _softmax_tiles(tactic: int, float_type: str, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): fp32 and wide heads take narrower key tiles so that the two pipeline
    stages stay within 48 KB of shared memory (the limit without an opt-in launch attribute)."""
    wide = _block_dim(head_dim) > 128
    block_n = 32 if float_type == "fp32" or wide else 64
    block_m = 16 if tactic == 2 else (32 if wide else 64)
    return block_m, block_n, 4


SHARED_MEMORY_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without an opt-in attribute


def kernel_constexprs(spec: PluginSpec, attrs: dict[str, Any], float_type: str, dims: dict[str, int],
                      tactic: int) -> tuple[str, list[Tiles]]:
    """The Triton entry and its compile-time arguments for one build configuration, as candidates in order
    of preference: aot_impl embeds the first whose shared memory fits SHARED_MEMORY_LIMIT (whether
    TensorRT raises a plugin kernel's shared-memory limit is not documented, so effx never needs it).

    dims holds what must be known when the engine is built: head_dim, and for the linear family the
    feature count m (favor: omega rows; identity: the width of q and k) and, if fixed, the number of new tokens n.
    """
    head_dim = dims["head_dim"]
    block_d = _block_dim(head_dim)
    if spec.kernel_family == "attention":
        block_m, block_n, warps = _softmax_tiles(tactic, float_type, head_dim)
        c: dict[str, Any] = {"SCALE": float(attrs["scale"]), "HEAD_DIM": head_dim, "BLOCK_M": block_m,
                             "BLOCK_N": block_n, "BLOCK_D": block_d}
        if "softcap" in attrs:  # LocalAttention, PagedAttention: attention-logit soft-capping (0: off)
            c["SOFTCAP"] = float(attrs["softcap"])
        if spec.name != "PagedAttention":
            c |= {"CAUSAL": bool(attrs["causal"]), "SCAN": 1024}
        return spec.kernels[0], [Tiles(c, block_m, warps, 2), Tiles(c | {"BLOCK_N": 16}, block_m, warps, 1)]
    if spec.kernel_family == "linformer":
        block_m, block_n, block_l = (64, 32, 64) if block_d <= 64 else (32, 32, 32)
        c = {"SCALE": float(attrs["scale"]), "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
             "BLOCK_L": block_l, "BLOCK_D": block_d}
        return spec.kernels[0], [Tiles(c, block_m, 4, 2), Tiles(c | {"BLOCK_L": 16, "BLOCK_N": 16}, block_m, 4, 1)]
    # linear family
    kind = attrs["feature_map"]
    if kind == "favor":
        m = dims["m"]
        feat = {"FEATURE": 1, "M": m, "X_SCALE": head_dim ** -0.25, "PHI_SCALE": 1.0 / math.sqrt(m)}
        block_f = _block_dim(m)
    elif kind == "elu":
        feat = {"FEATURE": 0, "M": head_dim, "X_SCALE": 1.0, "PHI_SCALE": 1.0}
        block_f = block_d
    elif kind == "identity":  # features computed before the op (Hedgehog): q/k rows are m wide, values head_dim
        m = dims["m"]
        feat = {"FEATURE": 2, "M": m, "X_SCALE": 1.0, "PHI_SCALE": 1.0}
        block_d = block_f = _block_dim(m)
    else:
        raise EffxError(f"{spec.name}: feature_map={kind!r} has no kernel (use 'elu', 'favor' or 'identity')")
    qk_dim = feat["M"] if kind == "identity" else head_dim
    c = {"EPS": float(attrs["eps"]), "HEAD_DIM": head_dim, "QK_DIM": qk_dim, "BLOCK_D": block_d, "BLOCK_F": block_f,
         "BLOCK_DV": 16, **feat}
    if spec.name == "NormalizedLinearAttentionState" and dims.get("n") == 1:
        return spec.kernels[1], [Tiles(c, 16, 4, 1)]
    # 16-token chunks and 16 value columns per program keep the fp32 state tiles small; the favor
    # projection takes tensor cores when omega's tile fits, CUDA cores otherwise
    c |= {"BLOCK_C": 16}
    candidates = [Tiles(c | {"PROJ_DOT": True}, 16, 4, 1)] if kind == "favor" else []
    return spec.kernels[0], candidates + [Tiles(c | {"PROJ_DOT": False}, 16, 4, 1)]


def kernel_signature(spec: PluginSpec, io_types: dict[str, str]) -> dict[str, str]:
    """Triton types of the runtime arguments, in launch order; io_types maps each input/output to its type."""
    sig = {f"{n}_ptr": f"*{io_types[n]}" for n in spec.inputs}
    sig |= {e: "i32" for e in spec.extra_args}
    sig |= {f"{n}_ptr": f"*{io_types[n]}" for n in spec.outputs}
    return sig


# -- registration ----------------------------------------------------------------------------------------
# TensorRT dtype names -> Triton signature types
TRT_TO_TRITON = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT64": "i64", "INT32": "i32"}


def _triton_type(desc: Any) -> str:
    name = getattr(desc.dtype, "name", str(desc.dtype)).split(".")[-1]
    if name not in TRT_TO_TRITON:
        raise EffxError(f"effx plugins take FP32/FP16/BF16 and INT64 tensors, got {name}")
    return TRT_TO_TRITON[name]


def _constant(expr: Any, what: str, plugin: str) -> int:
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        raise EffxError(f"{plugin}: {what} must be fixed when the engine is built (make that dimension static)")
    return int(expr.constant_value())


def _launch(spec: PluginSpec, descs: dict[str, Any], attrs: dict[str, Any], tiles: Tiles,
            trtp: Any) -> tuple[tuple[Any, Any], list[Any]]:
    """Symbolic grid (x, y) and int32 extra args, from the (possibly dynamic) input shapes."""
    q = descs["q"]
    batch, heads, n_q = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    if spec.name == "PagedAttention":
        pool, table = descs["k_pool"], descs["block_table"]
        h_kv = pool.shape_expr[2]
        rows = n_q * (heads // h_kv)
        extras = [heads, h_kv, n_q, pool.shape_expr[1], table.shape_expr[1], trtp.SymInt32(int(attrs["window"]))]
        return (trtp.cdiv(rows, tiles.block_m), batch * h_kv), extras
    k = descs["k"]
    h_kv, n_k = k.shape_expr[1], k.shape_expr[2]
    rows = n_q * (heads // h_kv)
    if spec.name == "LocalAttention":
        extras = [heads, h_kv, n_q, n_k, trtp.SymInt32(int(attrs["window"]))]
    elif spec.name == "BlockSparseAttention":
        extras = [heads, h_kv, n_q, n_k] + [trtp.SymInt32(int(attrs[a])) for a in
                                             ("block_size", "local_blocks", "global_blocks", "stride_blocks")]
    elif spec.name == "LinformerAttention":
        e = descs["e"]
        extras = [heads, h_kv, n_q, e.shape_expr[1], e.shape_expr[0]]
    else:  # linear family: one program per (block of value columns, batch x KV head); D is a build constant
        d = _constant(descs["v"].shape_expr[3], "head dim", spec.name)
        return (-(-d // tiles.block_m), batch * h_kv), [heads, h_kv, n_q]
    return (trtp.cdiv(rows, tiles.block_m), batch * h_kv), extras


@functools.cache
def _compile(family: str, kernel: str, signature: tuple, constexprs: tuple, arch: int | None, num_warps: int,
             num_stages: int):
    return compile_ptx(family, kernel, dict(signature), dict(constexprs), arch, num_warps, num_stages)


def compile_fitting(spec: PluginSpec, kernel: str, candidates: list[Tiles], signature: dict[str, str],
                    arch: int | None):
    """Compile the first candidate whose shared memory fits SHARED_MEMORY_LIMIT."""
    sizes = []
    for tiles in candidates:
        compiled = _compile(spec.kernel_family, kernel, tuple(signature.items()),
                            tuple(sorted(tiles.constexprs.items())), arch, tiles.num_warps, tiles.num_stages)
        if compiled.shared <= SHARED_MEMORY_LIMIT:
            return kernel, tiles, compiled
        sizes.append(compiled.shared)
    raise EffxError(f"{spec.name}: every tile configuration of {kernel} needs more than {SHARED_MEMORY_LIMIT} bytes "
                    f"of shared memory ({sizes}); reduce the head dim or feature count")


def aot_kernel(spec: PluginSpec, descs: dict[str, Any], attrs: dict[str, Any], outputs: tuple, tactic: int,
               trtp: Any, arch: int | None):
    """What the plugin's aot_impl returns: (kernel name, PTX, launch params, int32 extra args)."""
    io_types = {n: _triton_type(descs[n]) for n in spec.inputs}
    io_types |= {n: _triton_type(o) for n, o in zip(spec.outputs, outputs, strict=True)}
    q = descs["q"]
    dims = {"head_dim": _constant(q.shape_expr[3], "head dim", spec.name)}
    if spec.kernel_family == "linear":
        dims["head_dim"] = _constant(descs["v"].shape_expr[3], "head dim", spec.name)  # values: q/k may be features
        if attrs["feature_map"] == "favor":
            dims["m"] = _constant(descs["omega"].shape_expr[0], "favor feature count (omega rows)", spec.name)
        elif attrs["feature_map"] == "identity":
            dims["m"] = _constant(q.shape_expr[3], "feature count (q's last dim)", spec.name)
        n = q.shape_expr[2]
        if not getattr(n, "is_fake", False) and n.is_constant:
            dims["n"] = int(n.constant_value())
    kernel, candidates = kernel_constexprs(spec, attrs, io_types["q"], dims, tactic)
    kernel, tiles, compiled = compile_fitting(spec, kernel, candidates, kernel_signature(spec, io_types), arch)
    (grid_x, grid_y), extras = _launch(spec, descs, attrs, tiles, trtp)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = grid_x
    launch.grid_y = grid_y
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared
    extra = trtp.SymIntExprs(len(extras))
    for i, value in enumerate(extras):
        extra[i] = value if isinstance(value, trtp.SymInt32) else trtp.SymInt32(value)
    return compiled.name, compiled.ptx, launch, extra


def _signature(params: list[tuple[str, Any]], returns: Any) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind, annotation=a) for n, a in params], return_annotation=returns)


def _define(spec: PluginSpec, trtp: Any, arch: int | None) -> None:
    """Register one plugin: describe (shapes/dtypes), autotune (types, tactics), aot_impl (PTX)."""
    desc = trtp.TensorDesc
    tensor_params = [(n, desc) for n in spec.inputs]
    attr_params = list(spec.attributes)
    n_in = len(spec.inputs)
    out_like = {"y": "q", "s": "s0", "z": "z0"}  # each output has the shape and dtype of this input

    def describe(*args: Any, **kwargs: Any):
        bound = describe.__signature__.bind(*args, **kwargs).arguments
        outs = tuple(bound[out_like[o]].like() for o in spec.outputs)
        if spec.kernel_family == "linear":  # y is as wide as the values (identity features may be wider)
            outs[0].shape_expr[3] = bound["v"].shape_expr[3]
        return outs[0] if len(outs) == 1 else outs

    returns = desc if len(spec.outputs) == 1 else typing.Tuple[tuple(desc for _ in spec.outputs)]  # noqa: UP006
    describe.__signature__ = _signature(tensor_params + attr_params, returns)

    def autotune(*args: Any) -> list:
        floats = "FP32|FP16|BF16"
        types = [("INT64" if n in spec.int_inputs else floats) for n in spec.inputs] + [floats] * len(spec.outputs)
        return [trtp.AutoTuneCombination(", ".join(types), "LINEAR", list(spec.tactics))]

    autotune.__signature__ = _signature(tensor_params + [("outputs", typing.Tuple[desc])],  # noqa: UP006
                                        typing.List[trtp.AutoTuneCombination])  # noqa: UP006

    def aot_impl(*args: Any):
        descs = dict(zip(spec.inputs, args[:n_in], strict=True))
        attrs = dict(zip([a for a, _ in spec.attributes], args[n_in:-2], strict=True))
        return aot_kernel(spec, descs, attrs, args[-2], args[-1], trtp, arch)

    aot_impl.__signature__ = _signature(
        tensor_params + attr_params + [("outputs", typing.Tuple[desc]), ("tactic", int)],  # noqa: UP006
        typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams,  # noqa: UP006,UP007
                     trtp.SymIntExprs])
    for fn, suffix in ((describe, "describe"), (autotune, "autotune"), (aot_impl, "aot_impl")):
        fn.__name__ = fn.__qualname__ = f"{spec.name}_{suffix}"

    trtp.register(spec.plugin_id)(describe)
    trtp.autotune(spec.plugin_id)(autotune)
    trtp.aot_impl(spec.plugin_id)(aot_impl)


def registered_plugins(trtp: Any) -> list[str]:
    namespace = getattr(trtp.op, PLUGIN_NAMESPACE, None) if _has_namespace(trtp) else None
    return [s.plugin_id for s in PLUGIN_SPECS.values() if namespace is not None and _has(namespace, s.name)]


def _has_namespace(trtp: Any) -> bool:
    try:
        getattr(trtp.op, PLUGIN_NAMESPACE)
    except AttributeError:
        return False
    return True


def _has(namespace: Any, name: str) -> bool:
    try:
        getattr(namespace, name)
    except AttributeError:
        return False
    return True


def register_tensorrt_plugins(arch: int | None = None, names: Callable[[str], bool] | None = None) -> list[str]:
    """Register every effx plugin with TensorRT (idempotent) and return their ids.

    arch: compute capability to compile the PTX for (87 = Orin, 90 = H100); None = this machine's GPU.
    Needs TensorRT with AOT plugins (`tensorrt.plugin.aot_impl`, TensorRT >= 10.12) and triton.
    """
    lazy_import("tensorrt", purpose="TensorRT plugins")
    trtp = lazy_import("tensorrt.plugin", purpose="TensorRT plugins")
    if not hasattr(trtp, "aot_impl") or not hasattr(trtp, "KernelLaunchParams"):
        raise EffxError("this TensorRT has no ahead-of-time plugins (tensorrt.plugin.aot_impl); effx nodes fall "
                        "back to their ONNX function bodies there")
    lazy_import("triton", purpose="compiling the effx plugin kernels")
    done = set(registered_plugins(trtp))
    for spec in PLUGIN_SPECS.values():
        if spec.plugin_id not in done and (names is None or names(spec.name)):
            _define(spec, trtp, arch)
    return registered_plugins(trtp)
