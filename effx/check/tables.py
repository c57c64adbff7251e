"""Rich tables for `effx models` (built from effx.core.registry.describe(), never by hand)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table


def _params(params: list[dict[str, Any]]) -> str:
    return "\n".join(f"{p['name']}={p['default']!r}" for p in params) or "-"


def kinds_table(info: dict[str, Any]) -> Table:
    t = Table(title="Attention kinds")
    for col in ("kind", "what", "parameters (default)", "families", "ONNX op"):
        t.add_column(col)
    for a in info["attention"]:
        t.add_row(a["kind"], escape(a["summary"]), _params(a["params"]), ", ".join(a["families"]),
                  f"effx::{a['onnx_op']}" if a["onnx_op"] else "ONNX Attention / MatMul+Softmax")
    return t


def layouts_table(info: dict[str, Any]) -> Table:
    t = Table(title="KV-cache layouts")
    for col in ("layout", "what", "parameters (default)", "grows with tokens"):
        t.add_column(col)
    for c in info["kv_cache"]:
        t.add_row(c["layout"], escape(c["summary"]), _params([p for p in c["params"] if p["name"] != "dtype"]),
                  "yes" if c["grows"] else "no")
    return t


def compatibility_table(info: dict[str, Any]) -> Table:
    layouts = [c["layout"] for c in info["kv_cache"]]
    t = Table(title="Compatibility (E: encoder, D: decoder)")
    t.add_column("attention")
    for layout in layouts:
        t.add_column(layout, justify="center")
    for kind, fams in info["compatibility"].items():
        cells = []
        for layout in layouts:
            mark = ("E" if layout in fams["encoder"] else "") + ("D" if layout in fams["decoder"] else "")
            cells.append(mark or "-")
        t.add_row(kind, *cells)
    return t


def compatibility_markdown(info: dict[str, Any]) -> str:
    layouts = [c["layout"] for c in info["kv_cache"]]
    rows = ["| attention | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
    for kind, fams in info["compatibility"].items():
        cells = [("E" if lay in fams["encoder"] else "") + ("D" if lay in fams["decoder"] else "") or "-"
                 for lay in layouts]
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


_TARGET_COLUMNS = ("name", "backend", "sm", "tensorrt", "precisions", "dla_cores", "memory_gb", "workspace_gb",
                   "op_flavours")


def _cell(row: dict[str, Any], col: str) -> str:
    value = row[col]
    if col == "name" and row["aliases"]:
        value = f"{value} ({', '.join(row['aliases'])})"
    if col == "name" and row.get("unsupported"):  # refused before any work; `effx build` says why
        value = f"{value} (unsupported)"
    if col == "sm" and value is not None:
        value = f"sm_{value}"
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else ("-" if value is None else str(value))
    return text + (" (unverified)" if col in row["unverified"] else "")


def targets_rich_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="Targets")
    for col in _TARGET_COLUMNS:
        t.add_column(col)
    for r in rows:
        t.add_row(*(escape(_cell(r, c)) for c in _TARGET_COLUMNS))
    return t


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(_TARGET_COLUMNS) + " |", "|---" * len(_TARGET_COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r, c) for c in _TARGET_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
