"""effx.models: the PyTorch reference: the attention zoo, KV-cache layouts, the encoder/decoder built from a
RunSpec, and checkpoint import (Hugging Face folders)."""

from __future__ import annotations

if __name__ != "effx.models":  # imported as a top-level name (a checkout's root on sys.path)
    raise ImportError(f"{__name__}: import effx.models (the folder models/ is mapped into the effx package)")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from effx.core.spec import RunSpec
from effx.models.cache import ContiguousCache, KVCache, MultiscaleCache, PagedCache, RingCache, StateCache
from effx.models.hf_import import import_hf  # noqa: I001 - after transformer, which it builds on
from effx.models.transformer import ATTENTION_CLASSES, EffxModel, build_model, load_model, save_model


def model_from(source: str | Path | None, spec: RunSpec | None = None, overrides: dict[str, Any] | None = None):
    """The model a stage works on: `hf:PATH` (a Hugging Face folder; `overrides` may swap its attention),
    an effx model folder, or (source None) the seeded initialisation of `spec`."""
    if source is None:
        if spec is None:
            raise ValueError("model_from needs a source or a spec")
        return build_model(spec)
    if str(source).startswith("hf:"):
        return import_hf(str(source)[3:], overrides or {})
    return load_model(source)


__all__ = [
    "ATTENTION_CLASSES", "ContiguousCache", "EffxModel", "KVCache", "MultiscaleCache", "PagedCache", "RingCache",
    "StateCache", "build_model", "import_hf", "load_model", "model_from", "save_model",
]
