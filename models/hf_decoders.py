"""Hugging Face decoders that already use efficient attention, layer by layer: Mistral and Phi-3 (a sliding
window in every layer), Qwen2 and Qwen3 (sliding windows in some layers), Gemma 2 (local and global layers
alternating, logit soft-capping) and Gemma 3 (five local layers to one global, a RoPE base per layer type,
q/k norms), with `gemma3` checkpoints' text model.

Each family's config is read as transformers reads it: the per-layer schedule comes from `layer_types` when
the config has it (transformers >= 4.5x writes it), else from the family's own rule (Qwen2/3:
`use_sliding_window` and `max_window_layers`; Gemma 2: even layers slide; Gemma 3:
`sliding_window_pattern`). A sliding window W is effx's causal local window W (keys i - W < j <= i, the
convention of transformers' sliding-window masks). The import keeps that structure: windowed layers become
`local` layers with ring-buffer caches, global layers `full` layers with contiguous caches, so the exported
decoder holds the memory its attention was designed for.

An option effx lacks (a RoPE type, partial rotary, ...) is a one-line SpecError naming the config key.
"""

from __future__ import annotations

from typing import Any

from effx.core.errors import SpecError

FAMILIES = ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3")
SLIDING = "sliding_attention"


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: a `gemma3` (multimodal) checkpoint's text_config, else the config itself."""
    if config.get("model_type") == "gemma3":
        text = dict(config.get("text_config") or {})
        text.setdefault("model_type", "gemma3_text")
        for key in ("tie_word_embeddings",):
            text.setdefault(key, config.get(key, True))
        return text
    return config


def _rope_parameters(c: dict, layer_type: str | None = None) -> dict:
    """RoPE parameters as transformers 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters, per layer type
    for Gemma 3) write them."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        return dict(params)
    out = dict(c.get("rope_scaling") or {})
    out.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    return out


def rope(c: dict, source: str, layer_type: str | None = None) -> dict:
    """{"theta": ..., "scaling": ... or None} for a layer type, refusing what effx does not implement."""
    params = _rope_parameters(c, layer_type)
    factor = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1.0, 1):
        raise SpecError(f"{source}: partial_rotary_factor={factor} is not supported; effx rotates the whole head")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if kind in (None, "default"):
        return {"theta": theta, "scaling": None}
    if kind == "linear":
        return {"theta": theta, "scaling": {"type": "linear", "factor": float(params["factor"])}}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"theta": theta, "scaling": {"type": "llama3"} | {k: params[k] for k in keys if k in params}}
    raise SpecError(f"{source}: rope_scaling.rope_type={kind!r} is not supported; effx has default, linear and llama3")


def layer_types(c: dict, source: str) -> list[str]:
    """"sliding_attention" or "full_attention" per layer, as the family's transformers code decides."""
    n = c["num_hidden_layers"]
    if c.get("layer_types"):
        types = list(c["layer_types"])
        bad = sorted(set(types) - {SLIDING, "full_attention"})
        if bad or len(types) != n:
            raise SpecError(f"{source}: layer_types={types} is not supported; effx takes {n} entries of "
                            "sliding_attention / full_attention")
        if SLIDING in types and not c.get("sliding_window"):
            raise SpecError(f"{source}: layer_types has sliding_attention but sliding_window is {c.get('sliding_window')}")
        return types
    mtype = c["model_type"]
    window = c.get("sliding_window")
    if mtype in ("mistral", "phi3"):
        return [SLIDING if window else "full_attention"] * n
    if mtype in ("qwen2", "qwen3"):
        on = bool(c.get("use_sliding_window")) and window
        first = c.get("max_window_layers", n)
        return [SLIDING if on and i >= first else "full_attention" for i in range(n)]
    if mtype == "gemma2":
        return [SLIDING if i % 2 == 0 else "full_attention" for i in range(n)]
    pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
    return [SLIDING if (i + 1) % pattern else "full_attention" for i in range(n)]


def _check(c: dict, source: str) -> None:
    if c.get("hidden_act", c.get("hidden_activation", "silu")) not in ("silu", "gelu_pytorch_tanh"):
        key = "hidden_activation" if "hidden_activation" in c else "hidden_act"
        raise SpecError(f"{source}: {key}={c.get(key)!r} is not supported; effx has silu (swiglu) and "
                        "gelu_pytorch_tanh (geglu_tanh) gated MLPs")
    if c["model_type"] in ("qwen2", "qwen3") and c.get("use_sliding_window") and c.get("sliding_window") is None:
        raise SpecError(f"{source}: use_sliding_window=true needs sliding_window")
    if c.get("attention_bias") and c["model_type"] != "qwen2":
        raise SpecError(f"{source}: attention_bias=true is not supported for {c['model_type']}")
    if c.get("mlp_bias"):
        raise SpecError(f"{source}: mlp_bias=true is not supported for {c['model_type']}")


