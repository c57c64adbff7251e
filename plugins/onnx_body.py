"""Building blocks for the ONNX side of an op: its node schema, and its function body in standard ONNX.

Bodies are built with onnx.helper through a small builder so the shared pieces (GQA head expansion, masked
softmax attention) are written once and composed by every op. Attribute values are referenced, not
copied (`ref_attr_name`), so one function serves every node of its op in a model; only attributes that
change the body's structure (a feature map, causality where shapes differ) are fixed when the function is
built, and the exporter checks that every node agrees on them.

Masked scores use effx.plugins.opspec.MASK_VALUE (-65504, fp16's lowest finite value): converted fp16
graphs do not overflow to -inf.
"""

from __future__ import annotations

import functools
from typing import Any

import onnx
import onnxscript
from onnx import AttributeProto, TensorProto, helper
from onnx.defs import OpSchema

from effx.plugins.opspec import DOMAIN, MASK_VALUE, OPS, OpSpec

_ATTR_TYPES = {int: AttributeProto.INT, float: AttributeProto.FLOAT, str: AttributeProto.STRING,
               bool: AttributeProto.INT}


class Body:
    """Accumulates nodes of a function body; every method returns output value names."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}_{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs: Any) -> Any:
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, value: str, name: str) -> str:
        """Rename the value produced last under `value` to the function output `name`."""
        for node in reversed(self.nodes):
            if value in node.output:
                node.output[list(node.output).index(value)] = name
                return name
        raise ValueError(f"{value} is not produced in this body")

    def ints(self, *values: int) -> str:
        return self.op("Constant", value=helper.make_tensor(self._name("c"), TensorProto.INT64, [len(values)], list(values)))

    def scalar(self, value: int) -> str:
        return self.op("Constant", value=helper.make_tensor(self._name("c"), TensorProto.INT64, [], [value]))

    def float_like(self, value: float, like: str) -> str:
        c = self.op("Constant", value=helper.make_tensor(self._name("c"), TensorProto.FLOAT, [], [value]))
        return self.op("CastLike", c, like)

    def attr_float_like(self, attr: str, like: str) -> str:
        """A float attribute of the function as a tensor of `like`'s dtype (CastLike keeps fp16 graphs valid)."""
        c = self._name("attr")
        node = helper.make_node("Constant", [], [c])
        node.attribute.append(AttributeProto(name="value_float", ref_attr_name=attr, type=AttributeProto.FLOAT))
        self.nodes.append(node)
        return self.op("CastLike", c, like)

    def attr_int(self, attr: str) -> str:
        """An int attribute as a 1-element int64 tensor (shape [1], so it concatenates into shapes)."""
        c = self._name("attr")
        node = helper.make_node("Constant", [], [c])
        node.attribute.append(AttributeProto(name="value_int", ref_attr_name=attr, type=AttributeProto.INT))
        self.nodes.append(node)
        return self.op("Unsqueeze", c, self.ints(0))

    def dim(self, x: str, axis: int) -> str:
        """Size of one axis of x as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    # -- shared attention pieces --------------------------------------------------------------------
    def expand_kv(self, kv: str, q: str) -> str:
        """(B,H_kv,N,D) -> (B,H_q,N,D): query head h uses KV head h // (H_q / H_kv)."""
        b, hkv, n, d = (self.dim(kv, i) for i in range(4))
        hq = self.dim(q, 1)
        groups = self.op("Div", hq, hkv)
        k5 = self.op("Unsqueeze", kv, self.ints(2))  # (B,H_kv,1,N,D)
        expanded = self.op("Expand", k5, self.op("Concat", b, hkv, groups, n, d, axis=0))
        return self.op("Reshape", expanded, self.op("Concat", b, hq, n, d, axis=0))

    def softmax_attention(self, q: str, k: str, v: str, allowed: str | None, scale_attr: str = "scale",
                          scale: str | None = None, softcap: str | None = None) -> str:
        """softmax(cap((scale Q) K^T), masked) V; Q is scaled before the first MatMul (TensorRT's MHA fusion needs
        that). `scale` (a value) replaces the attribute inside If branches, where attribute references cannot go;
        `softcap` (a value) caps the scores: softcap * tanh(s / softcap)."""
        k, v = self.expand_kv(k, q), self.expand_kv(v, q)
        qs = self.op("Mul", q, scale if scale is not None else self.attr_float_like(scale_attr, q))
        scores = self.cap(self.op("MatMul", qs, self.op("Transpose", k, perm=[0, 1, 3, 2])), softcap)  # (B,H,Nq,Nk)
        if allowed is not None:
            scores = self.op("Where", allowed, scores, self.float_like(MASK_VALUE, scores))
        return self.op("MatMul", self.op("Softmax", scores, axis=-1), v)

    def cap(self, scores: str, softcap: str | None) -> str:
        """Attention-logit soft-capping, softcap * tanh(scores / softcap); None: scores unchanged."""
        if softcap is None:
            return scores
        return self.op("Mul", self.op("Tanh", self.op("Div", scores, softcap)), softcap)

    def positions(self, q_pos: str, k_pos: str) -> tuple[str, str, str]:
        """(B,Nq), (B,Nk) -> query (B,1,Nq,1), key (B,1,1,Nk) positions and key validity."""
        qp = self.op("Unsqueeze", q_pos, self.ints(1, 3))
        kp = self.op("Unsqueeze", k_pos, self.ints(1, 2))
        valid = self.op("GreaterOrEqual", kp, self.ints(0))
        return qp, kp, valid

    def window_mask(self, qp: str, kp: str, valid: str, window: str, causal: bool) -> str:
        """Sliding window over positions: causal i - w < j <= i, symmetric |i - j| < w; and a real key."""
        if causal:
            ok = self.op("And", self.op("LessOrEqual", kp, qp), self.op("Greater", kp, self.op("Sub", qp, window)))
        else:
            ok = self.op("Less", self.op("Abs", self.op("Sub", qp, kp)), window)
        return self.op("And", valid, ok)

    def feature_map(self, x: str, kind: str, is_query: bool) -> str:
        """Linear attention's phi: elu(x)+1, or FAVOR+ exp(omega x' - |x'|^2/2 - c)/sqrt(m), x' = x d^-1/4."""
        if kind == "identity":  # features computed before the op (learned maps)
            return x
        if kind == "elu":
            return self.op("Add", self.op("Elu", x, alpha=1.0), self.float_like(1.0, x))
        d = self.op("CastLike", self.dim(x, 3), x)
        xs = self.op("Mul", x, self.op("Pow", d, self.float_like(-0.25, x)))
        proj = self.op("MatMul", xs, self.op("Transpose", "omega", perm=[1, 0]))  # (..., m)
        sq = self.op("Div", self.op("ReduceSum", self.op("Mul", xs, xs), self.ints(-1), keepdims=1),
                     self.float_like(2.0, x))
        logits = self.op("Sub", proj, sq)
        if is_query:  # the row max cancels between numerator and denominator
            logits = self.op("Sub", logits, self.op("ReduceMax", logits, self.ints(-1), keepdims=1))
        m = self.op("CastLike", self.dim("omega", 0), x)
        return self.op("Div", self.op("Exp", logits), self.op("Sqrt", m))

    def select(self, flag_attr: str, if_true: str, if_false: str) -> str:
        """Boolean choice by an int attribute (0/1): (flag and a) or (not flag and b); both sides are computed.
        (ONNX Runtime has no bool kernel for Where.)"""
        flag = self.op("Cast", self.attr_int(flag_attr), to=TensorProto.BOOL)
        return self.op("Or", self.op("And", flag, if_true), self.op("And", self.op("Not", flag), if_false))


