"""Import a local Hugging Face model folder (no network) as an EffxModel.

    model = import_hf("path/to/bert")                                            # same weights, full attention
    model = import_hf("path/to/bert", {"attention.kind": "linformer", "attention.k": 32})  # attention swap

Supported `model_type`s: bert, roberta, distilbert (encoders: forward returns last_hidden_state) and gpt2,
llama (decoders: logits; GQA via num_key_value_heads, RoPE scaling `linear` and `llama3`). The folder needs
config.json plus model.safetensors or pytorch_model.bin, either possibly sharded with its *.index.json.
config.json is read with `json` and the weights with `safetensors` / `torch.load(weights_only=True)`, so
transformers is not needed to import (only to write such folders).

Mapping notes:
- BERT / RoBERTa: post-norm, a norm after the embeddings, no final norm, exact gelu. effx has no token
  types, so token_type_embeddings[0] (what HF uses when token_type_ids is omitted) is folded into every
  position embedding. RoBERTa positions start at padding_idx + 1: rows padding_idx+1 .. are used and
  max_seq_len = max_position_embeddings - padding_idx - 1 (this assumes right padding and no pad token
  inside the real tokens, as HF's position ids from input_ids do then).
- DistilBERT: like BERT without token types (eps 1e-12 as in HF).
- GPT-2: pre-norm, learned positions, Conv1D weights transposed, c_attn split into q/k/v; lm_head gets a
  copy of wte (effx does not tie it).
- Llama: RMSNorm, SwiGLU, RoPE in the same rotate-half convention as HF (no permutation needed).

Overrides: the architecture (model.*) comes from config.json; only model.max_seq_len, model.seed,
attention.* and kv_cache.* may be overridden (decoders default to kv_cache.layout = contiguous, or the first
layout the chosen attention kind supports; encoders to none). Swapping the attention kind loads every weight
that exists (embeddings, q/k/v/o projections, MLP, norms) and leaves the new kind's own parameters at effx's
seeded initialisation: Linformer E/F: effx's init (see models/linformer.py init_projection: N(0, 1/k), per
head, head-shared, E=F or one layerwise E per `attention.sharing`); local / block-sparse / hierarchical /
linear elu: no new parameters; FAVOR+: seeded random features (models/linear.py, from model.seed). Swapped
models need fine-tuning to recover accuracy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from effx.core.atomic import atomic_dir
from effx.core.errors import ArtifactError, SpecError
from effx.core.registry import ATTENTION, compatible_layouts
from effx.core.spec import RunSpec
from effx.models import hf_decoders
from effx.models.transformer import build_model, save_model

SUPPORTED = ("bert", "roberta", "distilbert", "gpt2", "llama", *hf_decoders.FAMILIES)
OVERRIDABLE_MODEL_FIELDS = ("model.max_seq_len", "model.seed")

# an effx parameter a swapped attention kind adds (not in the HF checkpoint): anything on blocks.i.attn
# except the four projections, or a model-wide shared tensor (layerwise Linformer E)
_NEW_ATTENTION_PARAM = re.compile(
    r"^(blocks\.\d+\.attn\.(?!(q|k|v|o)_proj\.|q_norm\.|k_norm\.)[A-Za-z0-9_]+|shared\.[A-Za-z0-9_]+)$")


# ------------------------------------------------------------------------------------------------ spec
def hf_spec(config: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "config.json") -> RunSpec:
    """The RunSpec for a Hugging Face config dict, with allowed overrides applied."""
    mtype = config.get("model_type")
    if mtype not in SUPPORTED:
        raise SpecError(f"{source}: model_type {mtype!r} is not supported; effx imports {', '.join(SUPPORTED)}")
    native = hf_decoders.spec_data(hf_decoders.text_config(config), source) if mtype in hf_decoders.FAMILIES else None
    model = native["model"] if native else _MODEL_FIELDS[mtype](config, source)
    overrides = dict(overrides or {})
    for key in overrides:
        if key.startswith("model.") and key not in OVERRIDABLE_MODEL_FIELDS:
            raise SpecError(
                f"{key} comes from {source} and cannot be overridden on import; allowed: "
                f"{', '.join(OVERRIDABLE_MODEL_FIELDS)}, attention.*, kv_cache.*"
            )
        if not key.startswith(("model.", "attention.", "kv_cache.")):
            raise SpecError(f"unknown override {key}; use model.max_seq_len, model.seed, attention.* or kv_cache.*")
    hf_max = model["max_seq_len"]
    new_max = overrides.get("model.max_seq_len")
    if new_max is not None and model.get("positional") == "learned" and new_max > hf_max:
        raise SpecError(
            f"model.max_seq_len={new_max} exceeds the {hf_max} learned positions in {source}; choose <= {hf_max}"
        )
    if native is not None and "attention.kind" not in overrides:  # the checkpoint's own per-layer attention
        base = RunSpec.parse({k: v for k, v in native.items()}, source=source)
        return base.with_overrides(overrides, source=f"{source} (with overrides)") if overrides else base
    layout = "none"
    if model["family"] == "decoder":
        layout = "contiguous"
        if "kv_cache.layout" not in overrides and overrides.get("attention.kind") not in (None, "full"):
            kind = overrides["attention.kind"]
            layouts = [x for x in compatible_layouts(kind, "decoder") if x != "none"] if kind in ATTENTION else []
            if layouts:
                layout = "contiguous" if "contiguous" in layouts else layouts[0]
            # else: leave contiguous and let the spec's compatibility check name the problem
    base = RunSpec.parse({"model": model, "attention": {"kind": "full"}, "kv_cache": {"layout": "none"}}, source=source)
    return base.with_overrides({"kv_cache.layout": layout} | overrides, source=f"{source} (with overrides)")


def _act(name: str | None, source: str, key: str) -> str:
    acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if name not in acts:
        raise SpecError(f"{source}: {key}={name!r} is not supported; effx has gelu (exact) and gelu_tanh (gelu_new)")
    return acts[name]


def _bert_fields(c: dict, source: str) -> dict:
    offset = _roberta_offset(c)
    return {
        "family": "encoder", "vocab_size": c["vocab_size"], "d_model": c["hidden_size"],
        "n_heads": c["num_attention_heads"], "n_layers": c["num_hidden_layers"], "d_ff": c["intermediate_size"],
        "max_seq_len": c["max_position_embeddings"] - offset, "norm": "layernorm", "positional": "learned",
        "norm_position": "post", "norm_eps": c.get("layer_norm_eps", 1e-12),
        "activation": _act(c.get("hidden_act", "gelu"), source, "hidden_act"), "bias": True, "embed_norm": True,
        "final_norm": False,
    }


def _roberta_offset(c: dict) -> int:
    # RoBERTa numbers real positions from padding_idx + 1 (create_position_ids_from_input_ids)
    return c.get("pad_token_id", 1) + 1 if c.get("model_type") == "roberta" else 0


def _distilbert_fields(c: dict, source: str) -> dict:
    return {
        "family": "encoder", "vocab_size": c["vocab_size"], "d_model": c["dim"], "n_heads": c["n_heads"],
        "n_layers": c["n_layers"], "d_ff": c["hidden_dim"], "max_seq_len": c["max_position_embeddings"],
        "norm": "layernorm", "positional": "learned", "norm_position": "post", "norm_eps": 1e-12,
        "activation": _act(c.get("activation", "gelu"), source, "activation"), "bias": True, "embed_norm": True,
        "final_norm": False,
    }


def _gpt2_fields(c: dict, source: str) -> dict:
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(key):
            raise SpecError(f"{source}: {key}=true is not supported by effx; only plain GPT-2 blocks import")
    if c.get("scale_attn_weights") is False:
        raise SpecError(f"{source}: scale_attn_weights=false is not supported; effx scales by 1/sqrt(head_dim)")
    d = c["n_embd"]
    return {
        "family": "decoder", "vocab_size": c["vocab_size"], "d_model": d, "n_heads": c["n_head"],
        "n_layers": c["n_layer"], "d_ff": c.get("n_inner") or 4 * d, "max_seq_len": c["n_positions"],
        "norm": "layernorm", "positional": "learned", "norm_position": "pre",
        "norm_eps": c.get("layer_norm_epsilon", 1e-5),
        "activation": _act(c.get("activation_function", "gelu_new"), source, "activation_function"), "bias": True,
        "embed_norm": False, "final_norm": True,
    }


def _llama_fields(c: dict, source: str) -> dict:
    d, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise SpecError(f"{source}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={d}; "
                        "effx needs head_dim = hidden_size / num_attention_heads")
    if c.get("hidden_act", "silu") != "silu":
        raise SpecError(f"{source}: hidden_act={c.get('hidden_act')!r} is not supported; effx's swiglu uses silu")
    attention_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise SpecError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported; "
                        "effx has one model.bias for attention and MLP")
    if c.get("pretraining_tp", 1) not in (1, None):
        raise SpecError(f"{source}: pretraining_tp={c['pretraining_tp']} is not supported; re-save with pretraining_tp=1")
    theta, scaling = _rope(c, source)
    return {
        "family": "decoder", "vocab_size": c["vocab_size"], "d_model": d, "n_heads": heads,
        "n_kv_heads": c.get("num_key_value_heads") or heads, "n_layers": c["num_hidden_layers"],
        "d_ff": c["intermediate_size"], "max_seq_len": c.get("max_position_embeddings", 2048), "norm": "rmsnorm",
        "positional": "rope", "rope_theta": theta, "rope_scaling": scaling, "norm_position": "pre",
        "norm_eps": c.get("rms_norm_eps", 1e-6), "activation": "swiglu", "bias": attention_bias,
        "embed_norm": False, "final_norm": True,
    }


def _rope(c: dict, source: str) -> tuple[float, dict | None]:
    # transformers 4.x: rope_theta + rope_scaling {"type"|"rope_type": ...}; 5.x: rope_parameters {rope_theta, rope_type}
    params = dict(c.get("rope_scaling") or {}) | dict(c.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise SpecError(f"{source}: partial_rotary_factor != 1 is not supported; effx rotates the whole head")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": params["factor"]}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"type": "llama3"} | {k: params[k] for k in keys if k in params}
    raise SpecError(f"{source}: rope type {kind!r} is not supported; effx has default, linear and llama3")


_MODEL_FIELDS: dict[str, Callable[[dict, str], dict]] = {
    "bert": _bert_fields, "roberta": _bert_fields, "distilbert": _distilbert_fields, "gpt2": _gpt2_fields,
    "llama": _llama_fields,
}


# --------------------------------------------------------------------------------------------- weights
def read_config(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder; pass a local Hugging Face model folder "
                            "(config.json + model.safetensors, as written by save_pretrained)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ArtifactError(f"{cfg}: not found; a Hugging Face model folder needs config.json "
                            "(write it with model.save_pretrained(folder))")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{cfg}: not valid JSON ({exc}); re-save it with model.save_pretrained") from None


def read_weights(path: str | Path) -> dict[str, Any]:
    """All tensors of the checkpoint in `path` (single file or shards listed by an index json)."""
    folder = Path(path)

    def load(file: Path) -> dict[str, Any]:
        if not file.is_file():
            raise ArtifactError(f"{file}: not found (listed by the index json); copy the missing shard into {folder}")
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(str(file), map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return load(folder / single)
        if (folder / index).is_file():
            try:
                files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as exc:
                raise ArtifactError(f"{folder / index}: no weight_map ({exc}); re-save with save_pretrained") from None
            state: dict[str, Any] = {}
            for f in files:
                state.update(load(folder / f))
            return state
    raise ArtifactError(
        f"{folder}: no weights found (model.safetensors, pytorch_model.bin or their *.index.json shards); "
        "save them with model.save_pretrained(folder)"
    )


class _Checkpoint:
    """Name lookup over an HF state dict, tolerating the task-head prefixes (bert., model., ...)."""

    def __init__(self, state: dict, prefixes: tuple[str, ...], source: str):
        self.state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
                      for k, v in state.items()}
        self.prefixes, self.source = prefixes, source

    def has(self, name: str) -> bool:
        return any(p + name in self.state for p in self.prefixes)

    def __call__(self, name: str):
        for p in self.prefixes:
            if p + name in self.state:
                return self.state[p + name].float()
        raise ArtifactError(f"{self.source}: tensor {self.prefixes[0]}{name} is missing from the checkpoint; "
                            "is the folder complete and its config.json the right one?")


def _linear(out: dict, dst: str, w, b=None) -> None:
    out[f"{dst}.weight"] = w
    if b is not None:
        out[f"{dst}.bias"] = b


def _norm(out: dict, dst: str, ck: _Checkpoint, src: str, bias: bool = True) -> None:
    out[f"{dst}.weight"] = ck(f"{src}.weight")
    if bias:
        out[f"{dst}.bias"] = ck(f"{src}.bias")


# BERT-family checkpoint names per effx role; {s} is the layer prefix
_ENCODER_NAMES = {
    "bert": {"layer": "encoder.layer.{i}", "q_proj": "{s}.attention.self.query", "k_proj": "{s}.attention.self.key",
             "v_proj": "{s}.attention.self.value", "o_proj": "{s}.attention.output.dense",
             "norm1": "{s}.attention.output.LayerNorm", "mlp.up": "{s}.intermediate.dense",
             "mlp.down": "{s}.output.dense", "norm2": "{s}.output.LayerNorm"},
    "distilbert": {"layer": "transformer.layer.{i}", "q_proj": "{s}.attention.q_lin", "k_proj": "{s}.attention.k_lin",
                   "v_proj": "{s}.attention.v_lin", "o_proj": "{s}.attention.out_lin", "norm1": "{s}.sa_layer_norm",
                   "mlp.up": "{s}.ffn.lin1", "mlp.down": "{s}.ffn.lin2", "norm2": "{s}.output_layer_norm"},
}


def _map_post_norm_encoder(ck: _Checkpoint, spec: RunSpec, config: dict) -> dict:
    """BERT, RoBERTa, DistilBERT: embeddings (+ folded token type 0), then post-norm blocks."""
    m = spec.model
    names = _ENCODER_NAMES["distilbert" if config["model_type"] == "distilbert" else "bert"]
    off = _roberta_offset(config)
    out = {"embed.weight": ck("embeddings.word_embeddings.weight")}
    pos = ck("embeddings.position_embeddings.weight")[off:off + m.max_seq_len]
    if ck.has("embeddings.token_type_embeddings.weight"):
        pos = pos + ck("embeddings.token_type_embeddings.weight")[0]  # token_type_ids = 0 folded in
    out["pos_embed.weight"] = pos
    _norm(out, "embed_norm", ck, "embeddings.LayerNorm")
    for i in range(m.n_layers):
        s, d = names["layer"].format(i=i), f"blocks.{i}"
        for role in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.up", "mlp.down"):
            src = names[role].format(s=s)
            dst = f"{d}.attn.{role}" if role.endswith("_proj") else f"{d}.{role}"
            _linear(out, dst, ck(f"{src}.weight"), ck(f"{src}.bias"))
        for role in ("norm1", "norm2"):
            _norm(out, f"{d}.{role}", ck, names[role].format(s=s))
    return out


def _map_gpt2(ck: _Checkpoint, spec: RunSpec, config: dict) -> dict:
    m = spec.model
    wte = ck("wte.weight")
    out = {"embed.weight": wte, "pos_embed.weight": ck("wpe.weight")[:m.max_seq_len]}
    for i in range(m.n_layers):
        s, d = f"h.{i}", f"blocks.{i}"
        _norm(out, f"{d}.norm1", ck, f"{s}.ln_1")
        # Conv1D stores (in, out): transpose; c_attn packs q | k | v along out
        w, b = ck(f"{s}.attn.c_attn.weight").t(), ck(f"{s}.attn.c_attn.bias")
        for j, fx in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(j * m.d_model, (j + 1) * m.d_model)
            _linear(out, f"{d}.attn.{fx}", w[rows].contiguous(), b[rows].contiguous())
        _linear(out, f"{d}.attn.o_proj", ck(f"{s}.attn.c_proj.weight").t().contiguous(), ck(f"{s}.attn.c_proj.bias"))
        _norm(out, f"{d}.norm2", ck, f"{s}.ln_2")
        _linear(out, f"{d}.mlp.up", ck(f"{s}.mlp.c_fc.weight").t().contiguous(), ck(f"{s}.mlp.c_fc.bias"))
        _linear(out, f"{d}.mlp.down", ck(f"{s}.mlp.c_proj.weight").t().contiguous(), ck(f"{s}.mlp.c_proj.bias"))
    _norm(out, "norm", ck, "ln_f")
    out["lm_head.weight"] = ck("lm_head.weight") if ck.has("lm_head.weight") else wte.clone()
    return out


def _map_llama(ck: _Checkpoint, spec: RunSpec, config: dict) -> dict:
    m = spec.model
    bias = m.bias

    def lin(dst: str, src: str) -> None:
        _linear(out, dst, ck(f"{src}.weight"), ck(f"{src}.bias") if bias else None)

    embed = ck("embed_tokens.weight")
    out = {"embed.weight": embed}
    for i in range(m.n_layers):
        s, d = f"layers.{i}", f"blocks.{i}"
        out[f"{d}.norm1.weight"] = ck(f"{s}.input_layernorm.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):  # HF's rotate_half RoPE = effx's Rotary: no permutation
            lin(f"{d}.attn.{p}", f"{s}.self_attn.{p}")
        out[f"{d}.norm2.weight"] = ck(f"{s}.post_attention_layernorm.weight")
        for hf, fx in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            lin(f"{d}.mlp.{fx}", f"{s}.mlp.{hf}")
    out["norm.weight"] = ck("norm.weight")
    # lm_head.weight sits outside the "model." prefix; absent when tied to the embedding
    out["lm_head.weight"] = ck("lm_head.weight") if ck.has("lm_head.weight") else embed.clone()
    return out


# prefixes under which each architecture's base-model tensors may sit (base model saved alone, or a task model)
_PREFIXES = {"bert": ("", "bert."), "roberta": ("", "roberta."), "distilbert": ("", "distilbert."),
             "gpt2": ("transformer.", ""), "llama": ("model.", "")}
_MAPPERS = {"bert": _map_post_norm_encoder, "roberta": _map_post_norm_encoder, "distilbert": _map_post_norm_encoder, "gpt2": _map_gpt2,
            "llama": _map_llama}


def hf_state_dict(config: dict[str, Any], state: dict[str, Any], spec: RunSpec, source: str = "checkpoint") -> dict:
    """Map an HF state dict onto effx names (the keys of a full-attention EffxModel for `spec`)."""
    mtype = config["model_type"]
    if mtype in hf_decoders.FAMILIES:
        return hf_decoders.map_weights(_Checkpoint(state, hf_decoders.prefixes(config), source), spec, config)
    ck = _Checkpoint(state, _PREFIXES[mtype], source)
    return _MAPPERS[mtype](ck, spec, config)


def load_mapped(model, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Load mapped weights: strict where the checkpoint's attention is kept; for a swapped kind, only that
    kind's new parameters (blocks.i.attn.<not q/k/v/o_proj, q/k_norm>, shared.*) may be missing, and nothing may
    be left over."""
    if set(model.spec.kinds) <= {"full", "local"}:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{source}: weights do not fit the effx model ({_first_line(exc)})") from None
        return
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ArtifactError(f"{source}: weights do not fit the effx model ({_first_line(exc)})") from None
    bad_missing = [k for k in result.missing_keys if not _NEW_ATTENTION_PARAM.match(k)]
    if bad_missing or result.unexpected_keys:
        what = (f"missing {', '.join(bad_missing[:4])}" if bad_missing else
                f"unexpected {', '.join(result.unexpected_keys[:4])}")
        raise ArtifactError(f"{source}: weights do not fit attention.kind={model.spec.attention_summary()} ({what}); "
                            "only the new attention parameters may stay at effx's initialisation")


