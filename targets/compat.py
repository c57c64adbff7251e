"""Static compatibility check of ONNX graphs against what a target's TensorRT ONNX parser takes.

The facts are data (targets/facts/tensorrt.json, one row per TensorRT version, each citing its source:
onnx-tensorrt's docs/operators.md per release branch, its changelog, NVIDIA's release notes; rows without a
primary table say `verified: false` and name the nearest verified version they use). The check looks at
what the parser will see: every node of every graph, the If/Loop/Scan subgraphs, and the bodies of effx
nodes that TensorRT inlines because no plugin takes them (a node goes to an effx plugin only when it is
marked for it, `--trt-plugins`, and that TensorRT has ahead-of-time plugins). Each node is held against the
op table (supported at all), the opset range, its input dtypes and the restrictions the table states as
checkable rules (constant `axes`, If branches of equal rank, Loop shapes, 4-D Attention, ...).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnx
import onnx.inliner
from onnx import TensorProto

from effx.core.errors import ArtifactError, CapabilityError
from effx.core.manifest import Manifest
from effx.plugins.opspec import DOMAIN
from effx.plugins.trt import PLUGIN_SPECS
from effx.targets.lower import lower_models
from effx.targets.profiles import get_target

FACTS_FILE = Path(__file__).parent / "facts" / "tensorrt.json"

# ONNX elem types by the names onnx-tensorrt's tables use
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
              TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
              TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4",
              TensorProto.INT16: "INT16", TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32",
              TensorProto.UINT64: "UINT64", TensorProto.STRING: "STRING"}


def parse_version(text: str) -> tuple[int, int]:
    """'10.3', '10.3.0.26', '11.4.0.106' -> (major, minor)."""
    parts = str(text).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise CapabilityError(f"TensorRT version {text!r} is not MAJOR.MINOR[.PATCH]") from None


@dataclass(frozen=True)
class TrtFacts:
    """The parser facts of one TensorRT version (a resolved row of tensorrt.json)."""

    version: str  # the row's version ("10.1"), the greatest row <= the version asked for
    asked: str  # the version the check is for ("10.3")
    verified: bool
    source: str
    min_opset: int
    max_opset: int
    ops: dict[str, dict[str, Any]]
    features: dict[str, str]  # feature -> first version that has it
    cast_down: dict[str, str]
    precision: str  # the precision rule of this version, in words
    precision_source: str

    def has(self, feature: str) -> bool:
        since = self.features.get(feature)
        return since is not None and parse_version(self.asked) >= parse_version(since)


@lru_cache(maxsize=1)
def _facts_doc() -> dict[str, Any]:
    return json.loads(FACTS_FILE.read_text())


def trt_facts(version: str | tuple[int, int]) -> TrtFacts:
    """The facts row for TensorRT `version`: the greatest row not newer than it (rows are 8.5 ... 11.5)."""
    doc = _facts_doc()
    want = parse_version(version) if isinstance(version, str) else tuple(version)
    asked = ".".join(map(str, want))
    rows = {r["version"]: r for r in doc["versions"]}
    fitting = [v for v in rows if parse_version(v) <= want]
    if not fitting:
        raise CapabilityError(f"TensorRT {asked}: effx has no parser facts before {min(rows, key=parse_version)}")
    row = rows[max(fitting, key=parse_version)]
    ops = dict(rows[row["base"]]["ops"]) if "base" in row else dict(row["ops"])
    for op, entry in row.get("changes", {}).items():
        ops[op] = entry
    precision = [p for p in doc["precision"] if parse_version(p["since"]) <= want]
    rule = precision[-1] if precision else {"rule": "unknown", "source": ""}
    return TrtFacts(version=row["version"], asked=asked, verified=row["verified"], source=row["source"],
                    min_opset=row["min_opset"], max_opset=row["max_opset"], ops=ops,
                    features={f["name"]: f["since"] for f in doc["features"]},
                    cast_down=row.get("cast_down", {}), precision=rule["rule"], precision_source=rule["source"])


@dataclass(frozen=True)
class Finding:
    graph: str  # graph file (and subgraph path)
    node: str  # node name (function-body nodes: "<function>/<node>")
    op: str  # domain::op_type or op_type
    kind: str  # op | opset | dtype | restriction | plugin | precision
    message: str
    fix: str
    blocking: bool = True

    def line(self) -> str:
        tag = "error" if self.blocking else "note"
        return f"{tag}: {self.graph}: node {self.node!r} ({self.op}): {self.message}; fix: {self.fix}"


@dataclass
class CompatReport:
    target: str
    tensorrt_version: str
    facts_version: str
    verified: bool
    source: str
    graphs: list[str] = field(default_factory=list)
    nodes_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    lowering: list[str] = field(default_factory=list)  # what effx.targets.lower rewrote before the check

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    @property
    def ok(self) -> bool:
        return not self.blocking

    def summary(self) -> str:
        row = f"TensorRT {self.tensorrt_version} (facts row {self.facts_version}" + \
              ("" if self.verified else ", unverified") + ")"
        state = "clean" if self.ok else f"{len(self.blocking)} blocking finding(s)"
        return f"{self.target}: {row}: {self.nodes_checked} nodes in {len(self.graphs)} graph(s): {state}"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "tensorrt_version": self.tensorrt_version, "facts_version": self.facts_version,
                "verified": self.verified, "source": self.source, "graphs": self.graphs,
                "nodes_checked": self.nodes_checked, "ok": self.ok, "lowering": self.lowering, "findings": [asdict(f) for f in self.findings]}


# -- which effx nodes reach a plugin -------------------------------------------------------------------------
def marked_for_plugin(node: onnx.NodeProto) -> bool:
    """The exporter marks nodes for TensorRT plugins (`--trt-plugins`) with a plugin_namespace attribute."""
    return node.domain == DOMAIN and node.op_type in PLUGIN_SPECS and any(
        a.name == "plugin_namespace" for a in node.attribute)


def plugin_ops(model: onnx.ModelProto) -> set[str]:
    """The effx ops of `model` that are marked for plugins (main graph and subgraphs)."""
    return {n.op_type for n, _ in walk(model.graph, "") if marked_for_plugin(n)}


def routes_to_plugin(node: onnx.NodeProto, facts: TrtFacts) -> bool:
    return marked_for_plugin(node) and facts.has("qdp_aot")


# -- graph walking -----------------------------------------------------------------------------------------
def walk(graph: onnx.GraphProto, path: str, depth: int = 0):
    """(node, where) for every node of `graph` and of its subgraphs; where = 'If:name/then_branch' chains."""
    for node in graph.node:
        yield node, path
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
            for sub in subs:
                yield from walk(sub, f"{path}/{node.op_type}:{node.name or '?'}.{attr.name}", depth + 1)


def trt_view(model: onnx.ModelProto, facts: TrtFacts) -> onnx.ModelProto:
    """What TensorRT's parser sees: effx nodes not taken by a plugin replaced by their function bodies
    (TensorRT >= 9.0 inlines model-local functions), with inferred value types. Body nodes are renamed
    '<function>/<node>' so findings point into the function."""
    model = copy.deepcopy(model)
    keep = {n.op_type for n, _ in walk(model.graph, "") if routes_to_plugin(n, facts)}
    for fn in model.functions:
        for i, node in enumerate(fn.node):
            node.name = f"{fn.name}/{node.name or f'{node.op_type}_{i}'}"
    inline = [(f.domain, f.name) for f in model.functions if f.name not in keep]
    if inline and facts.has("local_functions"):
        model = onnx.inliner.inline_selected_functions(model, inline, False)
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help for the dtype checks, not a requirement
        return model


class _Scope:
    """Value types and constants visible at a point of the (sub)graph tree."""

    def __init__(self, graph: onnx.GraphProto, parent: _Scope | None = None):
        self.parent = parent
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        self.consts: set[str] = {i.name for i in graph.initializer}
        for v in [*graph.input, *graph.output, *graph.value_info]:
            t = v.type.tensor_type
            if t.elem_type:
                self.types[v.name] = t.elem_type
            if t.HasField("shape"):
                self.ranks[v.name] = len(t.shape.dim)
        for i in graph.initializer:
            self.types[i.name] = i.data_type
            self.ranks[i.name] = len(i.dims)
        for n in graph.node:
            if n.op_type == "Constant":
                self.consts.update(n.output)

    def _find(self, table: str, name: str):
        """`name`'s entry in `table` (types, ranks) of this scope or the nearest enclosing one, else None."""
        s: _Scope | None = self
        while s is not None:
            entries = getattr(s, table)
            if name in entries:
                return entries[name] if isinstance(entries, dict) else True
            s = s.parent
        return None

    def type(self, name: str) -> int | None:
        return self._find("types", name)

    def rank(self, name: str) -> int | None:
        return self._find("ranks", name)

    def const(self, name: str) -> bool:
        return bool(self._find("consts", name))


