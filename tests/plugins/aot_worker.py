"""Compile the plugin kernels ahead of time and drive the TensorRT QDP build path; write what it saw as JSON.

Runs in its own process (python -m tests.plugins.aot_worker OUT.json [BINDINGS]) because Triton cannot
compile in a process whose triton was imported under TRITON_INTERPRET=1 (the CPU kernel tests need
that), and because the stub `tensorrt` must not leak into the test process.

Part 1 (always): every kernel entry a plugin can embed, compiled for sm_87 (Jetson Orin) and sm_90 (H100)
through the same cached compile call the plugins use.
Part 2 (when the tensorrt-cu13-bindings wheel is available): the real `tensorrt.plugin` sources over the
stub core in tests/plugins/trt_stub.py: effx's registrations go through the real validators, the real
creator turns ONNX-style fields into a plugin, and the real AOT plugin class calls effx's aot_impl.
"""

import json
import re
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ARCHS = (87, 90)
HEAD_DIM = 64

# example attributes per plugin (ONNX attribute values: bools are INT on the node)
ATTRS: dict[str, dict[str, Any]] = {
    "LocalAttention": {"window": 16, "causal": 1, "scale": 0.125, "softcap": 30.0},
    "BlockSparseAttention": {"block_size": 16, "local_blocks": 2, "global_blocks": 1, "stride_blocks": 4,
                             "causal": 0, "scale": 0.125},
    "PagedAttention": {"window": 0, "scale": 0.125, "softcap": 0.0},
    "LinformerAttention": {"scale": 0.125},
    "NormalizedLinearAttention": {"feature_map": "favor", "eps": 1e-6},
    "NormalizedLinearAttentionState": {"feature_map": "elu", "eps": 1e-6},
}
FAVOR_M = 96  # omega rows for the favor examples (not a power of two: exercises the padded feature tile)


def _typed_attrs(spec, values: dict[str, Any]) -> dict[str, Any]:
    return {name: typ(values[name]) for name, typ in spec.attributes}


def ptx_facts(compiled, arch: int) -> dict[str, Any]:
    ptx = compiled.ptx
    reqntid = re.search(r"\.reqntid\s+(\d+)", ptx)
    return {
        "arch": arch,
        "name": compiled.name,
        "entries": re.findall(r"\.visible\s+\.entry\s+(\w+)", ptx),
        "target": re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1),
        "version": re.search(r"^\.version\s+(\S+)", ptx, re.M).group(1),
        "params": list(compiled.params),
        "num_warps": compiled.num_warps,
        "reqntid": int(reqntid.group(1)) if reqntid else None,
        "shared": compiled.shared,
        "ptx_bytes": len(ptx),
    }


def _compile_for(spec, kernel_dims: dict[str, int], float_type: str, arch: int, tactic: int = 1):
    from effx.plugins.trt import definitions as tp

    kernel, candidates = tp.kernel_constexprs(spec, _typed_attrs(spec, ATTRS[spec.name]), float_type, kernel_dims,
                                              tactic)
    io = {n: ("i64" if n in spec.int_inputs else float_type) for n in (*spec.inputs, *spec.outputs)}
    kernel, tiles, compiled = tp.compile_fitting(spec, kernel, candidates, tp.kernel_signature(spec, io), arch)
    return kernel, tiles, compiled


