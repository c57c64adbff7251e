"""Loading the effx TensorRT plugins (defined in effx.plugins.trt) before a network is parsed or an engine
is deserialised, for the nodes marked for them and only those.

Why only marked nodes: since TensorRT 10.7 a registered plugin wins over a model-local function of the same
name, and since 10.10 the parser also reads the plugin namespace from the node's domain, so once `effx::X`
is registered every `effx` node X meets it, including nodes exported without `--trt-plugins`, which lack
the inputs the plugin's fixed signature needs. So a plugin is registered only when every node of that op
in the graphs being parsed is marked (`plugin_namespace`); otherwise those nodes keep their function
bodies. Registration failing (no AOT plugins before TensorRT 10.9/10.12, no triton) is not fatal: the
marked nodes fall back to their function bodies, and the caller reports the note.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from effx.core.errors import EffxError
from effx.plugins.opspec import DOMAIN
from effx.plugins.trt import register_tensorrt_plugins
from effx.targets.compat import marked_for_plugin, walk


@dataclass
class PluginRouting:
    """Which effx ops go to plugins, which keep their function bodies, and why."""

    registered: list[str] = field(default_factory=list)  # "effx::Op" ids registered with TensorRT
    bodies: list[str] = field(default_factory=list)  # ops parsed from their function bodies
    notes: list[str] = field(default_factory=list)

    def record(self) -> list[dict]:
        return ([{"op": p.split("::")[-1], "plugin": p, "route": "plugin"} for p in self.registered]
                + [{"op": op, "plugin": None, "route": "function body"} for op in self.bodies])


def plugin_routing(models: Iterable[onnx.ModelProto]) -> tuple[set[str], set[str]]:
    """(ops whose every node is marked for a plugin, effx ops with some unmarked node)."""
    marked: set[str] = set()
    unmarked: set[str] = set()
    for model in models:
        for node, _ in walk(model.graph, ""):
            if node.domain != DOMAIN:
                continue
            (marked if marked_for_plugin(node) else unmarked).add(node.op_type)
    return marked - unmarked, unmarked


def register_plugins(models: Iterable[onnx.ModelProto] = (), ops: Iterable[str] | None = None,
                     arch: int | None = None) -> PluginRouting:
    """Register the plugins the marked nodes of `models` need (or exactly `ops`, for a runner loading
    engines whose build recorded them). Never raises for a TensorRT/triton that cannot register: the note
    says the marked nodes fall back to their function bodies."""
    models = list(models)
    if ops is None:
        wanted, unmarked = plugin_routing(models)
    else:
        wanted, unmarked = set(ops), set()
    routing = PluginRouting(bodies=sorted(unmarked))
    mixed = sorted(unmarked & {n.op_type for m in models for n, _ in walk(m.graph, "") if marked_for_plugin(n)})
    if mixed:
        routing.notes.append(f"{', '.join(mixed)}: some nodes are not marked for plugins (exported without "
                             "--trt-plugins), so no plugin is registered for them and all keep their function bodies")
    if not wanted:
        return routing
    try:
        ids = register_tensorrt_plugins(arch=arch, names=lambda name: name in wanted)
    except (EffxError, ImportError) as exc:  # EffxError covers MissingDependencyError (no triton/tensorrt)
        routing.bodies = sorted(set(routing.bodies) | wanted)
        routing.notes.append(f"effx plugins not registered ({str(exc).splitlines()[0]}); the marked nodes "
                             f"({', '.join(sorted(wanted))}) fall back to their ONNX function bodies")
        return routing
    routing.registered = sorted(i for i in ids if i.split("::")[-1] in wanted)
    return routing