def _schema(op: str, opset: int):
    try:
        return onnx.defs.get_schema(op, opset, "")
    except Exception:
        return None


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _by_name(names: list[str], node_values, name: str) -> str:
    """The node's value for the schema's formal parameter `name` ('' when absent)."""
    if name in names:
        i = names.index(name)
        return node_values[i] if i < len(node_values) else ""
    return ""


def check_model(model: onnx.ModelProto, graph_name: str, facts: TrtFacts) -> tuple[list[Finding], int]:
    """Findings for one ONNX model as TensorRT `facts.asked` would parse it, and the number of nodes seen."""
    findings: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > facts.max_opset:
        findings.append(Finding(graph_name, "(graph)", f"opset {opset}", "opset",
                                f"ai.onnx opset {opset} is above TensorRT {facts.asked}'s {facts.max_opset}",
                                f"`effx build` lowers it (re-stamps to opset {facts.max_opset} where the nodes allow it); "
                                f"or export with --opset {facts.max_opset}"))
    if opset and opset < max(facts.min_opset, 1):
        findings.append(Finding(graph_name, "(graph)", f"opset {opset}", "opset",
                                f"ai.onnx opset {opset} is below TensorRT {facts.asked}'s minimum {facts.min_opset}",
                                f"export with --opset {facts.min_opset} or newer"))
    effx_nodes = [n for n, _ in walk(model.graph, "") if n.domain == DOMAIN]
    if effx_nodes and not facts.has("local_functions"):
        for n in effx_nodes:
            if not routes_to_plugin(n, facts):
                findings.append(Finding(graph_name, n.name, f"{DOMAIN}::{n.op_type}", "op",
                                        f"TensorRT {facts.asked} does not inline ONNX local functions (from "
                                        f"{facts.features['local_functions']}) and has no effx plugin",
                                        "export with --inline (plain ONNX), or use TensorRT >= 10"))
    for n in effx_nodes:
        if marked_for_plugin(n) and not facts.has("qdp_aot"):
            findings.append(Finding(graph_name, n.name, f"{DOMAIN}::{n.op_type}", "plugin",
                                    f"marked for a plugin, but TensorRT {facts.asked} has no AOT plugins (from "
                                    f"{facts.features['qdp_aot']}): its function body is parsed instead",
                                    "nothing to do (the body is checked below)", blocking=False))
    view = trt_view(model, facts)
    seen = 0

    def visit(graph: onnx.GraphProto, where: str, parent: _Scope | None, depth: int) -> None:
        nonlocal seen
        scope = _Scope(graph, parent)
        for node in graph.node:
            seen += 1
            findings.extend(_check_node(node, graph_name + where, scope, facts, opset, depth))
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                    list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
                for sub in subs:
                    visit(sub, f"{where}/{node.op_type}:{node.name or '?'}.{attr.name}", scope, depth + 1)

    visit(view.graph, "", None, 0)
    return findings, seen


