"""The run spec: one typed, validated description of a run (model, attention, KV cache).

Loaded from TOML (`RunSpec.from_toml`) and overridden by CLI flags (`RunSpec.with_overrides`). Every
attention kind and cache layout is a registered pydantic model; which combinations work is declared in
their registry entries (effx.core.registry) and checked here, so a bad run fails before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from effx.core.errors import CompatibilityError, SpecError
from effx.core.registry import ATTENTION, CACHES, check_compatible, compatible_layouts


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- model
class RopeScaling(_Spec):
    """RoPE frequency scaling as in Hugging Face configs: `linear` divides positions by factor; `llama3`
    rescales low frequencies (Llama 3.1)."""

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)


class ModelSpec(_Spec):
    """The transformer around the attention."""

    family: Literal["encoder", "decoder"] = Field("encoder", description="encoder (BERT-like) or decoder (causal LM)")
    vocab_size: int = Field(1000, ge=2, description="token vocabulary size")
    d_model: int = Field(64, ge=8, description="hidden size")
    n_heads: int = Field(4, ge=1, description="query heads")
    n_kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA/MQA); default n_heads")
    n_layers: int = Field(2, ge=1, description="transformer blocks")
    d_ff: int = Field(256, ge=1, description="MLP hidden size")
    max_seq_len: int = Field(256, ge=2, description="longest sequence (positions, Linformer projections)")
    norm: Literal["layernorm", "rmsnorm", "gemma_rmsnorm"] = Field(
        "layernorm", description="normalisation (gemma_rmsnorm: x / rms(x) * (1 + w), in float32)")
    positional: Literal["learned", "rope"] | None = Field(
        None, description="learned embeddings or RoPE; default learned for encoders, rope for decoders"
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    rope_scaling: RopeScaling | None = Field(None, description="RoPE scaling (linear or llama3), as configured")
    norm_position: Literal["pre", "post", "sandwich"] = Field(
        "pre", description="pre-norm (GPT, Llama), post-norm (BERT) or sandwich (Gemma: norms before and after "
                           "attention and MLP)")
    norm_eps: float | None = Field(None, gt=0, description="norm epsilon; default 1e-5 (layernorm), 1e-6 (rmsnorm)")
    activation: Literal["gelu_tanh", "gelu", "swiglu", "geglu_tanh"] = Field(
        "gelu_tanh", description="MLP activation (swiglu: silu-gated, geglu_tanh: tanh-gelu-gated)")
    bias: bool = Field(True, description="biases in the attention and MLP projections")
    qkv_bias: bool | None = Field(None, description="biases in the q/k/v projections only (Qwen2); default bias")
    attention_head_dim: int | None = Field(None, ge=1, description="per-head size; default d_model / n_heads")
    qk_norm: bool = Field(False, description="RMS-normalise q and k per head before RoPE (Qwen3, Gemma 3)")
    attn_scale: float | None = Field(None, gt=0, description="query scale; default 1/sqrt(head_dim) "
                                                             "(Gemma: query_pre_attn_scalar^-0.5)")
    attn_softcap: float | None = Field(None, gt=0, description="attention-logit soft-capping c: tanh(s/c) c (Gemma 2)")
    final_softcap: float | None = Field(None, gt=0, description="final-logit soft-capping c: tanh(z/c) c (Gemma 2)")
    embed_scale: float | None = Field(None, gt=0, description="multiply token embeddings (Gemma: sqrt(d_model))")
    tie_embeddings: bool = Field(False, description="the LM head reuses the token embedding matrix")
    embed_norm: bool = Field(False, description="a norm right after the embeddings (BERT)")
    final_norm: bool = Field(True, description="a norm after the last block")
    seed: int = Field(0, ge=0, description="initialisation seed")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.attention_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                             "set model.attention_head_dim")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} (GQA groups)"
            )
        if self.family == "encoder" and self.kv_heads != self.n_heads:
            raise ValueError("model.n_kv_heads is for decoders (GQA/MQA); leave it unset for encoders")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if self.tie_embeddings and self.family != "decoder":
            raise ValueError("model.tie_embeddings ties the LM head: decoders only")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.n_heads

    @property
    def q_k_v_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    @property
    def pos_encoding(self) -> str:
        return self.positional or ("rope" if self.family == "decoder" else "learned")


# ------------------------------------------------------------------------------------------ attention
class FullAttentionSpec(_Spec):
    """Exact softmax attention (SDPA path, with a readable math path beside it)."""

    kind: Literal["full"] = "full"
    impl: Literal["sdpa", "math"] = Field("sdpa", description="fused SDPA or the explicit softmax(QK^T)V")


class LinformerSpec(_Spec):
    """Linformer (Wang et al. 2020): keys/values projected along the sequence to length k."""

    kind: Literal["linformer"] = "linformer"
    k: int = Field(32, ge=1, description="projected length")
    sharing: Literal["none", "headwise", "kv", "layerwise"] = Field(
        "none", description="E,F per head | shared across heads | E=F | one E for all layers and heads"
    )


class LocalSpec(_Spec):
    """Sliding-window attention: causal queries see the last `window` keys (incl. self); encoders |i-j| < window."""

    kind: Literal["local"] = "local"
    window: int = Field(32, ge=1, description="keys per causal query, including itself")


class BlockSparseSpec(_Spec):
    """Block-sparse attention on a fixed block layout (local, global and strided blocks)."""

    kind: Literal["block_sparse"] = "block_sparse"
    block_size: int = Field(16, ge=1, description="tokens per block")
    local_blocks: int = Field(1, ge=1, description="blocks each side a query block sees (incl. its own)")
    global_blocks: int = Field(1, ge=0, description="leading blocks every query sees")
    stride_blocks: int = Field(0, ge=0, description="also see every stride-th block back (0: off)")


class LinearSpec(_Spec):
    """Linear attention: phi(Q) (phi(K)^T V) with elu+1, FAVOR+ positive random features or Hedgehog's learned map."""

    kind: Literal["linear"] = "linear"
    feature_map: Literal["elu", "favor", "hedgehog"] = Field(
        "elu", description="elu (elu(x)+1), favor (FAVOR+) or hedgehog (learned: softmax(xW), softmax(-xW) concatenated)")
    nb_features: int = Field(64, ge=1, description="random features for favor")
    hedgehog_dim: int | None = Field(
        None, ge=1, description="hedgehog: width D' of the learned map per head (2 D' features); default head_dim")
    eps: float = Field(1e-6, gt=0, description="added to the normaliser")

    @model_validator(mode="after")
    def _check(self) -> LinearSpec:
        if self.hedgehog_dim is not None and self.feature_map != "hedgehog":
            raise ValueError(f"attention.hedgehog_dim={self.hedgehog_dim} sizes the hedgehog feature map, but "
                             f"attention.feature_map={self.feature_map}: set feature_map = hedgehog or drop hedgehog_dim")
        return self


