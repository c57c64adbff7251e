"""Lazy imports of heavy or optional dependencies, with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from effx.core.errors import MissingDependencyError

# top-level package -> the effx extra that installs it
_EXTRA_FOR = {
    "tensorrt": "tensorrt",
    "modelopt": "tensorrt",
    "transformers": "hf",
    "tokenizers": "hf",
    "matplotlib": "plot",
    "onnxconverter_common": "quant",
    "triton": "triton",
    "ray": "cluster",
}


def lazy_import(name: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import `name` now, or raise MissingDependencyError saying which extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # noqa: F841 - the reason is in the message
        root = name.split(".")[0]
        extra = extra or _EXTRA_FOR.get(root, root)
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
