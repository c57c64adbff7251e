"""Lazy imports of heavy or optional dependencies, with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from effx.errors import MissingDependencyError

_EXTRA_FOR = {
    "tensorrt": "tensorrt",
    "tensorrt.plugin": "tensorrt",
    "transformers": "hf",
    "matplotlib": "plot",
    "matplotlib.pyplot": "plot",
    "onnxconverter_common": "quant",
    "triton": "triton",
    "triton.language": "triton",
}


def lazy_import(name: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import `name` now, or raise MissingDependencyError saying which extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # noqa: F841 - the reason is in the message
        extra = extra or _EXTRA_FOR.get(name, name.split(".")[0])
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"{name} is not installed{why}: pip install 'effx[{extra}]' ({exc.__class__.__name__}: {exc})"
        ) from None


def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True
