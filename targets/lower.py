"""Graph lowering for a target: rewrite what a target's TensorRT cannot parse into what it can, or refuse
with one line before any engine work.

Two rewrites, both plain ONNX and both checked by ONNX Runtime in the tests (outputs unchanged):
* ONNX `Attention` (opset 23-25) becomes MatMul -> Softmax -> MatMul with Q pre-scaled by the attention
  scale (TensorRT fuses MHA only when Q or K is scaled before the first MatMul), for TensorRT before 10.14
  (no Attention importer) and wherever an Attention node breaks 10.14's restrictions (a subgraph, extra
  outputs, softcap). Causal, sliding-window (opset 25), boolean/additive masks and grouped KV heads are
  written out as the ONNX reference defines them (onnx/reference/ops/op_attention.py, no-cache case).
* The ai.onnx opset is re-stamped down to the target's newest (TensorRT 10.0-10.13: 20) where every node
  allows it: the node's op has the same inputs, outputs and attributes at the lower opset (the versions
  in between only added types) and its input types exist there. Otherwise the refusal names the node.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from effx.core.errors import CapabilityError


class TrtFacts(Protocol):
    """What lowering reads of a facts row (effx.targets.compat.TrtFacts, which imports this module)."""

    asked: str
    max_opset: int
    ops: dict[str, dict[str, Any]]

    def has(self, feature: str) -> bool: ...

_OUTPUT_NAMES = ("Y", "present_key", "present_value", "qk_matmul_output")


def lower_models(models: dict[str, onnx.ModelProto], facts: TrtFacts) -> tuple[dict[str, onnx.ModelProto], list[str]]:
    """Every graph lowered for TensorRT `facts.asked`; notes say what was rewritten."""
    out, notes = {}, []
    for name, model in models.items():
        out[name], done = lower_for_tensorrt(model, facts, name)
        notes += done
    return out, notes


def lower_for_tensorrt(model: onnx.ModelProto, facts: TrtFacts, name: str = "graph") -> tuple[onnx.ModelProto, list[str]]:
    model = copy.deepcopy(model)
    notes: list[str] = []
    opset = _opset(model)
    typed = _infer(model)
    n = _rewrite_attention(model.graph, facts, typed, opset, name, depth=0)
    if n:
        notes.append(f"{name}: {n} ONNX Attention node(s) -> MatMul/Softmax (Q pre-scaled) for TensorRT {facts.asked}")
    typed = _infer(model)
    rewritten = _rewrite_types(model.graph, facts, typed)
    if rewritten:
        notes.append(f"{name}: {rewritten} integer Clip / boolean Equal node(s) -> Max/Min / Not(Xor) "
                     f"(TensorRT {facts.asked} takes Clip in floats, Equal in numbers)")
    folded = _fold_constant_inputs(model, facts, typed)
    if folded:
        notes.append(f"{name}: {folded} computed axes input(s) folded to initializers (TensorRT wants them constant)")
    if opset > facts.max_opset:
        _restamp(model, opset, facts.max_opset, name, _infer(model))
        notes.append(f"{name}: ai.onnx opset {opset} -> {facts.max_opset} (TensorRT {facts.asked}'s newest)")
    return model, notes


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _infer(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {v.name: v.type for v in [*g.input, *g.output, *g.value_info]}
    for init in g.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def _dims(types: dict[str, onnx.TypeProto], value: str) -> list[int | None] | None:
    t = types.get(value)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]


def _elem(types: dict[str, onnx.TypeProto], value: str) -> int:
    t = types.get(value)
    return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else TensorProto.FLOAT


def _attention_needs_lowering(node: onnx.NodeProto, facts: TrtFacts, opset: int, depth: int) -> bool:
    if not facts.has("onnx_attention") or depth > 0:
        return True
    since = onnx.defs.get_schema("Attention", opset, "").since_version
    if since > facts.max_opset:
        return True
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode", 0):
        return True
    if attrs.get("left_window_size", -1) != -1 or attrs.get("right_window_size", -1) != -1:
        return True
    return any(node.input[i] for i in range(4, len(node.input))) or any(node.output[i] for i in range(1, len(node.output)))


def _rewrite_attention(graph: onnx.GraphProto, facts: TrtFacts, types: dict, opset: int, name: str, depth: int) -> int:
    count = 0
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for attr in node.attribute:  # subgraphs first (an Attention inside an If never imports: #4739)
            if attr.type == onnx.AttributeProto.GRAPH:
                count += _rewrite_attention(attr.g, facts, types, opset, name, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    count += _rewrite_attention(g, facts, types, opset, name, depth + 1)
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and \
                _attention_needs_lowering(node, facts, opset, depth):
            new_nodes += _decompose_attention(node, types, graph, name)
            count += 1
        else:
            if node.op_type == "Attention":  # kept for IAttention: drop attributes at their defaults, which
                # TensorRT's importer lists as unsupported whatever their value
                keep = [a for a in node.attribute if not (a.name in ("softcap", "qk_matmul_output_mode")
                                                          and not helper.get_attribute_value(a))]
                del node.attribute[:]
                node.attribute.extend(keep)
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def _decompose_attention(node: onnx.NodeProto, types: dict, graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    where = f"{name}: node {node.name!r} (Attention)"
    attrs: dict[str, Any] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    extra_in = [node.input[i] for i in range(4, len(node.input)) if node.input[i]]
    extra_out = [node.output[i] for i in range(1, len(node.output)) if node.output[i]]
    if extra_in or extra_out or attrs.get("qk_matmul_output_mode", 0):
        raise CapabilityError(f"{where}: past_key/past_value/nonpad_kv_seqlen inputs or present/qk outputs cannot be "
                              "lowered for TensorRT (it takes one output); export with --opset 20 (effx writes "
                              "the attention out in MatMul/Softmax there)")
    q, k, v = node.input[0], node.input[1], node.input[2]
    mask = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    qd, kd = _dims(types, q), _dims(types, k)
    if qd is None or kd is None or len(qd) != 4 or len(kd) != 4:
        raise CapabilityError(f"{where}: only 4-D (B, heads, seq, head_dim) Q/K/V can be lowered for TensorRT "
                              "(3-D or unknown rank here); export with --opset 20")
    dtype = _elem(types, q)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    tag = (node.name or node.output[0]).replace("/", "_") + "_lowered"
    nodes: list[onnx.NodeProto] = []

    def const(suffix: str, value) -> str:
        out = f"{tag}/{suffix}"
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), out))
        return out

    def op(kind: str, inputs: list[str], suffix: str, **kw) -> str:
        out = f"{tag}/{suffix}"
        nodes.append(helper.make_node(kind, inputs, [out], name=f"{tag}/{suffix}", **kw))
        return out

    scale = attrs.get("scale")
    if scale is None and qd[3] is not None:
        scale = 1.0 / float(np.sqrt(qd[3]))
    if scale is not None:
        scale_t = const("scale", np.array(scale, dtype=np_dtype))
    else:  # head size only known at run time: 1/sqrt(Shape(Q)[3])
        dim = op("Shape", [q], "head_dim", start=3, end=4)
        fdim = op("Cast", [dim], "head_dim_f", to=dtype)
        scale_t = op("Reciprocal", [op("Sqrt", [fdim], "sqrt_head_dim")], "scale")
    q_scaled = op("Mul", [q, scale_t], "q_scaled")  # scale Q before BMM1: TensorRT's MHA fusion needs it there
    hq, hkv = qd[1], kd[1]
    if hq is None or hkv is None or hq != hkv:
        # grouped KV heads (ONNX Attention takes fewer K/V heads than Q heads): repeat each KV head hq/hkv times.
        # Head counts that shape inference could not pin down are read at run time (a group of 1 is a no-op).
        axes = const("axis2", np.array([2], dtype=np.int64))
        qs = op("Shape", [q], "q_shape")
        q_heads = op("Slice", [qs, const("q_h1", np.array([1], np.int64)), const("q_h2", np.array([2], np.int64))],
                     "q_heads")

        def repeat(x: str, label: str) -> str:
            xs = op("Shape", [x], f"{label}_shape")
            b_h = op("Slice", [xs, const(f"{label}_s0", np.array([0], np.int64)), const(f"{label}_s2", np.array([2], np.int64))], f"{label}_bh")
            s_d = op("Slice", [xs, const(f"{label}_t2", np.array([2], np.int64)), const(f"{label}_t4", np.array([4], np.int64))], f"{label}_sd")
            kv_heads = op("Slice", [xs, const(f"{label}_h1", np.array([1], np.int64)), const(f"{label}_h2", np.array([2], np.int64))], f"{label}_heads")
            group = op("Div", [q_heads, kv_heads], f"{label}_group")
            full = op("Concat", [b_h, group, s_d], f"{label}_full", axis=0)
            grown = op("Expand", [op("Unsqueeze", [x, axes], f"{label}_u"), full], f"{label}_grown")
            batch = op("Slice", [xs, const(f"{label}_b0", np.array([0], np.int64)), const(f"{label}_b1", np.array([1], np.int64))], f"{label}_b")
            shape = op("Concat", [batch, q_heads, s_d], f"{label}_rep_shape", axis=0)  # (B, hq, S, D)
            return op("Reshape", [grown, shape], f"{label}_rep")

        k, v = repeat(k, "k"), repeat(v, "v")
    scores = op("MatMul", [q_scaled, op("Transpose", [k], "k_t", perm=[0, 1, 3, 2])], "scores")
    softcap = float(attrs.get("softcap", 0.0) or 0.0)
    if softcap > 0:
        cap = const("softcap", np.array(softcap, dtype=np_dtype))
        scores = op("Mul", [op("Tanh", [op("Div", [scores, cap], "capped_in")], "capped"), cap], "scores_capped")
    bias_terms: list[str] = []
    zero, ninf = const("zero", np.array(0, dtype=np_dtype)), const("ninf", np.array(-np.inf, dtype=np_dtype))
    if mask:
        if _elem(types, mask) == TensorProto.BOOL:
            bias_terms.append(op("Where", [mask, zero, ninf], "mask_bias"))
        else:
            bias_terms.append(mask)
    causal = bool(attrs.get("is_causal", 0))
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))
    if causal or left >= 0 or right >= 0:
        # no cache here, so the reference's offset is 0: query i may see key j iff j <= i (causal) and
        # i - left <= j <= i + right (windows)
        one = const("one_i", np.array(1, np.int64))
        zero_i = const("zero_i", np.array(0, np.int64))
        sq = op("Squeeze", [op("Shape", [q], "sq", start=2, end=3)], "sq0")
        skv = op("Squeeze", [op("Shape", [k], "skv", start=2, end=3)], "skv0")
        rows = op("Unsqueeze", [op("Range", [zero_i, sq, one], "rows"), const("ax1", np.array([1], np.int64))], "rows_col")
        cols = op("Range", [zero_i, skv, one], "cols")
        diff = op("Sub", [rows, cols], "diff")  # i - j, (Sq, Skv)
        allowed = []
        if causal:
            allowed.append(op("GreaterOrEqual", [diff, zero_i], "causal"))
        if left >= 0:
            allowed.append(op("LessOrEqual", [diff, const("left", np.array(left, np.int64))], "left_ok"))
        if right >= 0:
            allowed.append(op("GreaterOrEqual", [diff, const("right", np.array(-right, np.int64))], "right_ok"))
        ok = allowed[0]
        for i, a in enumerate(allowed[1:]):
            ok = op("And", [ok, a], f"allowed_{i}")
        bias_terms.append(op("Where", [ok, zero, ninf], "position_bias"))
    bias = ""
    for i, term in enumerate(bias_terms):
        bias = term if not bias else op("Add", [bias, term], f"bias_{i}")
    if bias:
        scores = op("Add", [scores, bias], "scores_biased")
    probs = op("Softmax", [scores], "probs", axis=-1)
    if bias:  # rows with every key masked give 0, as the ONNX reference does (Softmax alone gives NaN)
        row_max = op("ReduceMax", [bias, const("last_axis", np.array([-1], np.int64))], "bias_row_max", keepdims=1)
        seen = op("Greater", [row_max, ninf], "row_sees_a_key")
        probs = op("Where", [seen, probs, zero], "probs_guarded")
    nodes.append(helper.make_node("MatMul", [probs, v], [node.output[0]], name=f"{tag}/out"))
    return nodes


def _rewrite_types(graph: onnx.GraphProto, facts: TrtFacts, types: dict) -> int:
    """Integer Clip -> Max/Min and boolean Equal -> Not(Xor): same values, in ops TensorRT types take.
    torch.clamp on indices and == on masks export to these; TensorRT's table has Clip in floats only and
    Equal without BOOL."""
    clip = set(facts.ops.get("Clip", {}).get("types", []))
    equal = set(facts.ops.get("Equal", {}).get("types", []))
    count, new_nodes = 0, []
    for node in graph.node:
        first = node.input[0] if node.input else ""
        elem = types[first].tensor_type.elem_type if first in types else 0
        if node.op_type == "Clip" and node.domain in ("", "ai.onnx") and elem in (TensorProto.INT64, TensorProto.INT32) \
                and "INT64" not in clip:
            x = first
            if len(node.input) > 1 and node.input[1]:
                x_next = f"{node.output[0]}/clip_low"
                new_nodes.append(helper.make_node("Max", [x, node.input[1]], [x_next], name=f"{node.name}/max"))
                x = x_next
            if len(node.input) > 2 and node.input[2]:
                x_next = f"{node.output[0]}/clip_high"
                new_nodes.append(helper.make_node("Min", [x, node.input[2]], [x_next], name=f"{node.name}/min"))
                x = x_next
            new_nodes.append(helper.make_node("Identity", [x], [node.output[0]], name=node.name))
            count += 1
        elif node.op_type == "Equal" and node.domain in ("", "ai.onnx") and elem == TensorProto.BOOL \
                and "BOOL" not in equal:
            differ = f"{node.output[0]}/xor"
            new_nodes.append(helper.make_node("Xor", list(node.input), [differ], name=f"{node.name}/xor"))
            new_nodes.append(helper.make_node("Not", [differ], [node.output[0]], name=node.name))
            count += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def _fold_constant_inputs(model: onnx.ModelProto, facts: TrtFacts, types: dict) -> int:
    """Inputs TensorRT wants constant (Reduce/Slice/Squeeze `axes`, CumSum `axis`) that the exporter computed
    from constants only (Reshape of a Constant, ...): evaluate them here and store initializers."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    known = {i.name for i in graph.initializer}
    opset = _opset(model)
    folded = 0
    for node in list(graph.node):
        rules = facts.ops.get(node.op_type, {}).get("rules", [])
        names = [r["const_input"] for r in rules if "const_input" in r]
        if not names or node.domain not in ("", "ai.onnx"):
            continue
        formal = [f.name for f in onnx.defs.get_schema(node.op_type, opset, "").inputs]
        for want in names:
            if want not in formal or formal.index(want) >= len(node.input):
                continue
            value = node.input[formal.index(want)]
            if not value or value in known or (value in producer and producer[value].op_type == "Constant"):
                continue
            cone, stack, ok = [], [value], True
            while stack and ok:
                v = stack.pop()
                if v in known or not v:
                    continue
                p = producer.get(v)
                if p is None or p.domain not in ("", "ai.onnx") or p.op_type in ("Shape", "Size") or any(
                        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in p.attribute):
                    ok = False  # depends on a graph input or a run-time shape: not foldable here
                    break
                if p not in cone:
                    cone.append(p)
                    stack.extend(p.input)
            if not ok:
                continue
            cone.reverse()
            order = [n for n in graph.node if n in cone]  # graph order is topological
            inits = [i for i in graph.initializer if any(i.name in n.input for n in order)]
            mini = helper.make_model(helper.make_graph(order, "fold", [], [helper.make_tensor_value_info(value, 0, None)],
                                                       initializer=inits),
                                     opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version)
            try:
                (result,) = ReferenceEvaluator(mini).run(None, {})
            except Exception:
                continue
            graph.initializer.append(numpy_helper.from_array(np.asarray(result), value))
            known.add(value)
            keep = [n for n in graph.node if not (len(n.output) == 1 and n.output[0] == value)]
            del graph.node[:]
            graph.node.extend(keep)
            folded += 1
    return folded