# kernels only the torch CUDA path launches (Triton's own launcher, so no plugin ABI): compiled here so a
# GPU-only compile error cannot hide until the GPU lane
TORCH_PATH_KERNELS = {
    ("attention", "softmax_split_kernel"): (
        {**{n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr")}, "q_pos_ptr": "*i64", "k_pos_ptr": "*i64",
         "bt_ptr": "*i64", "seq_lens_ptr": "*i64",
         **{n: "i32" for n in ("H", "H_KV", "NQ", "NK", "W", "BS", "LB", "GB", "SB", "PAGE", "MAX_BLOCKS", "CHUNK",
                               "NUM_SPLITS")},
         "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "ws_has_ptr": "*i32", "ws_acc_ptr": "*fp32"},
        [{"SCALE": 0.125, "SOFTCAP": 0.0, "MASK_KIND": kind, "CAUSAL": True, "PAGED": paged, "HEAD_DIM": 64,
          "BLOCK_M": 16,
          "BLOCK_N": 64, "BLOCK_D": 64, "SCAN": 1024} for kind, paged in ((1, False), (2, False), (1, True))]),
    ("attention", "softmax_combine_kernel"): (
        {"ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "ws_has_ptr": "*i32", "ws_acc_ptr": "*fp32", "v_ptr": "*fp16",
         "bt_ptr": "*i64", **{n: "i32" for n in ("H", "H_KV", "NQ", "NK", "PAGE", "MAX_BLOCKS", "NUM_SPLITS")},
         "y_ptr": "*fp16"},
        [{"PAGED": paged, "HEAD_DIM": 64, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 64} for paged in (False, True)]),
    ("attention", "dense_attention_kernel"): (
        {**{n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr")}, **{n: "i32" for n in ("H", "H_KV", "NQ", "NK")},
         "y_ptr": "*fp16"},
        [{"SCALE": 0.125, "HEAD_DIM": 64, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}]),
    ("linformer", "linformer_project_kernel"): (
        {**{n: "*fp16" for n in ("k_ptr", "v_ptr", "e_ptr", "f_ptr")}, **{n: "i32" for n in ("N", "KP", "H_KV",
                                                                                          "E_HEADS")},
         "kp_ptr": "*fp16", "vp_ptr": "*fp16"},
        [{"HEAD_DIM": 64, "BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_D": 64}]),
}


def part_torch_path(arch: int = 90) -> list[dict[str, Any]]:
    from effx.plugins.trt.ptx import compile_ptx

    out = []
    for (family, kernel), (signature, variants) in TORCH_PATH_KERNELS.items():
        for constexprs in variants:
            compiled = compile_ptx(family, kernel, signature, constexprs, arch, 4, 2)
            out.append({"kernel": kernel, "constexprs": constexprs, "n_args": len(signature), **ptx_facts(compiled,
                                                                                                         arch)})
    return out


def part_ptx() -> list[dict[str, Any]]:
    from effx.plugins.trt import PLUGIN_SPECS

    out = []
    cases = []
    for spec in PLUGIN_SPECS.values():
        dims = {"head_dim": HEAD_DIM, "m": FAVOR_M}
        for arch in ARCHS:
            cases.append((spec, dims, "fp16", arch, 1))
            if spec.name == "NormalizedLinearAttentionState":
                cases.append((spec, dims | {"n": 1}, "fp16", arch, 1))  # the decode kernel
    local = PLUGIN_SPECS["LocalAttention"]
    cases += [(local, {"head_dim": HEAD_DIM}, "bf16", 87, 1), (local, {"head_dim": HEAD_DIM}, "fp16", 87, 2),
              (local, {"head_dim": 128}, "fp32", 87, 1)]  # fp32 and wide heads: the largest shared-memory tiles
    for spec, dims, float_type, arch, tactic in cases:
        kernel, tiles, compiled = _compile_for(spec, dims, float_type, arch, tactic)
        out.append({"plugin": spec.name, "kernel": kernel, "float_type": float_type, "head_dim": dims["head_dim"],
                    "tactic": tactic, "constexprs": tiles.constexprs, "n_inputs": len(spec.inputs), "n_extras": len(spec.extra_args),
                    "n_outputs": len(spec.outputs), **ptx_facts(compiled, arch)})
    return out


# -- part 2: the QDP build path over the real tensorrt.plugin sources -------------------------------------
def install_bindings(source: Path) -> Path:
    """A temporary `tensorrt` package: the stub core plus the wheel's real plugin/ sources."""
    root = Path(tempfile.mkdtemp(prefix="effx_trt_"))
    pkg = root / "tensorrt"
    (pkg / "plugin").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tests.plugins.trt_stub import *  # noqa: F401,F403\n"
                                     "from tests.plugins.trt_stub import __version__  # noqa: F401\n")
    if source.is_dir():
        files = {p.name: p.read_text() for p in (source / "tensorrt_bindings" / "plugin").glob("*.py")}
    else:
        with zipfile.ZipFile(source) as wheel:
            files = {Path(n).name: wheel.read(n).decode() for n in wheel.namelist()
                     if re.fullmatch(r"tensorrt_bindings/plugin/[^/]+\.py", n)}
    if "_validate.py" not in files:
        raise FileNotFoundError(f"{source} has no tensorrt_bindings/plugin/_validate.py")
    for name, text in files.items():
        (pkg / "plugin" / name).write_text(text)
    sys.path.insert(0, str(root))
    return root


# input shapes per plugin: ints are static, strings are dimensions only known at run time
def _cases() -> dict[str, dict[str, Any]]:
    b, h, h_kv, d = 2, 8, 2, HEAD_DIM
    return {
        "LocalAttention": {"shapes": {"q": (b, h, "NQ", d), "k": (b, h_kv, "NK", d), "v": (b, h_kv, "NK", d),
                                      "q_pos": (b, "NQ"), "k_pos": (b, "NK")},
                           "envs": [{"NQ": 100, "NK": 300}, {"NQ": 1, "NK": 4096}]},
        "BlockSparseAttention": {"shapes": {"q": (b, h, "N", d), "k": (b, h_kv, "N", d), "v": (b, h_kv, "N", d),
                                            "q_pos": (b, "N"), "k_pos": (b, "N")},
                                 "envs": [{"N": 257}, {"N": 16}]},
        "PagedAttention": {"shapes": {"q": (b, h, "S", d), "k_pool": ("NB", 16, h_kv, d),
                                      "v_pool": ("NB", 16, h_kv, d), "block_table": (b, "MB"), "q_pos": (b, "S"),
                                      "seq_lens": (b,)},
                           "envs": [{"S": 1, "NB": 64, "MB": 32}, {"S": 7, "NB": 9, "MB": 3}]},
        "LinformerAttention": {"shapes": {"q": (b, h, "N", d), "k": (b, h_kv, "N", d), "v": (b, h_kv, "N", d),
                                          "e": (1, 128, "N"), "f": (1, 128, "N")},
                               "envs": [{"N": 1000}, {"N": 64}]},
        "NormalizedLinearAttention": {"shapes": {"q": (b, h, "N", d), "k": (b, h_kv, "N", d), "v": (b, h_kv, "N", d),
                                       "k_valid": (b, "N"), "omega": (FAVOR_M, d)},
                            "envs": [{"N": 333}]},
        "NormalizedLinearAttentionState": {"shapes": {"q": (b, h, "N", d), "k": (b, h_kv, "N", d), "v": (b, h_kv, "N", d),
                                            "s0": (b, h_kv, d, d), "z0": (b, h_kv, d), "omega": (1, d)},
                                 "envs": [{"N": 50}]},
        "NormalizedLinearAttentionState/decode": {"shapes": {"q": (b, h, 1, d), "k": (b, h_kv, 1, d), "v": (b, h_kv, 1, d),
                                                   "s0": (b, h_kv, d, d), "z0": (b, h_kv, d), "omega": (1, d)},
                                        "envs": [{}]},
    }


class _SymSetter(list):
    """IPluginV3QuickAOTBuild's symbolic-argument setter: TensorRT sizes it, the plugin fills it."""

    def __init__(self) -> None:
        super().__init__()
        self._n = 0

    @property
    def nbSymExprs(self) -> int:  # noqa: N802 (TensorRT's name)
        return self._n

    @nbSymExprs.setter
    def nbSymExprs(self, n: int) -> None:  # noqa: N802
        self._n = n
        self[:] = [None] * n


def _onnx_fields(trt, creator, attrs: dict[str, Any]):
    """What onnx-tensorrt's loadFields builds: the creator's field names in order, typed by the ONNX
    attribute type (INT -> int32, FLOAT -> float32, STRING -> char), absent attributes skipped."""
    import numpy as np

    fields = []
    for f in creator.field_names:
        if f.name not in attrs:
            continue
        value = attrs[f.name]
        if isinstance(value, str):
            fields.append(trt.PluginField(f.name, value.encode(), trt.PluginFieldType.CHAR))
        elif isinstance(value, float):
            fields.append(trt.PluginField(f.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        else:
            fields.append(trt.PluginField(f.name, np.array([value], np.int32), trt.PluginFieldType.INT32))
    return trt.PluginFieldCollection(fields)


def drive_plugin(trt, case_name: str, case: dict[str, Any], arch: int) -> dict[str, Any]:
    from effx.plugins.trt import PLUGIN_NAMESPACE, PLUGIN_SPECS

    name = case_name.split("/")[0]
    spec = PLUGIN_SPECS[name]
    creator = trt.get_plugin_registry().get_creator(name, "1", PLUGIN_NAMESPACE)
    facts: dict[str, Any] = {
        "case": case_name,
        "creator_fields": [[f.name, f.type.name] for f in creator.field_names],
    }
    plugin = creator.create_plugin(name, PLUGIN_NAMESPACE, _onnx_fields(trt, creator, ATTRS[name]),
                                   trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.STRICT_AOT)
    facts["plugin_class"] = type(plugin).__name__
    facts["attrs"] = {k: [type(v).__name__, v] for k, v in plugin.attrs.items()}
    float_t, int_t = trt.DataType.HALF, trt.DataType.INT64
    in_types = [int_t if n in spec.int_inputs else float_t for n in spec.inputs]
    shapes = [case["shapes"][n] for n in spec.inputs]
    facts["output_types"] = [t.name for t in plugin.get_output_data_types(in_types, [len(s) for s in shapes])]
    builder = trt.IExprBuilder()
    in_exprs = [trt.DimsExprs([trt.dim(x) for x in s]) for s in shapes]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    envs = case["envs"]
    facts["output_shapes"] = [[[e(env) for e in out] for out in out_exprs] for env in envs]

    def desc(shape, dtype):
        return trt.DynamicPluginTensorDesc(trt.PluginTensorDesc(tuple(x if isinstance(x, int) else -1 for x in shape),
                                                                dtype))

    ins = [desc(s, t) for s, t in zip(shapes, in_types, strict=True)]
    outs = [desc([e.get_constant_value() if e.is_constant() else "?" for e in out], float_t) for out in out_exprs]
    combos = plugin.get_supported_format_combinations(ins + outs, len(ins))
    width = len(ins) + len(outs)
    facts["type_combinations"] = [[c.type.name for c in combos[i:i + width]] for i in range(0, len(combos), width)]
    plugin.configure_plugin(ins, outs)
    facts["tactics"] = sorted(plugin.get_valid_tactics())
    facts["launches"] = []
    for tactic in facts["tactics"]:
        plugin.set_tactic(tactic)
        launch, setter = SimpleNamespace(), _SymSetter()
        plugin.get_launch_params(in_exprs, ins + outs, len(ins), launch, setter, builder)
        kernel_name, ptx = plugin.get_kernel([i.desc for i in ins], [o.desc for o in outs])
        ptx = ptx.decode()
        entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S).group(1)
        facts["launches"].append({
            "tactic": tactic,
            "kernel": kernel_name,
            "grid": [[getattr(launch, a).expr(env) for a in ("grid_x", "grid_y", "grid_z")] for env in envs],
            "block": [getattr(launch, a).expr({}) for a in ("block_x", "block_y", "block_z")],
            "shared_mem": launch.shared_mem.expr({}),
            "extra_args": [[x.expr(env) for x in setter] for env in envs],
            "extra_arg_types": [[x.type.name, x.dtype.name] for x in setter],
            "ptx_params": [p.strip().split()[1] for p in entry.split(",") if p.strip()],
            "ptx_target": re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1),
        })
    return facts


def validator_rejections(trtp) -> dict[str, str]:
    """The real validators must reject the mistakes the 11.4 rules warn about (proves they ran)."""
    from typing import Tuple, Union  # noqa: UP035 (the annotations TensorRT parses)

    out: dict[str, str] = {}

    def attempt(label, fn):
        try:
            fn()
            out[label] = "accepted"
        except Exception as exc:  # noqa: BLE001
            out[label] = f"{type(exc).__name__}: {exc}"

    attempt("reserved_namespace", lambda: trtp.register("trt::x")(_desc_one))
    attempt("list_attribute", lambda: trtp.register("effxcheck::listattr")(_desc_list))

    def aot_missing_return():
        trtp.register("effxcheck::noret")(_desc_one)

        def aot(x: trtp.TensorDesc, block: int, outputs: Tuple[trtp.TensorDesc], tactic: int):  # noqa: UP006
            return None

        trtp.aot_impl("effxcheck::noret")(aot)

    attempt("aot_without_return_annotation", aot_missing_return)

    def aot_skips_attribute():
        trtp.register("effxcheck::order")(_desc_two)

        def aot(x: trtp.TensorDesc, b: int, a: int, outputs: Tuple[trtp.TensorDesc], tactic: int  # noqa: UP006
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:  # noqa: UP006,UP007
            return None

        trtp.aot_impl("effxcheck::order")(aot)

    attempt("aot_attributes_out_of_order", aot_skips_attribute)
    return out


def _desc_one(x: Any, block: int):  # annotations are patched in main() once tensorrt.plugin exists
    return x.like()


def _desc_two(x: Any, a: int, b: int):
    return x.like()


def _desc_list(x: Any, sizes: list):
    return x.like()


def part_qdp(bindings: Path, arch: int) -> dict[str, Any]:
    install_bindings(bindings)
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from effx.plugins.trt import register_tensorrt_plugins

    for fn in (_desc_one, _desc_two, _desc_list):
        fn.__annotations__ |= {"x": trtp.TensorDesc, "return": trtp.TensorDesc}
    registered = register_tensorrt_plugins(arch=arch)
    again = register_tensorrt_plugins(arch=arch)  # idempotent
    report: dict[str, Any] = {"registered": registered, "registered_again": again, "arch": arch,
                              "public_api": sorted(trtp.__all__), "plugins": {}}
    for case_name, case in _cases().items():
        try:
            report["plugins"][case_name] = drive_plugin(trt, case_name, case, arch)
        except Exception:  # noqa: BLE001 - reported, the test shows it
            report["plugins"][case_name] = {"error": traceback.format_exc()}
    report["rejections"] = validator_rejections(trtp)
    return report


def main(argv: list[str]) -> int:
    out_path = Path(argv[0])
    bindings = Path(argv[1]) if len(argv) > 1 and argv[1] else None
    report: dict[str, Any] = {}
    try:
        report["ptx"] = part_ptx()
    except Exception:  # noqa: BLE001
        report["ptx_error"] = traceback.format_exc()
    try:
        report["torch_path"] = part_torch_path()
    except Exception:  # noqa: BLE001
        report["torch_path_error"] = traceback.format_exc()
    if bindings is not None:
        try:
            report["qdp"] = part_qdp(bindings, ARCHS[0])
        except Exception:  # noqa: BLE001
            report["qdp_error"] = traceback.format_exc()
    out_path.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