# Attributes TensorRT's ONNX parser reads on a plugin node (namespace, version, AOT); declared on every
# function, with defaults, so a node may carry them or not and still runs from its function body in any ONNX
# runtime (onnx's reference evaluator insists that a declared attribute without a default is on the node).
PLUGIN_NODE_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": "1", "aot": 0}


def make_function(spec: OpSpec, opset: int, body: Body, inputs: list[str], outputs: list[str]) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, spec.name, inputs, outputs, body.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(spec.attributes),
        attribute_protos=[helper.make_attribute(k, v) for k, v in PLUGIN_NODE_ATTRIBUTES.items()],
    )


def node_schema(spec: OpSpec) -> onnx.defs.OpSchema:
    """The node's schema (not registered globally): typed attributes, optional trailing inputs."""
    def param(name: str) -> OpSchema.FormalParameter:
        optional = name.endswith("?")
        clean = name.rstrip("?")
        type_str = "I" if clean in _INT_INPUTS else "T"
        option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(clean, type_str, param_option=option)

    uses_int = any(n.rstrip("?") in _INT_INPUTS for n in spec.inputs)
    constraints = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")]
    if uses_int:
        constraints.append(("I", ["tensor(int64)"], "positions, lengths, block ids"))
    return OpSchema(
        spec.name, DOMAIN, 1,
        inputs=[param(n) for n in spec.inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in spec.outputs],
        type_constraints=constraints,
        attributes=[OpSchema.Attribute(a, _SCHEMA_ATTR[t], "") for a, t in spec.attributes.items()],
    )


_INT_INPUTS = {"q_pos", "k_pos", "block_table", "seq_lens"}
_SCHEMA_ATTR = {int: onnx.defs.OpSchema.AttrType.INT, float: onnx.defs.OpSchema.AttrType.FLOAT,
                str: onnx.defs.OpSchema.AttrType.STRING, bool: onnx.defs.OpSchema.AttrType.INT}


@functools.cache
def node_op(spec_name: str):
    """The onnxscript Op a torch.onnx translation calls to emit one bare `effx::<name>` node."""
    spec = OPS[spec_name]
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), spec.name, node_schema(spec))


# Standard ONNX ops newer than the opset torch.onnx traces at (its version converter stops at opset 25) are
# emitted in this staging domain, at version 1 (so the converter leaves them alone), and moved into ai.onnx by
# the exporter once it has raised the graph's opset. STAGED: op name -> the ai.onnx version it is written for.
STAGING_DOMAIN = "effx.standard"
STAGED: dict[str, int] = {}


@functools.cache
def staged_op(name: str, since: int):
    """The onnxscript Op a torch.onnx translation calls to emit the standard op `name` of ai.onnx version `since`."""
    std = onnx.defs.get_schema(name, since)
    if std.since_version != since:
        raise ValueError(f"ai.onnx {name} has no version {since} (its version at {since} is {std.since_version})")

    def param(p):
        return OpSchema.FormalParameter(p.name, p.type_str, param_option=p.option)

    schema = OpSchema(name, STAGING_DOMAIN, 1, inputs=[param(p) for p in std.inputs],
                      outputs=[param(p) for p in std.outputs],
                      type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in std.type_constraints],
                      attributes=[OpSchema.Attribute(a.name, a.type, a.description) for a in std.attributes.values()])
    STAGED[name] = since
    return onnxscript.values.Op(onnxscript.values.Opset(STAGING_DOMAIN, 1), name, schema)
