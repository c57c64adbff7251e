"""torch -> ONNX for one graph: effx ops become bare `effx::<Op>` nodes, and their model-local functions
(standard ONNX bodies) are attached after export, since torch.onnx always inlines functions it sees."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import torch

from effx.core.errors import EffxError
from effx.core.flavours import DEFAULT_ATTENTION_OPS, ONNX, resolve_attention_ops
from effx.core.options import ATTENTION_OPSET
from effx.exporter.graphs import GraphPlan
from effx.models.attention import attention_flavours, attention_impl_override, export_opset
from effx.plugins import OPS
from effx.plugins.cache_write import TRANSLATIONS as CACHE_WRITES
from effx.plugins.linear import TRANSLATIONS as LINEAR_STANDARD
from effx.plugins.onnx_body import STAGED, STAGING_DOMAIN, Body, make_function
from effx.plugins.opspec import DOMAIN
from effx.plugins.standard import TRANSLATIONS as STANDARD_OPS
from effx.plugins.trt import PLUGIN_SPECS, node_attributes

IR_VERSION = 10  # what torch writes; ONNX Runtime 1.31 reads <= 13
# the newest opset torch.onnx reaches (its version converter stops at 25; at 26/27 it falls back to onnx's C API,
# which has no adapters for ops like Gelu and leaves the graph at 18): newer graphs are traced at this opset and
# raised afterwards (raise_opset)
TRACE_OPSET = 25
# ops whose ai.onnx version changed between TRACE_OPSET and a newer opset without changing what the traced
# graph computes: Range-27 only adds fp16/bf16 and their accumulation type (stash_type)
UNCHANGED_FOR_TRACED = {"Range"}
TWO_GB = 2**31


class ExportError(EffxError):
    """The exporter produced something effx cannot stand behind."""


def translation_table() -> dict:

    table = dict(CACHE_WRITES) | LINEAR_STANDARD | STANDARD_OPS
    for spec in OPS.values():
        overload = spec.torch_op._opoverload
        table[overload] = spec.translation
    return table


def stamp_plugin_nodes(model: onnx.ModelProto) -> int:
    """Make effx nodes TensorRT-plugin ready: plugin_namespace/plugin_version/aot=1 (the QDP AOT rules), and
    the inputs a plugin's fixed signature needs but the node may omit (an unread (1, D) omega for elu)."""
    stamped = 0
    for node in _all_nodes(model.graph):
        if node.domain != DOMAIN or node.op_type not in PLUGIN_SPECS:
            continue
        for key, value in node_attributes().items():
            if not any(a.name == key for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute(key, value))
        if node.op_type in ("NormalizedLinearAttention", "NormalizedLinearAttentionState"):
            want = 5 if node.op_type == "NormalizedLinearAttention" else 6
            if len(node.input) < want or not node.input[want - 1]:
                head_dim = _head_dim(model, node.input[0])
                name = "effx.omega_placeholder"
                if not any(i.name == name for i in model.graph.initializer):
                    model.graph.initializer.append(onnx.numpy_helper.from_array(
                        np.zeros((1, head_dim), "float32"), name))
                while len(node.input) < want - 1:
                    node.input.append("")
                if len(node.input) < want:
                    node.input.append(name)
                else:
                    node.input[want - 1] = name
        stamped += 1
    return stamped


def _head_dim(model: onnx.ModelProto, value: str) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        if v.name == value:
            return v.type.tensor_type.shape.dim[-1].dim_value
    raise ExportError(f"cannot find the head dimension of {value} for the plugin placeholder")


def export_graph(plan: GraphPlan, opset: int, attention_ops: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """Export one graph and attach the effx functions; returns a checked ModelProto."""
    # below opset 23 SDPA would decompose with sqrt-scaled Q and K; the math path scales Q alone
    # `attention_ops` (effx.core.flavours, complete): the target's op flavour per attention site; full=effx
    # asks for the same math path
    choice = resolve_attention_ops(attention_ops or DEFAULT_ATTENTION_OPS)
    impl = None if opset >= ATTENTION_OPSET and choice["full"] == ONNX else "math"
    # a module taking *args gets its dynamic shapes as one entry for the varargs
    dynamic_shapes = (plan.dynamic_shapes,) if plan.varargs else plan.dynamic_shapes
    with warnings.catch_warnings(), attention_impl_override(impl), export_opset(opset), \
            attention_flavours(choice), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            plan.module, plan.args, dynamo=True, opset_version=min(opset, TRACE_OPSET), input_names=plan.input_names,
            output_names=plan.output_names, dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(), optimize=False, verbose=False, report=False,
        )
    model = program.model_proto
    # intermediate shapes carry the exporter's symbolic expressions (Min/Max of floor divisions for pooled
    # caches); ONNX Runtime plans buffer reuse from equal dim names and can trip on them: let it infer its own
    del model.graph.value_info[:]
    raise_opset(model, opset)
    attach_functions(model, opset)
    model.ir_version = min(model.ir_version, IR_VERSION)
    check_dims(model, plan)
    onnx.checker.check_model(model, full_check=True)
    return model


