"""ONNX Runtime targets: the chosen precision applied at graph level with ORT's own tools, plus an optimised
graph saved for ORT's C/C++ API.

- fp32: the exported graphs as they are (effx nodes + function bodies: portable to any ONNX runtime).
- fp16: onnxconverter-common, keeping float32 I/O (the effx function bodies are dtype-generic: CastLike).
- int8: a per-op plan (`int8_plan`, recorded in the manifest's build.extra["quantization"]): the MatMuls that
  read a weight (projections, MLP: most of the FLOPs) become int8; attention (ONNX `Attention`, effx nodes),
  Softmax, LayerNorm/RMSNorm, activations, residual adds and a decoder's LM head stay in float. On the CPU
  execution provider (calib "auto", the default, or "dynamic") ORT's dynamic quantizer does it: per-channel
  S8 weights and per-row U8 activations quantized at run time (MatMulInteger, VNNI), so no calibration
  range can clip real inputs. Elsewhere, or when a calibration source is named (random, text:FILE, .npz,
  token file), ORT's static QDQ quantizer calibrated on feeds from `effx.targets.calib` (all graph inputs;
  decode graphs on caches produced by the fp32 prefill graph). ORT's pre-processing is skipped on purpose:
  its optimizer inlines the effx functions (see ../shared/notes/onnx-export-recipes.md §5).
The effx nodes stay in float and survive both; `<graph>.ort.onnx` is ORT's extended-level optimised graph
(functions inlined), ready for `Ort::Session` with the recorded session options.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from effx.core.errors import CapabilityError, EffxError
from effx.core.lazy import lazy_import
from effx.core.manifest import BuildInfo, GraphSpec, Manifest
from effx.exporter.onnx_export import in_place_aliases
from effx.targets.calib import calibration_feeds, token_batches
from effx.targets.ort.runner import OrtRunner
from effx.targets.profiles import TargetProfile

INT8_OPS = ("MatMul", "Gemm")  # what effx hands ORT's quantizers: the weight products (see int8_plan)
DYNAMIC_INT8_OPS = INT8_OPS
# measured on this project's CPU (AMD EPYC, AVX-512 VNNI, 2 threads, ORT 1.32; benchmarks/int8_cpu.py,
# benchmarks/results/int8_cpu.json): all-MiniLM-L6-v2, batch 8 x 128 real sentences, mean-pooled embedding
# cosine vs transformers fp32, speed-up over effx fp32 in the same run
INT8_CHOICE = ("measured on all-MiniLM-L6-v2 (AVX-512 VNNI CPU): dynamic int8 on the weight MatMuls, per-channel "
               "S8 weights: embedding cosine 0.993, 1.56x fp32; static QDQ calibrated on real text: 0.929, 1.40x "
               "(Q/DQ on every op: 0.80): a calibrated activation range clips real text's outliers, a per-run "
               "range cannot, and ORT's U8S8 MatMul kernels are as fast with either")
SESSION_OPTIONS = {"graph_optimization_level": "ORT_ENABLE_EXTENDED", "intra_op_num_threads": 0,
                   "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL"}


def _effx_count(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.domain == "effx")


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizer logs known-harmless warnings on the root logger (pre-processing is skipped on purpose;
    per-channel axis on LayerNorm weights): keep them out of effx's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # some ORT versions call it between calibration passes
        pass


def build_ort(src: Path, manifest: Manifest, target: TargetProfile, precision: str, calib: str, samples: int,
              dla_core: int | None, out: Path, say: Callable[[str], None]) -> BuildInfo:
    """The graphs of `src` at `precision` in `out` (dla_core: ONNX Runtime targets have no DLA; the
    capability check has refused it already)."""
    if precision not in ("fp32", "fp16", "int8"):
        raise CapabilityError(f"--precision {precision} is not available on ONNX Runtime targets (fp32, fp16, int8)")
    feeds = None
    dynamic = calib == "dynamic" or (calib == "auto" and list(target.ort_providers) == ["CPUExecutionProvider"])
    calibration = None
    if precision == "int8" and not dynamic:
        source = "random" if calib == "auto" else calib
        say(f"calibrating on {samples} batches ({source})")
        described: dict = {}
        batches = token_batches(manifest, source, samples, folder=src, info=described)
        with OrtRunner(src, manifest) as fp32:  # decoder caches come from the fp32 graphs
            feeds = calibration_feeds(manifest, batches, fp32)
        calibration = {"source": source, "batches": len(batches), "shape": list(batches[0].shape),
                       "inputs": {name: sorted(f[0]) for name, f in feeds.items()}} | described
    plans: dict[str, dict] = {}
    graphs: dict[str, GraphSpec] = {}
    for name, g in manifest.graphs.items():
        say(f"{precision} {g.file}")
        src_path, dst = src / g.file, out / g.file
        before = _effx_count(onnx.load(str(src_path), load_external_data=False))
        if precision == "fp32":
            shutil.copyfile(src_path, dst)
            data = src_path.with_suffix(".onnx.data")
            if data.exists():
                shutil.copyfile(data, dst.with_suffix(".onnx.data"))
        elif precision == "fp16":
            float16 = lazy_import("onnxconverter_common.float16", extra="quant", purpose="fp16 conversion")
            # Cast and ConstantOfShape carry their float type in an attribute the converter leaves alone:
            # keep them in fp32 and let the converter cast around them
            blocked = list(float16.DEFAULT_OP_BLOCK_LIST) + ["Cast", "ConstantOfShape"]
            with warnings.catch_warnings():  # float32 lowest (mask fill) -> fp16 -1e4: still masks after softmax
                warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
                m16 = float16.convert_float_to_float16(_split_consumed_outputs(onnx.load(str(src_path))),
                                                       keep_io_types=True, op_block_list=blocked)
            # the converter rewrites value_info to fp16 even where a blocked op keeps a tensor in fp32 (seen on
            # the hourglass's pooled positions); value_info is optional: drop it, shape inference recomputes it
            del m16.graph.value_info[:]
            onnx.save_model(m16, str(dst))
        else:
            # the exporter writes x @ W^T as MatMul(x, Transpose(W)); ORT's quantizers quantize weights only
            # where MatMul reads an initializer, so the transposes are folded into the weights first
            model = fold_weight_transposes(onnx.load(str(src_path)))
            plan = int8_plan(model)
            plans[name] = plan
            if not plan["int8"]:  # nothing to quantize (ORT reads an empty node list as "every node")
                onnx.save_model(model, str(dst))
            elif feeds is None:
                # the weight products only: left to itself ORT's dynamic quantizer would also rewrite ONNX
                # Attention (opset 23) into com.microsoft.QAttention, which rejects Attention's attributes
                # (is_causal, ...)
                with _quiet_root_logger():
                    quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, per_channel=True,
                                     op_types_to_quantize=list(INT8_OPS), nodes_to_quantize=plan["int8"])
            else:
                # U8 activations / S8 weights: ORT's CPU default (its int8 kernels are U8S8); the same ops as the
                # dynamic path: Q/DQ around norms, softmax inputs and residual adds cost accuracy (measured
                # cosine 0.80 vs 0.93 on MiniLM) and ORT runs those ops in float anyway
                with _quiet_root_logger():
                    quantize_static(model, str(dst), _Reader(feeds[name]), quant_format=QuantFormat.QDQ,
                                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    op_types_to_quantize=list(INT8_OPS), nodes_to_quantize=plan["int8"])
        built = onnx.load(str(dst), load_external_data=False)
        if built.ir_version > 10:
            built.ir_version = 10  # ORT 1.31 reads <= 13; keep what the exporter wrote
            onnx.save_model(built, str(dst))
        if _effx_count(built) != before:
            raise EffxError(f"{precision} conversion of {g.file} lost effx nodes ({before} -> {_effx_count(built)})")
        onnx.checker.check_model(str(dst), full_check=True)
        _save_optimized(dst, out / f"{name}.ort.onnx", target)
        # conversions may put casts or Q/DQ around a cache write: alias only what the built graph still proves
        graphs[name] = g.model_copy(update={"file": g.file, "aliases": in_place_aliases(built)})
    return BuildInfo(target=target.name, backend="ort", precision=precision, engine_built=True, graphs=graphs,
                     session_options=SESSION_OPTIONS | {"providers": list(target.ort_providers),
                                                        "optimized_graphs": {n: f"{n}.ort.onnx" for n in graphs}},
                     extra={"calibration": calibration} | _quantization_record(precision, dynamic, plans))


def int8_plan(model: onnx.ModelProto) -> dict:
    """Which nodes of the (transpose-folded) graph run in int8 (the quantizers get exactly these names) and which
    stay in float. Unnamed nodes get a name first: ORT's quantizers select nodes by name."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"effx_{n.op_type}_{i}"
    inits = {t.name for t in model.graph.initializer}
    weight_products = [n.name for n in model.graph.node if n.op_type in INT8_OPS and any(i in inits for i in n.input)]
    head = head_nodes(model)
    kinds: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == "effx" or n.op_type in ("Attention", "Softmax", "LayerNormalization", "RMSNormalization",
                                               "SimplifiedLayerNormalization"):
            key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
            kinds[key] = kinds.get(key, 0) + 1
    return {"int8": sorted(set(weight_products) - set(head)),
            "float": {"lm_head": head, "ops": kinds,
                      "activation_products": [n.name for n in model.graph.node if n.op_type in INT8_OPS
                                              and not any(i in inits for i in n.input)]}}