class HierarchicalSpec(_Spec):
    """Hourglass (Nawrot et al. 2021): whole layers run at shortened resolutions (levels 1, 4, 16, 4, 1 over the
    layers for factors [1, 4, 16]): shortened between levels, upsampled back with a residual."""

    kind: Literal["hierarchical"] = "hierarchical"
    factors: list[int] = Field([1, 2], min_length=1, description="shorten factors of the hourglass levels")
    shorten: Literal["avg", "linear"] = Field("avg", description="pooling between levels: average or learned linear")
    upsample: Literal["repeat", "linear"] = Field("repeat", description="back up a level: repeat or learned linear")

    @model_validator(mode="after")
    def _check(self) -> HierarchicalSpec:
        f = self.factors
        if f[0] != 1:
            raise ValueError(f"attention.factors must start with 1 (full-resolution vanilla layers), got {f}")
        if any(b <= a or b % a for a, b in zip(f, f[1:], strict=False)):
            raise ValueError(f"attention.factors must increase, each dividing the next (e.g. [1, 4, 16]), got {f}")
        return self


AttentionSpec = Annotated[
    FullAttentionSpec | LinformerSpec | LocalSpec | BlockSparseSpec | LinearSpec | HierarchicalSpec,
    Field(discriminator="kind"),
]
_ATTENTION_CLASSES = {c.model_fields["kind"].default: c for c in (
    FullAttentionSpec, LinformerSpec, LocalSpec, BlockSparseSpec, LinearSpec, HierarchicalSpec)}


# ------------------------------------------------------------------------------------------- kv cache
class NoCacheSpec(_Spec):
    layout: Literal["none"] = "none"
    dtype: Literal["model"] = "model"


class ContiguousCacheSpec(_Spec):
    """[B, H_kv, S, D] per layer, grows by concatenation."""

    layout: Literal["contiguous"] = "contiguous"
    dtype: Literal["model"] = "model"


class PagedCacheSpec(_Spec):
    """A pool of fixed-size blocks per layer plus a per-sequence block table (vLLM-style)."""

    layout: Literal["paged"] = "paged"
    dtype: Literal["model"] = "model"
    block_size: int = Field(16, ge=1, description="tokens per block")
    num_blocks: int = Field(64, ge=1, description="blocks in the pool (shared by the batch)")