def _restamp(model: onnx.ModelProto, current: int, target: int, name: str, types: dict) -> None:
    """ai.onnx opset `current` -> `target` in the graph and the function bodies, where every node allows it."""
    def check(nodes, where: str) -> None:
        for node in nodes:
            if node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    check(attr.g.node, where)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        check(g.node, where)
            _check_restamp(node, current, target, f"{where}: node {node.name!r}", types)

    check(model.graph.node, name)
    for fn in model.functions:
        check(fn.node, f"{name} (function {fn.domain}::{fn.name})")
    for imports in [model.opset_import, *(fn.opset_import for fn in model.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx") and o.version > target:
                o.version = target
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CapabilityError(f"{name}: re-stamping opset {current} -> {target} gives an invalid graph "
                              f"({str(exc).splitlines()[0]}); export with --opset {target}") from None


def _check_restamp(node: onnx.NodeProto, current: int, target: int, where: str, types: dict) -> None:
    now = onnx.defs.get_schema(node.op_type, current, "")
    if now.since_version <= target:
        return
    fix = f"export with --opset {target}"
    try:
        then = onnx.defs.get_schema(node.op_type, target, "")
    except onnx.defs.SchemaError:
        raise CapabilityError(f"{where} ({node.op_type}-{now.since_version}) does not exist at opset {target}, the "
                              f"newest TensorRT takes here; {fix}") from None
    same = ([i.name for i in now.inputs] == [i.name for i in then.inputs]
            and [o.name for o in now.outputs] == [o.name for o in then.outputs]
            and set(now.attributes) == set(then.attributes))
    if not same:
        raise CapabilityError(f"{where} ({node.op_type}-{now.since_version}) differs from {node.op_type}-"
                              f"{then.since_version} in more than types; {fix}")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in then.type_constraints}
    for formal, value in zip(then.inputs, node.input, strict=False):
        t = types.get(value)
        if not value or t is None or not t.tensor_type.elem_type or formal.type_str not in allowed:
            continue  # unknown types (function bodies) are left to the checker and the parser
        text = f"tensor({helper.tensor_dtype_to_string(t.tensor_type.elem_type).removeprefix('TensorProto.').lower()})"
        if text not in allowed[formal.type_str]:
            raise CapabilityError(f"{where} ({node.op_type}) takes {text} for {formal.name}, which opset {target} "
                                  f"does not allow; {fix}")
