"""Run-spec flags for the CLI, generated from the spec classes (never listed by hand).

`--attention linformer --linformer-k 64 --linformer-sharing layerwise --kv-cache paged --paged-block-size 16`
and model flags (`--family decoder --d-model 128 ...`) map onto dotted overrides of the RunSpec.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer

from effx.core import spec as S
from effx.core.errors import SpecError

_ATTENTION = [S.FullAttentionSpec, S.LinformerSpec, S.LocalSpec, S.BlockSparseSpec, S.LinearSpec, S.HierarchicalSpec]
_CACHES = [S.PagedCacheSpec, S.RingCacheSpec]  # the layouts with parameters


def _kind(cls, tag: str) -> str:
    return cls.model_fields[tag].default


def _flag_type(annotation: Any) -> type:
    """CLI type of a spec field: ints and floats stay typed; literals and lists travel as strings."""
    if typing.get_origin(annotation) is list:
        return str  # comma-separated
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    first = args[0]
    if first in (int, float):
        return first
    return str


def _flags() -> list[tuple[str, str, type, str]]:
    """(python name, dotted spec key, type, help) for every generated flag."""
    out: list[tuple[str, str, type, str]] = []
    for name, f in S.ModelSpec.model_fields.items():
        out.append((f"model_{name}", f"model.{name}", _flag_type(f.annotation), f.description or ""))
    out.append(("attention_kind", "attention.kind", str, "attention kind (see `effx models`)"))
    for cls in _ATTENTION:
        kind = _kind(cls, "kind")
        for name, f in cls.model_fields.items():
            if name != "kind":
                out.append((f"{kind}_{name}", f"attention.{name}@{kind}", _flag_type(f.annotation),
                            f"[{kind}] {f.description or ''}"))
    out.append(("kv_cache_layout", "kv_cache.layout", str, "KV-cache layout (see `effx models`)"))
    out.append(("layer_pattern", "layers.pattern", str,
                "mix attention kinds layer by layer, repeated over the layers: e.g. local*5,full or local,full,linear"))
    for cls in _CACHES:
        layout = _kind(cls, "layout")
        for name, f in cls.model_fields.items():
            if name not in ("layout", "dtype"):
                out.append((f"{layout}_{name}", f"kv_cache.{name}@{layout}", _flag_type(f.annotation),
                            f"[{layout}] {f.description or ''}"))
    return out


_FLAGS = _flags()
_OPTION_NAME = {"model_family": "--family", "attention_kind": "--attention", "kv_cache_layout": "--kv-cache",
                "layer_pattern": "--layer-pattern"}


def _option(pyname: str) -> str:
    return _OPTION_NAME.get(pyname, "--" + pyname.removeprefix("model_").replace("_", "-"))


def overrides_from_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Flag values -> dotted overrides. A kind-specific flag also selects its kind when none was given."""
    out: dict[str, Any] = {}
    for pyname, key, _, _ in _FLAGS:
        value = values.get(pyname)
        if value is None:
            continue
        dotted, _, owner = key.partition("@")
        if dotted == "attention.factors" and isinstance(value, str):
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        if dotted == "layers.pattern" and isinstance(value, str):
            value = _pattern(value)
        out[dotted] = value
        if owner:
            section = dotted.split(".")[0]
            tag = "kind" if section == "attention" else "layout"
            selected = out.get(f"{section}.{tag}") or values.get("attention_kind" if tag == "kind" else "kv_cache_layout")
            if selected is None:
                out[f"{section}.{tag}"] = owner
            elif selected != owner:
                raise typer.BadParameter(f"{_option(pyname)} belongs to {tag} {owner}, but {selected} was chosen")
    return out


def _pattern(text: str) -> list[str]:
    """"local*5,full" -> ["local"] * 5 + ["full"]."""
    out: list[str] = []
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, times = part.partition("*")
        if times and not times.isdigit():
            raise typer.BadParameter(f"--layer-pattern {text!r}: {part!r} is not NAME or NAME*COUNT")
        out += [name] * (int(times) if times else 1)
    return out


def spec_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add every run-spec flag to a Typer command; the command receives them as `overrides: dict`."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "overrides"]
    for pyname, _, typ, help_text in _FLAGS:
        params.append(
            inspect.Parameter(
                pyname, inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, _option(pyname), help=help_text, rich_help_panel="Run spec"),
                annotation=typing.Optional[typ],  # noqa: UP045 - typer reads this annotation at runtime
            )
        )

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        flag_values = {name: kwargs.pop(name) for name, *_ in _FLAGS}
        try:
            kwargs["overrides"] = overrides_from_flags(flag_values)
        except typer.BadParameter as exc:
            raise SpecError(str(exc)) from None
        return fn(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def stage_flags(*option_classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the fields of the options classes (effx.core.options) to a Typer command as flags; the command
    receives one validated instance per class, as the keyword argument named after the class in snake case
    (ExportOptions -> export_options)."""

    def keyword(cls: type) -> str:
        return "".join(f"_{c.lower()}" if c.isupper() else c for c in cls.__name__).lstrip("_")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        names = {keyword(cls) for cls in option_classes}
        params = [p for p in sig.parameters.values() if p.name not in names]
        fields = []
        for cls in option_classes:
            for name, f in cls.model_fields.items():
                extra = f.json_schema_extra or {}
                decls = ["--" + name.replace("_", "-")] + ([extra["short"]] if "short" in extra else [])
                typ = f.annotation if f.annotation in (int, float, str, bool) else typing.Optional[_flag_type(f.annotation)]  # noqa: UP045
                params.append(inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                    default=typer.Option(f.default, *decls, help=f.description or "", rich_help_panel=cls.__name__)))
                fields.append((cls, name))

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for cls in option_classes:
                kwargs[keyword(cls)] = cls.parse({n: kwargs.pop(n) for c, n in fields if c is cls})
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper

    return decorate
