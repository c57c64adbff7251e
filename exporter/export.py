"""`effx export`: model -> ONNX graph(s) + manifest.json, written atomically."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime
import onnxscript
import torch

import effx
from effx.core.atomic import atomic_dir
from effx.core.flavours import DEFAULT_ATTENTION_OPS, effective_attention_ops, opset_for, resolve_attention_ops
from effx.core.manifest import CustomOp, DimRange, GraphSpec, Manifest, TensorSpec
from effx.core.options import DEFAULT_OPSET, MAX_OPSET, check_opset
from effx.exporter import onnx_export as ox
from effx.exporter.cache_plan import cache_plan
from effx.exporter.graphs import plan_graphs
from effx.models.attention import custom_attention_ops
from effx.models.transformer import EffxModel, weights_digest
from effx.plugins.opspec import DOMAIN

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
           onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}


def attention_sites(model: EffxModel) -> set[str]:
    """The attention sites (effx.core.flavours.SITES) this model's graphs contain."""
    m = model.spec.model
    sites = set()
    for layer in model.spec.resolved_layers():
        kind = layer.attention.kind
        if kind == "local":
            sites |= {"local", "local-step"} if m.family == "decoder" else {"local"}
        elif kind == "linear":
            sites |= {"linear"} if m.causal else set()
        elif kind in ("full", "hierarchical"):  # hourglass levels are full-attention layers
            sites.add("full")
    return sites


def export_model(
    model: EffxModel, out_dir: str | Path, opset: int | None = None, inline: bool = False,
    max_batch: int = 8, overwrite: bool = False, progress: Callable[[str], None] | None = None,
    trt_plugins: bool = False, attention_ops: str | None = None,
) -> Manifest:
    """Export `model` to `out_dir`: model.onnx (encoders, decoders without cache) or prefill.onnx + decode.onnx,
    and manifest.json. Nothing is left at out_dir if anything fails. `attention_ops` (`site=flavour,...`) replaces
    the named sites of the default op flavours, the `cpu` target's measured choice (effx.core.flavours).
    opset None: DEFAULT_OPSET, or the newest opset a chosen standard op of this model needs (opset_for)."""
    choice = resolve_attention_ops(DEFAULT_ATTENTION_OPS, attention_ops)
    if opset is None:
        opset = opset_for(choice, attention_sites(model), bool(model.spec.model.attn_softcap), trt_plugins,
                          DEFAULT_OPSET, MAX_OPSET)
    check_opset(opset)
    say = progress or (lambda _msg: None)
    plans = plan_graphs(model.eval(), max_batch=max_batch)
    graphs: dict[str, GraphSpec] = {}
    counts: Counter = Counter()
    with atomic_dir(Path(out_dir), "export", overwrite=overwrite) as tmp, torch.no_grad():
        for plan in plans:
            say(f"exporting {plan.name}.onnx")
            with custom_attention_ops(trt_plugins):  # plugin graphs keep effx nodes where a standard op exists
                proto = ox.export_graph(plan, opset, choice)
            # ONNX dims carry names, not bounds: record each dimension's range in the graph's metadata too
            for dim, (lo, opt, hi) in sorted(plan.dim_ranges.items()):
                onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                                    f"effx.dim.{dim}": f"min={lo} opt={opt} max={hi}"})
            counts.update(ox.custom_op_counts(proto))
            if trt_plugins:
                ox.stamp_plugin_nodes(proto)
                onnx.checker.check_model(proto, full_check=True)
            if inline:
                proto = ox.inline(proto)
            ox.save_model(proto, tmp / f"{plan.name}.onnx")
            graphs[plan.name] = GraphSpec(
                file=f"{plan.name}.onnx", role=plan.role, inputs=_tensors(proto.graph.input),
                outputs=_tensors(proto.graph.output),
                dims={name: DimRange(min=a, opt=b, max=c) for name, (a, b, c) in plan.dim_ranges.items()},
                aliases=ox.in_place_aliases(proto),
            )
        say("writing manifest.json")
        manifest = Manifest(
            stage="onnx", family=model.spec.model.family, versions=_versions(), spec=model.spec.to_dict(),
            opsets={"": opset} | ({} if inline or not counts else {DOMAIN: 1}), ir_version=ox.IR_VERSION,
            custom_ops=[] if inline else [CustomOp(domain=DOMAIN, op_type=op, version=1, count=n,
                                                   trt_plugin=f"{DOMAIN}::{op}") for op, n in sorted(counts.items())],
            graphs=graphs, kv_cache=cache_plan(model),
            attention_ops=effective_attention_ops(choice, opset, bool(model.spec.model.attn_softcap), trt_plugins),
            weights={"sha256": weights_digest(model), "parameters": sum(p.numel() for p in model.parameters())}
            | ({"origin": model.origin} if getattr(model, "origin", None) else {}),  # an HF import: its folder
        )
        manifest.hash_files(tmp)
        manifest.write(tmp)
    return manifest


def _tensors(values) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append(TensorSpec(name=v.name, dtype=_DTYPES.get(t.elem_type, str(t.elem_type)), shape=shape))
    return out


def _versions() -> dict[str, str]:
    return {"effx": effx.__version__, "torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}
