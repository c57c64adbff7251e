"""effx.models: the attention zoo, KV-cache layouts and the encoder/decoder built from a RunSpec."""

from effx.models.cache import ContiguousCache, KVCache, MultiscaleCache, PagedCache, RingCache, StateCache
from effx.models.transformer import ATTENTION_CLASSES, EffxModel, build_model, load_model, save_model

__all__ = [
    "ATTENTION_CLASSES", "ContiguousCache", "EffxModel", "KVCache", "MultiscaleCache", "PagedCache", "RingCache",
    "StateCache", "build_model", "load_model", "save_model",
]