def _first_line(exc: Exception) -> str:
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)


# ------------------------------------------------------------------------------------------------ entry
def import_hf(path: str | Path, overrides: dict[str, Any] | None = None):
    """Read a local Hugging Face folder and return the EffxModel (eval mode) with its weights.

    `overrides` are dotted spec overrides (as RunSpec.with_overrides): attention.*, kv_cache.*,
    model.max_seq_len and model.seed; e.g. {"attention.kind": "linformer", "attention.k": 32}.
    """
    folder = Path(path)
    config = read_config(folder)
    source = str(folder / "config.json")
    spec = hf_spec(config, overrides, source=source)
    state = read_weights(folder)
    mapped = hf_state_dict(config, state, spec, source=str(folder))
    model = build_model(spec)
    load_mapped(model, mapped, source=str(folder))
    native = hf_spec(config, {"model.max_seq_len": spec.model.max_seq_len}, source=source).attention_summary()
    # saved as origin.json: validate measures the drift of a swapped attention from the checkpoint's own
    model.origin = {"hf": str(folder.resolve()), "model_type": config["model_type"], "attention": native}
    return model.eval()


def import_to_folder(path: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                     overwrite: bool = False):
    """`effx import`: import the Hugging Face folder `path` and save it as an effx model folder at `out`
    (written atomically); returns the model."""
    model = import_hf(path, overrides)
    with atomic_dir(Path(out), "import", overwrite=overwrite) as tmp:
        save_model(model, tmp)
    return model


__all__ = ["SUPPORTED", "hf_spec", "hf_state_dict", "import_hf", "import_to_folder", "load_mapped", "read_config",
           "read_weights"]