def _quantization_record(precision: str, dynamic: bool, plans: dict[str, dict]) -> dict:
    if precision != "int8":
        return {}
    scheme = ("dynamic int8 (ORT quantize_dynamic): per-channel S8 weights, U8 activations quantized per run"
              if dynamic else "static int8 QDQ (ORT quantize_static): per-channel S8 weights, calibrated U8 "
              "activations")
    return {"quantization": {
        "scheme": scheme,
        "int8_ops": [f"{op} with a weight input" for op in INT8_OPS],
        "float": "attention (ONNX Attention, effx nodes), Softmax, LayerNorm/RMSNorm, activations, residual adds, "
                 "activation x activation products (attention scores), the LM head: ORT runs them in float, "
                 "and their Q/DQ costs accuracy (outliers) for no time",
        "why": INT8_CHOICE if dynamic else "a calibration source was named (static QDQ is what TensorRT and the "
               "CUDA execution provider run); on the CPU the default (--calib auto) is dynamic: " + INT8_CHOICE,
        "graphs": {name: {"int8_nodes": len(p["int8"]), "float": p["float"]} for name, p in plans.items()}}}


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes that produce a decoder's logits (through elementwise ops such as
    soft-capping): the LM head, which int8 builds keep in float (a quantised head flips near-tied tokens)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for name in [o.name for o in model.graph.output if o.name == "logits"]:
        node = producers.get(name)
        while node is not None and node.op_type in ("Tanh", "Mul", "Div", "Identity", "Cast"):
            node = next((producers[i] for i in node.input if i in producers), None)
        if node is not None and node.op_type in ("MatMul", "Gemm") and node.name:
            out.append(node.name)
    return out


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every Transpose of an initializer in the main graph by the transposed initializer."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = onnx.numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)),
                                                                  node.output[0]))
            consumers[node.input[0]] -= 1
            folded += 1
            continue
        keep.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        unused = [t for t in graph.initializer if consumers.get(t.name, 1) == 0]
        for t in unused:
            graph.initializer.remove(t)
    return model


def _split_consumed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every graph output that nodes also read (a decoder's present.* cache: returned and attended to in
    the same step) its own Identity, so the fp16 converter's float32 output cast does not feed the fp16 ops
    that read the tensor inside the graph."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    read = {i for n in graph.node for i in n.input} & outputs
    for name in sorted(read):
        inner = f"{name}__inner"
        for n in graph.node:
            n.output[:] = [inner if o == name else o for o in n.output]
            n.input[:] = [inner if i == name else i for i in n.input]
        graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}__output"))
    return model


def _save_optimized(src: Path, dst: Path, target: TargetProfile) -> None:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3  # fp16 graphs: "cannot constant fold" notices about ops ORT has no CPU fp16 kernel for
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