class RingCacheSpec(_Spec):
    """Fixed-size rolling buffer for sliding-window attention: token p lives in slot p mod window."""

    layout: Literal["ring"] = "ring"
    dtype: Literal["model"] = "model"
    window: int | None = Field(None, ge=1, description="slots; default the attention window")


class StateCacheSpec(_Spec):
    """Linear attention's recurrent state S = sum phi(k) v^T and z = sum phi(k): fixed size."""

    layout: Literal["state"] = "state"
    dtype: Literal["model"] = "model"


class MultiscaleCacheSpec(_Spec):
    """Hourglass: per layer, pooled K/V at its resolution plus the tail of the group being pooled."""

    layout: Literal["multiscale"] = "multiscale"
    dtype: Literal["model"] = "model"


KVCacheSpec = Annotated[
    NoCacheSpec | ContiguousCacheSpec | PagedCacheSpec | RingCacheSpec | StateCacheSpec | MultiscaleCacheSpec,
    Field(discriminator="layout"),
]


# ------------------------------------------------------------------------------------- per-layer schedule
class RopeSpec(_Spec):
    """A RoPE base (and scaling) of its own for one type of layer (Gemma 3: local layers 10 000, global 1e6)."""

    theta: float = Field(gt=0, description="RoPE base")
    scaling: RopeScaling | None = Field(None, description="RoPE scaling; none for this layer type")


class LayerType(_Spec):
    """One type of layer in a model that mixes them (Gemma-style local and global layers)."""

    attention: AttentionSpec = Field(default_factory=FullAttentionSpec)
    kv_cache: KVCacheSpec | None = Field(
        None, description="decoders: this type's cache; default ring for local, state for linear, else kv_cache")
    rope: RopeSpec | None = Field(None, description="RoPE of this type; default model.rope_theta/rope_scaling")


class LayerSchedule(_Spec):
    """Which type each layer is: `pattern` repeated over model.n_layers (["local"] * 5 + ["global"]: five
    local layers to one global), or one name per layer. A name that is an attention kind and not in `types`
    is that kind with the parameters of the top-level `attention` if it is of that kind, else its defaults."""

    pattern: list[str] = Field(min_length=1, description="layer type names, repeated over the layers")
    types: dict[str, LayerType] = Field(default_factory=dict, description="the layer types by name")


@dataclass(frozen=True)
class Layer:
    """One layer, resolved: what it computes and how a decoder caches it."""

    index: int
    type: str  # the schedule's type name, or the attention kind when the model has one kind
    attention: Any  # an AttentionSpec member
    kv_cache: Any  # a KVCacheSpec member
    rope_theta: float
    rope_scaling: RopeScaling | None