def _check_node(node: onnx.NodeProto, where: str, scope: _Scope, facts: TrtFacts, opset: int,
                depth: int) -> list[Finding]:
    name = node.name or f"<unnamed {node.op_type}>"
    if node.domain == DOMAIN:
        if routes_to_plugin(node, facts):
            return []  # the plugin's fixed signature is checked by the exporter (stamp_plugin_nodes)
        return [Finding(where, name, f"{DOMAIN}::{node.op_type}", "op",
                        "effx node with no function body to inline and no plugin", "export with --inline")]
    if node.domain not in ("", "ai.onnx"):
        entry = facts.ops.get(node.op_type)
        if entry and entry.get("domain") and node.domain == entry["domain"]:
            return []
        return [Finding(where, name, f"{node.domain}::{node.op_type}", "op",
                        f"custom domain {node.domain!r} has no TensorRT {facts.asked} importer or plugin here",
                        "export with --inline or for the target")]
    op = node.op_type
    entry = facts.ops.get(op)
    if entry is None or not entry.get("supported"):
        why = "not in" if entry is None else "marked unsupported in"
        return [Finding(where, name, op, "op", f"{op} is {why} TensorRT {facts.asked}'s ONNX operator table",
                        _op_fix(op, facts))]
    out: list[Finding] = []
    schema = _schema(op, opset)
    if schema is not None and schema.since_version > facts.max_opset:
        out.append(Finding(where, name, op, "opset",
                           f"{op}-{schema.since_version} is newer than TensorRT {facts.asked}'s opset {facts.max_opset}",
                           f"`effx build` lowers it where it can; or export with --opset {facts.max_opset}"))
    # dtype: the inputs that share the first input's type constraint (the op's data type, not indices/shapes)
    if schema is not None and entry.get("types"):
        allowed = set(entry["types"])
        formal = list(schema.inputs)
        data = formal[0].type_str if formal else None
        for i, value in enumerate(node.input):
            if not value:
                continue
            f = formal[min(i, len(formal) - 1)] if formal else None
            if f is None or f.type_str != data:
                continue
            t = scope.type(value)
            if t is None:
                continue
            tname = TYPE_NAMES.get(t, str(t))
            tname = facts.cast_down.get(tname, tname)
            if tname not in allowed:
                out.append(Finding(where, name, op, "dtype",
                                   f"input {value!r} is {TYPE_NAMES.get(t, t)}; TensorRT {facts.asked} takes "
                                   f"{op} in {', '.join(entry['types'])}",
                                   f"cast {value!r} to one of {', '.join(entry['types'])} before {op}"))
                break
    for rule in entry.get("rules", []):
        out.extend(_check_rule(rule, node, name, where, scope, schema, facts, depth))
    return out