@contextlib.contextmanager
def _quiet_exporter():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def raise_opset(model: onnx.ModelProto, opset: int) -> None:
    """Bring a graph traced at TRACE_OPSET to `opset` (no-op at or below it): every traced op must mean the same at
    `opset`, and the standard ops emitted in the staging domain (newer than the trace) move into ai.onnx."""
    traced = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for node in _all_nodes(model.graph):
        if node.domain == STAGING_DOMAIN:
            if opset < STAGED[node.op_type]:
                raise ExportError(f"{node.op_type} is ai.onnx opset {STAGED[node.op_type]}, the graph's is {opset}: "
                                  f"the model chose it for a graph it should not have (report this with the spec)")
            node.domain = ""
        elif node.domain in ("", "ai.onnx") and opset > traced and node.op_type not in UNCHANGED_FOR_TRACED:
            old, new = (onnx.defs.get_schema(node.op_type, v).since_version for v in (traced, opset))
            if old != new:
                raise ExportError(f"{node.op_type} changed between opset {traced} (what torch.onnx traces) and "
                                  f"{opset}; export with --opset {traced}")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    kept = [o for o in model.opset_import if o.domain != STAGING_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def attach_functions(model: onnx.ModelProto, opset: int) -> None:
    """Add one model-local function per effx op used, built for this model's ai.onnx opset."""
    nodes = [n for n in _all_nodes(model.graph) if n.domain == DOMAIN]
    for node in nodes:  # omitted optional inputs as "": a function call passes every declared input
        node.input.extend([""] * (len(OPS[node.op_type].inputs) - len(node.input)))
    for op_type in sorted({n.op_type for n in nodes}):
        spec = OPS[op_type]
        static = {}
        for name in spec.structural:
            values = {_attr_value(n, name) for n in nodes if n.op_type == op_type}
            if len(values) != 1:
                raise ExportError(f"{op_type} nodes disagree on {name} ({sorted(values)}); one model uses one value")
            static[name] = values.pop()
        body = Body(op_type.lower())
        inputs, outputs = spec.build_body(body, static)
        model.functions.append(make_function(spec, opset, body, inputs, outputs))
    if nodes and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))


def _attr_value(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    raise ExportError(f"{node.op_type} node {node.name} has no attribute {name}")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def custom_op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in _all_nodes(model.graph) if n.domain == DOMAIN)


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plain-ONNX variant: every local function inlined, no custom domain left."""
    flat = onnx.inliner.inline_local_functions(model)
    del flat.functions[:]
    keep = [o for o in flat.opset_import if o.domain != DOMAIN]
    del flat.opset_import[:]
    flat.opset_import.extend(keep)
    onnx.checker.check_model(flat, full_check=True)
    return flat


def in_place_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Graph outputs a runtime may write into the buffer of a graph input: output -> input. Safe where the
    output is made by a ScatterND whose data is the input and no other node reads the input's values (Shape
    reads only its shape): then the scatter is the input's last reader, and ONNX Runtime's kernel skips its copy
    when the two share memory."""
    inputs = {i.name for i in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}
    aliases = {}
    for out in model.graph.output:
        node = producer.get(out.name)
        if node is None or node.op_type != "ScatterND" or node.domain not in ("", "ai.onnx"):
            continue
        data = node.input[0]
        readers = [n for n in _all_nodes(model.graph) if data in n.input and n is not node]
        if data in inputs and all(n.op_type == "Shape" for n in readers):
            aliases[out.name] = data
    return aliases


def check_dims(model: onnx.ModelProto, plan: GraphPlan) -> None:
    """The exporter can silently fix a dynamic dim to its example value: refuse such a graph."""
    by_name = {i.name: i for i in model.graph.input}
    for name, dims in zip(plan.input_names, plan.dynamic_shapes, strict=True):
        shape = by_name[name].type.tensor_type.shape.dim
        for axis in dims:
            if not shape[axis].dim_param:
                raise ExportError(
                    f"{plan.name}.onnx input {name} axis {axis} came out fixed at {shape[axis].dim_value}; "
                    "the exporter specialised a dynamic dimension (report this with the spec)"
                )


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write the model; weights go to external data when the file would pass protobuf's 2 GB limit."""
    if model.ByteSize() < TWO_GB:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_suffix(".onnx.data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]