def spec_data(c: dict, source: str) -> dict[str, Any]:
    """The RunSpec data (model, attention, kv_cache, layers) of a family's config."""
    _check(c, source)
    mtype = c["model_type"]
    gemma = mtype.startswith("gemma")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    model = {
        "family": "decoder", "vocab_size": c["vocab_size"], "d_model": d, "n_heads": heads,
        "n_kv_heads": c.get("num_key_value_heads") or heads, "n_layers": c["num_hidden_layers"],
        "d_ff": c["intermediate_size"], "max_seq_len": c.get("max_position_embeddings", 4096),
        "norm": "gemma_rmsnorm" if gemma else "rmsnorm", "positional": "rope",
        "norm_position": "sandwich" if gemma else "pre", "norm_eps": c.get("rms_norm_eps", 1e-6),
        "activation": "geglu_tanh" if gemma else "swiglu", "bias": False, "embed_norm": False, "final_norm": True,
        "tie_embeddings": bool(c.get("tie_word_embeddings", gemma)),
        "qk_norm": mtype in ("qwen3", "gemma3_text"),
    }
    if head_dim * heads != d:
        model["attention_head_dim"] = head_dim
    if mtype == "qwen2":
        model["qkv_bias"] = True  # Qwen2: q/k/v carry biases, o_proj and the MLP do not
    if gemma:
        model["attn_scale"] = float(c.get("query_pre_attn_scalar", head_dim)) ** -0.5
        model["embed_scale"] = float(d) ** 0.5
        for src, dst in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
            if c.get(src) is not None:
                model[dst] = float(c[src])
    types = layer_types(c, source)
    per_type = gemma and mtype == "gemma3_text"  # Gemma 3: local layers have a RoPE base of their own
    global_rope = rope(c, source, "full_attention" if per_type else None)
    model["rope_theta"], model["rope_scaling"] = global_rope["theta"], global_rope["scaling"]
    window = c.get("sliding_window")
    local = {"kind": "local", "window": int(window)} if window else None
    data: dict[str, Any] = {"model": model, "kv_cache": {"layout": "contiguous"}}
    if set(types) == {SLIDING}:
        data |= {"attention": local, "kv_cache": {"layout": "ring"}}
    elif set(types) == {"full_attention"}:
        data["attention"] = {"kind": "full"}
    else:
        sliding = {"attention": local, "kv_cache": {"layout": "ring"}}
        if per_type:
            if c.get("rope_local_base_freq") is not None and not isinstance(c.get("rope_parameters"), dict):
                sliding["rope"] = {"theta": float(c["rope_local_base_freq"])}
            else:
                sliding["rope"] = rope(c, source, SLIDING)
        data |= {"attention": {"kind": "full"},
                 "layers": {"pattern": ["sliding" if t == SLIDING else "global" for t in types],
                            "types": {"sliding": sliding, "global": {"attention": {"kind": "full"}}}}}
    return data


# ---------------------------------------------------------------------------------------------- weights
def prefixes(config: dict) -> tuple[str, ...]:
    if config.get("model_type") == "gemma3":  # the text model inside a multimodal checkpoint
        return ("model.language_model.", "language_model.model.", "model.", "")
    return ("model.", "")


def map_weights(ck, spec, config: dict) -> dict:
    """The effx state dict of a family's checkpoint (`ck` looks names up under the family's prefixes)."""
    m = spec.model
    mtype = text_config(config)["model_type"]
    gemma = mtype.startswith("gemma")
    out: dict[str, Any] = {"embed.weight": ck("embed_tokens.weight")}
    q_rows, kv_rows = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    for i in range(m.n_layers):
        s, d = f"layers.{i}", f"blocks.{i}"
        if mtype == "phi3":  # fused q|k|v and gate|up
            qkv = ck(f"{s}.self_attn.qkv_proj.weight")
            for name, rows in (("q_proj", slice(0, q_rows)), ("k_proj", slice(q_rows, q_rows + kv_rows)),
                               ("v_proj", slice(q_rows + kv_rows, q_rows + 2 * kv_rows))):
                out[f"{d}.attn.{name}.weight"] = qkv[rows].contiguous()
            gate_up = ck(f"{s}.mlp.gate_up_proj.weight")
            out[f"{d}.mlp.gate.weight"], out[f"{d}.mlp.up.weight"] = (t.contiguous() for t in gate_up.chunk(2, 0))
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                out[f"{d}.attn.{name}.weight"] = ck(f"{s}.self_attn.{name}.weight")
                if m.q_k_v_bias:
                    out[f"{d}.attn.{name}.bias"] = ck(f"{s}.self_attn.{name}.bias")
            for hf, fx in (("gate_proj", "gate"), ("up_proj", "up")):
                out[f"{d}.mlp.{fx}.weight"] = ck(f"{s}.mlp.{hf}.weight")
        out[f"{d}.attn.o_proj.weight"] = ck(f"{s}.self_attn.o_proj.weight")
        out[f"{d}.mlp.down.weight"] = ck(f"{s}.mlp.down_proj.weight")
        if m.qk_norm:
            out[f"{d}.attn.q_norm.weight"] = ck(f"{s}.self_attn.q_norm.weight")
            out[f"{d}.attn.k_norm.weight"] = ck(f"{s}.self_attn.k_norm.weight")
        out[f"{d}.norm1.weight"] = ck(f"{s}.input_layernorm.weight")
        if gemma:  # sandwich: post_attention_layernorm closes the attention, pre_feedforward opens the MLP
            out[f"{d}.norm1_post.weight"] = ck(f"{s}.post_attention_layernorm.weight")
            out[f"{d}.norm2.weight"] = ck(f"{s}.pre_feedforward_layernorm.weight")
            out[f"{d}.norm2_post.weight"] = ck(f"{s}.post_feedforward_layernorm.weight")
        else:
            out[f"{d}.norm2.weight"] = ck(f"{s}.post_attention_layernorm.weight")
    out["norm.weight"] = ck("norm.weight")
    if not m.tie_embeddings:
        out["lm_head.weight"] = ck("lm_head.weight") if ck.has("lm_head.weight") else out["embed.weight"].clone()
    return out