def _op_fix(op: str, facts: TrtFacts) -> str:
    if op == "Attention":
        return "`effx build` lowers ONNX Attention to MatMul/Softmax for TensorRT < 10.14; or export with --opset 20"
    if op == "LinearAttention":
        return "export for the target with effx's own linear-attention node (--opset 26 or lower)"
    return "export with --opset " + str(facts.max_opset) + " or replace the op"


def _check_rule(rule: dict[str, Any], node: onnx.NodeProto, name: str, where: str, scope: _Scope, schema,
                facts: TrtFacts, depth: int) -> list[Finding]:
    op = node.op_type
    ins = [f.name for f in schema.inputs] if schema is not None else []
    outs = [f.name for f in schema.outputs] if schema is not None else []
    F = lambda msg, fix: Finding(where, name, op, "restriction", msg, fix)  # noqa: E731
    found: list[Finding] = []
    if "const_input" in rule:
        value = _by_name(ins, node.input, rule["const_input"])
        if value and not scope.const(value):
            found.append(F(f"input {rule['const_input']!r} ({value!r}) must be a constant (initializer) in "
                           f"TensorRT {facts.asked}", f"constant-fold {value!r} (e.g. polygraphy surgeon sanitize "
                           "--fold-constants) or compute it from constants only"))
    if rule.get("if_branch_rank"):
        branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        then, other = branches.get("then_branch"), branches.get("else_branch")
        if then is not None and other is not None:
            for a, b in zip(then.output, other.output, strict=False):
                ra = len(a.type.tensor_type.shape.dim) if a.type.tensor_type.HasField("shape") else None
                rb = len(b.type.tensor_type.shape.dim) if b.type.tensor_type.HasField("shape") else None
                if ra is not None and rb is not None and ra != rb:
                    found.append(F(f"If branch outputs {a.name!r} (rank {ra}) and {b.name!r} (rank {rb}) differ "
                                   "in rank", "make both branches return tensors of the same rank"))
                if a.name == b.name:
                    found.append(F(f"If branches share the output name {a.name!r}",
                                   "give each branch output its own name"))
    if rule.get("loop_static_shapes"):
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is not None:
            carried = len(node.input) - 2
            for i in range(carried):
                bi, bo = body.input[i + 2], body.output[i + 1]
                ri = bi.type.tensor_type.shape.dim if bi.type.tensor_type.HasField("shape") else None
                ro = bo.type.tensor_type.shape.dim if bo.type.tensor_type.HasField("shape") else None
                if ri is not None and ro is not None and (len(ri) != len(ro) or any(
                        x.dim_value and y.dim_value and x.dim_value != y.dim_value for x, y in zip(ri, ro, strict=False))):
                    found.append(F(f"loop-carried {bi.name!r} changes shape across iterations",
                                   "carry a fixed-shape tensor (preallocate and scatter into it)"))
            if len(body.output) - 1 > carried and node.input and node.input[0] and not scope.const(node.input[0]):
                found.append(F("scan outputs with a trip count that is not constant (dynamic length)",
                               "give the Loop a constant trip count or drop the scan outputs"))
    if rule.get("first_output_only"):
        if sum(1 for o in node.output if o) > 1:
            found.append(F("only the first output is supported", "drop the extra outputs"))
    for attr, allowed in rule.get("attr_in", {}).items():
        value = _attr(node, attr)
        if isinstance(value, bytes):
            value = value.decode()
        if value is not None and value not in allowed:
            found.append(F(f"attribute {attr}={value!r} is not supported (only {allowed})", f"use {attr}={allowed[0]!r}"))
    if "zero_input" in rule:
        value = _by_name(ins, node.input, rule["zero_input"])
        if value and not scope.const(value):
            found.append(F(f"{rule['zero_input']} must be a zero constant", "use symmetric quantization"))
    for formal, rank in rule.get("rank", {}).items():
        value = _by_name(ins, node.input, formal)
        r = scope.rank(value) if value else None
        if r is not None and r != rank:
            found.append(F(f"input {formal} ({value!r}) has rank {r}; TensorRT {facts.asked} needs {rank}-D",
                           f"reshape {formal} to {rank}-D (B, heads, seq, head_dim)"))
    for formal in rule.get("absent_inputs", []):
        if _by_name(ins, node.input, formal):
            found.append(F(f"input {formal} is not supported by TensorRT {facts.asked}",
                           "`effx build` lowers the op to MatMul/Softmax; or export with --opset 20"))
    for formal in rule.get("absent_outputs", []):
        if _by_name(outs, node.output, formal):
            found.append(F(f"output {formal} is not supported (TensorRT takes one output)",
                           "`effx build` lowers the op to MatMul/Softmax; or export with --opset 20"))
    for attr in rule.get("absent_attrs", []):
        value = _attr(node, attr)
        if value not in (None, 0, 0.0):
            found.append(F(f"attribute {attr}={value!r} is not supported",
                           "`effx build` lowers the op to MatMul/Softmax"))
    for formal, dtype in rule.get("input_dtype", {}).items():
        value = _by_name(ins, node.input, formal)
        t = scope.type(value) if value else None
        if t is not None and TYPE_NAMES.get(t) != dtype:
            found.append(F(f"input {formal} must be {dtype}, is {TYPE_NAMES.get(t, t)}", f"cast {formal} to {dtype}"))
    if rule.get("not_in_subgraph") and depth > 0:
        found.append(F(f"{op} inside a subgraph fails to import (NVIDIA/TensorRT#4739)",
                       "`effx build` lowers it to MatMul/Softmax"))
    return found


