"""ONNX Runtime targets: the chosen precision applied at graph level with ORT's own tools, plus an optimised
graph saved for ORT's C/C++ API.

- fp32: the exported graphs as they are (effx nodes + function bodies: portable to any ONNX runtime).
- fp16: onnxconverter-common, keeping float32 I/O (the effx function bodies are dtype-generic: CastLike).
- int8: ORT's static QDQ quantizer (int8 weights per channel, uint8 activations: ORT's CPU kernels) calibrated on feeds
  from `effx.targets.calib` (decode graphs are calibrated on caches produced by the fp32 prefill graph);
  a decoder's LM head (the MatMul producing logits) stays in float;
  `int8` with calib="dynamic" uses ORT's dynamic quantizer instead. ORT's pre-processing is skipped on
  purpose: its optimizer inlines the effx functions (see ../shared/notes/onnx-export-recipes.md §5).
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
from effx.targets.calib import calibration_feeds, token_batches
from effx.targets.ort.runner import OrtRunner
from effx.targets.profiles import TargetProfile

DYNAMIC_INT8_OPS = ("MatMul",)  # what effx hands ORT's dynamic quantizer (see build_ort)
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
    if precision == "int8" and calib != "dynamic":
        say(f"calibrating on {samples} batches ({calib})")
        with OrtRunner(src, manifest) as fp32:  # decoder caches come from the fp32 graphs
            feeds = calibration_feeds(manifest, token_batches(manifest, calib, samples), fp32)
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
            keep_float = head_nodes(model)  # the LM head stays in float: logits decide tokens
            if feeds is None:
                # MatMul only: ORT's dynamic quantizer would also rewrite ONNX Attention (opset 23) into
                # com.microsoft.QAttention, which rejects Attention's attributes (is_causal, ...): attention
                # stays in float, the projections and the MLP (most of the FLOPs) run as MatMulInteger
                with _quiet_root_logger():
                    quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, per_channel=True,
                                     op_types_to_quantize=list(DYNAMIC_INT8_OPS), nodes_to_exclude=keep_float)
            else:
                # U8 activations / S8 weights: ORT's CPU default (its int8 kernels are U8S8)
                with _quiet_root_logger():
                    quantize_static(model, str(dst), _Reader(feeds[name]), quant_format=QuantFormat.QDQ,
                                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    nodes_to_exclude=keep_float)
        built = onnx.load(str(dst), load_external_data=False)
        if built.ir_version > 10:
            built.ir_version = 10  # ORT 1.31 reads <= 13; keep what the exporter wrote
            onnx.save_model(built, str(dst))
        if _effx_count(built) != before:
            raise EffxError(f"{precision} conversion of {g.file} lost effx nodes ({before} -> {_effx_count(built)})")
        onnx.checker.check_model(str(dst), full_check=True)
        _save_optimized(dst, out / f"{name}.ort.onnx", target)
        graphs[name] = g.model_copy(update={"file": g.file})
    return BuildInfo(target=target.name, backend="ort", precision=precision, engine_built=True, graphs=graphs,
                     session_options=SESSION_OPTIONS | {"providers": list(target.ort_providers),
                                                        "optimized_graphs": {n: f"{n}.ort.onnx" for n in graphs}},
                     extra={"calibration": None if feeds is None else {"source": calib, "batches": samples}})


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
