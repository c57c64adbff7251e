"""Write a RunSpec as commented TOML (what `effx init` produces), comments taken from the field help."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from effx.core.registry import compatible_layouts
from effx.core.spec import RunSpec


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items() if x is not None) + " }"
    if isinstance(v, BaseModel):
        return _value(v.model_dump(mode="json", exclude_none=True))
    return repr(v)


def _section(name: str, model: BaseModel, note: str = "") -> list[str]:
    lines = [f"[{name}]"] + ([f"# {note}"] if note else [])
    for field, info in type(model).model_fields.items():
        value = getattr(model, field)
        comment = f"  # {info.description}" if info.description else ""
        if value is None:
            lines.append(f"# {field} = ...{comment}")
        else:
            lines.append(f"{field} = {_value(value)}{comment}")
    return lines + [""]


def spec_to_commented_toml(spec: RunSpec) -> str:
    kinds = "full | linformer | local | block_sparse | linear | hierarchical"
    layouts = ", ".join(compatible_layouts(spec.attention.kind, spec.model.family))
    lines = [
        "# effx run spec. Flags override these values, e.g. `effx run spec.toml --attention local --local-window 64`.",
        "# `effx models` lists every attention kind, its parameters and the cache layouts it works with.",
        "",
    ]
    lines += _section("model", spec.model)
    lines += _section("attention", spec.attention, f"kind: {kinds}")
    lines += _section("kv_cache", spec.kv_cache, f"layouts for this attention and family: {layouts}")
    if spec.layers is not None:
        lines += ["[layers]", "# each layer's type: the pattern repeats over model.n_layers (or names every layer)",
                  f"pattern = {_value(spec.layers.pattern)}", ""]
        for name, t in spec.layers.types.items():
            lines += [f"[layers.types.{name}]"]
            lines += [f"{field} = {_value(getattr(t, field))}" for field in type(t).model_fields
                      if getattr(t, field) is not None] + [""]
    return "\n".join(lines)