# -- folders -----------------------------------------------------------------------------------------------
def graph_files(folder: Path, manifest: Manifest) -> dict[str, str]:
    """graph name -> ONNX file of an export folder or of a kit/ORT build (engines are not ONNX)."""
    graphs = manifest.graphs
    if manifest.build is not None:
        onnx_graphs = {k: g for k, g in manifest.build.graphs.items() if g.file.endswith(".onnx")}
        graphs = onnx_graphs or graphs
    out = {}
    for name, g in graphs.items():  # a TensorRT engine build keeps the graphs it parsed in graphs/
        for candidate in (g.file, f"graphs/{g.file}"):
            if candidate.endswith(".onnx") and (folder / candidate).is_file():
                out[name] = candidate
                break
    if not out:
        raise ArtifactError(f"{folder}: no ONNX graphs to check (an engine-only build? check the export folder)")
    return out


def check_models(models: dict[str, onnx.ModelProto], target: str, facts: TrtFacts) -> CompatReport:
    report = CompatReport(target=target, tensorrt_version=facts.asked, facts_version=facts.version,
                          verified=facts.verified, source=facts.source)
    for name, model in models.items():
        found, seen = check_model(model, name, facts)
        report.graphs.append(name)
        report.nodes_checked += seen
        report.findings.extend(found)
    return report


def check_folder(folder: str | Path, target: str, tensorrt_version: str | None = None,
                 lowered: bool = False) -> CompatReport:
    """`effx check DIR --target T`: the graphs of DIR (export or build folder) against T's TensorRT facts.
    lowered=True checks the graphs `effx build` would hand TensorRT (after effx.targets.lower)."""
    folder = Path(folder)
    profile = get_target(target)
    if profile.backend != "tensorrt":
        raise CapabilityError(f"--target {profile.name} runs ONNX Runtime, which takes every ONNX op effx exports; "
                              "`effx check` holds graphs against TensorRT targets (see `effx targets`)")
    if profile.unsupported:
        raise CapabilityError(f"target {profile.name}: {profile.unsupported}")
    manifest = Manifest.read(folder)
    version = tensorrt_version or ".".join(map(str, profile.tensorrt_major_minor))
    facts = trt_facts(version)
    models = {name: onnx.load(str(folder / f), load_external_data=False)
              for name, f in graph_files(folder, manifest).items()}
    notes, refused = [], []
    if lowered:
        for name in list(models):
            try:
                low, done = lower_models({name: models[name]}, facts)
            except CapabilityError as exc:  # what the build would refuse is a blocking finding here
                refused.append(Finding(name, "(lowering)", "graph", "lowering", str(exc), "see the message"))
                continue
            models[name] = low[name]
            notes += done
    report = check_models(models, profile.name, facts)
    report.findings = refused + report.findings
    report.lowering = notes
    return report