# -------------------------------------------------------------------------------------------- run spec
class RunSpec(_Spec):
    model: ModelSpec = Field(default_factory=ModelSpec)
    attention: AttentionSpec = Field(default_factory=FullAttentionSpec)
    kv_cache: KVCacheSpec = Field(default_factory=NoCacheSpec)
    layers: LayerSchedule | None = Field(None, description="per-layer attention and caches (mixed models)")

    @model_validator(mode="after")
    def _compatible(self) -> RunSpec:
        check_compatible(self)
        return self

    # -- per-layer view -------------------------------------------------------------------------------
    def layer(self, index: int) -> Layer:
        return self.resolved_layers()[index]

    def resolved_layers(self) -> list[Layer]:
        """Every layer's attention, cache and RoPE (the one kind of a simple spec, or the schedule's)."""
        m = self.model
        if self.layers is None:
            return [Layer(i, self.attention.kind, self.attention, self.kv_cache, m.rope_theta, m.rope_scaling)
                    for i in range(m.n_layers)]
        sched = self.layers
        if len(sched.pattern) > m.n_layers:
            raise CompatibilityError(f"layers.pattern has {len(sched.pattern)} entries for model.n_layers="
                                     f"{m.n_layers}; give at most one name per layer")
        out = []
        for i in range(m.n_layers):
            name = sched.pattern[i % len(sched.pattern)]
            if name in sched.types:
                t = sched.types[name]
            elif name in ATTENTION:
                t = LayerType(attention=self.attention if self.attention.kind == name else
                              _ATTENTION_CLASSES[name]())
            else:
                raise CompatibilityError(f"layers.pattern: layer {i} is {name!r}, neither a type in layers.types "
                                         f"({', '.join(sched.types) or 'none'}) nor an attention kind "
                                         f"({', '.join(ATTENTION)})")
            rope = t.rope
            out.append(Layer(i, name, t.attention, self._layer_cache(t),
                             rope.theta if rope else m.rope_theta, rope.scaling if rope else m.rope_scaling))
        return out

    def _layer_cache(self, t: LayerType):
        """A layer type's cache: its own, else the window- or state-sized layout its kind decodes from (ring
        for causal local attention, state for linear, multiscale for hourglass), else the model's kv_cache."""
        if self.model.family != "decoder" or self.kv_cache.layout == "none":
            return self.kv_cache
        if t.kv_cache is not None:
            return t.kv_cache
        default = {"local": RingCacheSpec(), "linear": StateCacheSpec(), "hierarchical": MultiscaleCacheSpec()}
        return default.get(t.attention.kind, self.kv_cache)

    @property
    def kinds(self) -> list[str]:
        """The attention kind of every layer."""
        return [layer.attention.kind for layer in self.resolved_layers()]

    @property
    def cache_layout(self) -> str:
        """The decoder's cache layout: one layout for every layer, or "hybrid" when layers differ."""
        layouts = {layer.kv_cache.layout for layer in self.resolved_layers()}
        return layouts.pop() if len(layouts) == 1 else "hybrid"

    def attention_summary(self) -> str:
        """"local" for a one-kind model, "local x5 + full x1" for a mixed one (reports, tables)."""
        kinds = self.kinds
        if len(set(kinds)) == 1:
            return kinds[0]
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        return " + ".join(f"{k} x{n}" for k, n in counts.items())

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: dict[str, Any], source: str = "spec") -> RunSpec:
        """Validate a nested dict; any problem becomes one SpecError line naming the field."""
        try:
            return cls.model_validate(data)
        except CompatibilityError:
            raise
        except ValidationError as exc:
            raise SpecError(f"{source}: {_first_error(exc)}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> RunSpec:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path}: no such spec file; write one with `effx init -o {path}`") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"{path}: not valid TOML ({exc}); fix the file or regenerate it with `effx init`") from None
        return cls.parse(data, source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "spec.json") -> RunSpec:
        return cls.parse(json.loads(text), source=source)

    def with_overrides(self, overrides: dict[str, Any], source: str = "command line") -> RunSpec:
        """Return a new spec with dotted-key overrides applied, e.g. {"attention.kind": "linformer", "attention.k": 64}.

        Changing attention.kind (or kv_cache.layout) starts that section from the new kind's defaults.
        """
        data = self.to_dict()
        for section, key in (("attention", "kind"), ("kv_cache", "layout")):
            new = overrides.get(f"{section}.{key}")
            if new is not None and new != data[section][key]:
                data[section] = {key: new}
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, field = dotted.partition(".")
            if data.get(section) is None:
                data[section] = {}
            data[section][field] = value
        return RunSpec.parse(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    # drop the discriminator tag pydantic inserts into the path (e.g. attention.linformer.k -> attention.k)
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in _TAGS)]
    where = ".".join(loc) or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown field {where}; see `effx models` for the fields of each kind"
    if err["type"] == "union_tag_invalid":
        return f"{where}: {msg}"
    if "input" in err and err["type"] not in ("value_error", "missing"):
        return f"{where}={err['input']!r}: {msg}"
    return f"{where}: {msg}" if not msg.startswith(("model.", "attention.", "kv_cache.")) else msg


_TAGS = {
    "full", "linformer", "local", "block_sparse", "linear", "hierarchical",
    "none", "contiguous", "paged", "ring", "state", "multiscale",
}


def describe() -> dict[str, Any]:
    """Everything `effx models --json` prints: kinds with parameters, layouts, and the compatibility matrix."""

    def params(cls_name: str, skip: str) -> list[dict[str, Any]]:
        cls = globals()[cls_name]
        out = []
        for name, f in cls.model_fields.items():
            if name == skip:
                continue
            ann = f.annotation
            type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            out.append({"name": name, "type": type_name, "default": f.get_default(call_default_factory=True),
                        "help": f.description or ""})
        return out

    matrix = {}
    for kind in ATTENTION:
        matrix[kind] = {fam: list(compatible_layouts(kind, fam)) for fam in ("encoder", "decoder")}
    return {
        "attention": [
            {"kind": e.kind, "summary": e.summary, "families": list(e.families), "onnx_op": e.onnx_op,
             "params": params(e.spec_class, "kind")}
            for e in ATTENTION.values()
        ],
        "kv_cache": [
            {"layout": e.layout, "summary": e.summary, "grows": e.grows, "params": params(e.spec_class, "layout")}
            for e in CACHES.values()
        ],
        "compatibility": matrix,
    }
