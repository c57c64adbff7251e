"""A second, independent implementation of the effx models, written from the papers' definitions (and the
README's "Definitions that matter for parity") straight from a model's weights: the test oracle.

It shares no code with effx.models or effx.plugins (only the weights and the spec), so a semantic error in
effx's own math (a mask edge, a scale, a head mapping, a padding rule) cannot hide in both. It favours
plain loops and explicit masks over speed: tiny models only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG = -1e30  # a masked score; rows with no allowed key get uniform weights (the mean of the values)


def _linear(x: Tensor, sd: dict, name: str) -> Tensor:
    w, b = sd[f"{name}.weight"], sd.get(f"{name}.bias")
    return x @ w.T + (0 if b is None else b)


def _norm(x: Tensor, sd: dict, name: str, kind: str, eps: float | None) -> Tensor:
    if kind in ("rmsnorm", "gemma_rmsnorm"):
        eps = 1e-6 if eps is None else eps
        w = sd[f"{name}.weight"] + (1.0 if kind == "gemma_rmsnorm" else 0.0)  # Gemma: (1 + w)
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    eps = 1e-5 if eps is None else eps
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _mlp(x: Tensor, sd: dict, p: str, activation: str) -> Tensor:
    up = _linear(x, sd, f"{p}.up")
    if activation == "swiglu":
        gate = _linear(x, sd, f"{p}.gate")
        h = gate * torch.sigmoid(gate) * up
    elif activation == "geglu_tanh":
        g = _linear(x, sd, f"{p}.gate")
        h = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * up
    elif activation == "gelu":
        h = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
    else:  # gelu_tanh
        h = 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
    return _linear(h, sd, f"{p}.down")


def _rope(x: Tensor, positions: Tensor, theta: float, scaling) -> Tensor:
    """Rotate each pair (x_j, x_{j + D/2}) as a complex number by angle position * theta^(-2j/D)."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    if scaling is not None:
        assert scaling.type == "linear", "the oracle knows linear RoPE scaling only"
        freq = freq / scaling.factor
    angle = positions.double()[:, None, :, None] * freq  # (B,1,N,D/2)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def _allowed(kind: str, a, i: Tensor, j: Tensor, causal: bool) -> Tensor:
    """Which key position j a query at position i may see (i: (N,1), j: (1,N))."""
    if kind == "local":
        return ((j <= i) & (j > i - a.window)) if causal else ((i - j).abs() < a.window)
    if kind == "block_sparse":
        qb, kb = i // a.block_size, j // a.block_size
        d = qb - kb
        if causal:
            ok = ((d >= 0) & (d < a.local_blocks)) | ((kb < a.global_blocks) & (d >= 0))
            if a.stride_blocks:
                ok |= (d >= 0) & (d % a.stride_blocks == 0)
            return ok & (j <= i)
        ok = (d.abs() < a.local_blocks) | (kb < a.global_blocks) | (qb < a.global_blocks)
        if a.stride_blocks:
            ok |= d.abs() % a.stride_blocks == 0
        return ok
    return (j <= i) if causal else torch.ones_like(i * j, dtype=torch.bool)


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, cap: float = 0.0) -> Tensor:
    """q (H,Nq,D), k/v (H,Nk,D) (one sequence, KV heads already mapped), allowed (Nq,Nk) bool; cap > 0: scores
    soft-capped to cap * tanh(s / cap) (Gemma 2)."""
    s = torch.einsum("hqd,hkd->hqk", q, k) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    s = torch.where(allowed, s, torch.full_like(s, NEG))
    return torch.einsum("hqk,hkd->hqd", torch.softmax(s, -1), v)


def _phi(x: Tensor, a, omega: Tensor | None, is_query: bool) -> Tensor:
    if a.feature_map == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    d = x.shape[-1]
    xs = x / d**0.25
    logits = xs @ omega.T - (xs * xs).sum(-1, keepdim=True) / 2
    if is_query:  # a per-row constant: cancels between numerator and denominator
        logits = logits - logits.max(-1, keepdim=True).values
    return torch.exp(logits) / math.sqrt(omega.shape[0])


def _hedgehog(x: Tensor, w: Tensor) -> Tensor:
    """Hedgehog (Zhang et al. 2024, LoLCATs' form): [softmax(x W), softmax(-x W)] over features; x (H,N,D), W (H,D,D')."""
    proj = torch.einsum("hnd,hde->hne", x, w)
    return torch.cat([torch.softmax(proj, -1), torch.softmax(-proj, -1)], -1)


def attention(sd: dict, spec, layer: int, x: Tensor, key_mask: Tensor | None) -> Tensor:
    """One attention layer (projections included) on x (B,N,C)."""
    m = spec.model
    lay = spec.layer(layer)
    a = lay.attention
    p = f"blocks.{layer}.attn"
    b, n, _ = x.shape
    h, hkv, d = m.n_heads, m.kv_heads, m.head_dim
    q = _linear(x, sd, f"{p}.q_proj").view(b, n, h, d).transpose(1, 2)
    k = _linear(x, sd, f"{p}.k_proj").view(b, n, hkv, d).transpose(1, 2)
    v = _linear(x, sd, f"{p}.v_proj").view(b, n, hkv, d).transpose(1, 2)
    if m.qk_norm:  # per head, before RoPE
        kind = m.norm if m.norm != "layernorm" else "rmsnorm"
        q, k = _norm(q, sd, f"{p}.q_norm", kind, m.norm_eps), _norm(k, sd, f"{p}.k_norm", kind, m.norm_eps)
    pos = torch.arange(n)[None].expand(b, n)
    if m.pos_encoding == "rope":  # this layer's own base and scaling
        q, k = _rope(q, pos, lay.rope_theta, lay.rope_scaling), _rope(k, pos, lay.rope_theta, lay.rope_scaling)
    group = h // hkv
    kv_of = [hh // group for hh in range(h)]  # query head hh reads KV head hh // (H / H_kv)
    scale = m.attn_scale if m.attn_scale is not None else 1 / math.sqrt(d)
    cap = m.attn_softcap or 0.0
    causal = m.family == "decoder"
    valid = torch.ones(b, n, dtype=torch.bool) if key_mask is None else key_mask.bool()
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    out = torch.zeros(b, h, n, d)
    for bi in range(b):
        qb, kb, vb = q[bi], k[bi][kv_of], v[bi][kv_of]  # (H,N,D)
        if a.kind in ("full", "local", "block_sparse"):
            out[bi] = _softmax_attention(qb, kb, vb, _allowed(a.kind, a, i, j, causal) & valid[bi][None, :], scale,
                                         cap)
        elif a.kind == "linformer":
            e, f = _linformer_projections(sd, spec, layer)
            keep = valid[bi][None, :, None].to(x.dtype)  # padded keys and values are zero before projecting
            e, f = e[:, :, :n], f[:, :, :n]
            kp = torch.einsum("hkn,hnd->hkd", e.expand(h, -1, -1), kb * keep)
            vp = torch.einsum("hkn,hnd->hkd", f.expand(h, -1, -1), vb * keep)
            out[bi] = _softmax_attention(qb, kp, vp, torch.ones(n, kp.shape[1], dtype=torch.bool), scale)
        elif a.kind == "linear":
            omega = sd.get(f"{p}.omega")
            if a.feature_map == "hedgehog":  # learned per head: queries' map per query head, keys' per KV head
                fq = _hedgehog(qb, sd[f"{p}.hedgehog_q"])
                fk = _hedgehog(kb, sd[f"{p}.hedgehog_k"][kv_of]) * valid[bi][None, :, None]
            else:
                fq, fk = _phi(qb, a, omega, True), _phi(kb, a, omega, False) * valid[bi][None, :, None]
            for t in range(n):
                seen = slice(0, t + 1) if causal else slice(0, n)
                num = torch.einsum("hm,hkm,hkd->hd", fq[:, t], fk[:, seen], vb[:, seen])
                den = torch.einsum("hm,hkm->h", fq[:, t], fk[:, seen])[:, None] + a.eps
                out[bi, :, t] = num / den
        elif a.kind == "hierarchical":  # a layer of the hourglass: exact attention at its level's resolution
            out[bi] = _softmax_attention(qb, kb, vb, _allowed("full", a, i, j, causal) & valid[bi][None, :], scale)
        else:
            raise NotImplementedError(a.kind)
    return _linear(out.transpose(1, 2).reshape(b, n, h * d), sd, f"{p}.o_proj")


def _linformer_projections(sd: dict, spec, layer: int) -> tuple[Tensor, Tensor]:
    """(heads or 1, k, max_len) E and F per the sharing mode (Linformer §4)."""
    p = f"blocks.{layer}.attn"
    sharing = spec.layer(layer).attention.sharing
    if sharing == "layerwise":
        return sd["shared.linformer_e"], sd["shared.linformer_e"]
    if sharing == "kv":
        return sd[f"{p}.e"], sd[f"{p}.e"]
    return sd[f"{p}.e"], sd[f"{p}.f"]


def _factor(spec, layer: int) -> int:
    """Hourglass levels down and back up over the layers (Nawrot et al. 2021, Alg. 1), as the README defines."""
    factors, n = spec.attention.factors, spec.model.n_layers
    levels = factors + factors[-2::-1]
    if n < len(levels):
        return levels[layer]
    sizes = [n // len(levels)] * len(levels)
    middle = len(levels) // 2
    for r in range(n % len(levels)):
        sizes[middle + (r + 1) // 2 * (1 if r % 2 else -1)] += 1
    return [f for f, s in zip(levels, sizes, strict=True) for _ in range(s)][layer]


def _shorten(x: Tensor, mask: Tensor | None, k: int, causal: bool, sd: dict, name: str, kind: str):
    """Nawrot et al. Alg. 1: ShiftRight(x, k - 1) (decoders), then pool groups of k (mean, or a linear map of the
    concatenated group); encoders pool zeros for padding, and a pooled token is real if any token of it is."""
    b, n, c = x.shape
    groups = -(-n // k)
    if mask is not None:
        x = x * mask[:, :, None]
    seq = torch.zeros(b, groups * k + k, c)
    start = k - 1 if causal else 0
    seq[:, start:start + n] = x
    seq = seq[:, :groups * k].reshape(b, groups, k, c)
    pooled = seq.mean(2) if kind == "avg" else _linear(seq.reshape(b, groups, k * c), sd, f"{name}.proj")
    if mask is None:
        return pooled, None
    m = torch.zeros(b, groups * k + k)
    m[:, start:start + n] = mask
    return pooled, m[:, :groups * k].reshape(b, groups, k).amax(-1)


def _upsample(y: Tensor, n: int, k: int, sd: dict, name: str, kind: str) -> Tensor:
    """Position p takes pooled token p // k: repeated, or a linear map per offset p mod k."""
    out = torch.zeros(y.shape[0], n, y.shape[2])
    for p in range(n):
        if kind == "repeat":
            out[:, p] = y[:, p // k]
        else:
            w = sd[f"{name}.proj.weight"].view(k, y.shape[2], y.shape[2])[p % k]
            bias = sd[f"{name}.proj.bias"].view(k, y.shape[2])[p % k]
            out[:, p] = y[:, p // k] @ w.T + bias
    return out


def _block(sd: dict, spec, layer: int, x: Tensor, mask: Tensor | None) -> Tensor:
    m = spec.model
    p = f"blocks.{layer}"

    def norm(y, name):
        return _norm(y, sd, f"{p}.{name}", m.norm, m.norm_eps)

    if m.norm_position == "post":
        x = norm(x + attention(sd, spec, layer, x, mask), "norm1")
        return norm(x + _mlp(x, sd, f"{p}.mlp", m.activation), "norm2")
    if m.norm_position == "sandwich":  # Gemma: a norm before and after each sublayer
        x = x + norm(attention(sd, spec, layer, norm(x, "norm1"), mask), "norm1_post")
        return x + norm(_mlp(norm(x, "norm2"), sd, f"{p}.mlp", m.activation), "norm2_post")
    x = x + attention(sd, spec, layer, norm(x, "norm1"), mask)
    return x + _mlp(norm(x, "norm2"), sd, f"{p}.mlp", m.activation)


def _hourglass_layers(sd: dict, spec, x: Tensor, mask: Tensor | None) -> Tensor:
    """The layers of an hourglass: shorten when the next layer's factor is larger, upsample with the residual
    from before that shortening when it is smaller, and back to full resolution at the end."""
    a = spec.attention
    causal = spec.model.family == "decoder"
    saved: list[tuple[Tensor, Tensor | None, int]] = []  # (x before shortening, its mask, boundary)
    current, boundaries = 1, 0
    for layer in range(spec.model.n_layers):
        f = _factor(spec, layer)
        while f > current:
            nxt = min(x for x in a.factors if x > current)
            saved.append((x, mask, boundaries))
            x, mask = _shorten(x, mask, nxt // current, causal, sd, f"hourglass.shorten.{boundaries}", a.shorten)
            boundaries, current = boundaries + 1, nxt
        while f < current:
            prev = max(x for x in a.factors if x < current)
            x_res, mask, b = saved.pop()
            x = x_res + _upsample(x, x_res.shape[1], current // prev, sd, f"hourglass.upsample.{b}", a.upsample)
            current = prev
        x = _block(sd, spec, layer, x, mask)
    while saved:
        prev = max(x for x in a.factors if x < current)
        x_res, mask, b = saved.pop()
        x = x_res + _upsample(x, x_res.shape[1], current // prev, sd, f"hourglass.upsample.{b}", a.upsample)
        current = prev
    return x


def forward(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The oracle's whole-sequence forward: last_hidden_state (encoders) or logits (decoders)."""
    spec = model.spec
    m = spec.model
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    n = input_ids.shape[1]
    x = sd["embed.weight"][input_ids]
    if m.embed_scale is not None:
        x = x * m.embed_scale
    if m.pos_encoding == "learned":
        x = x + sd["pos_embed.weight"][:n]
    if m.embed_norm:
        x = _norm(x, sd, "embed_norm", m.norm, m.norm_eps)
    mask = None if attention_mask is None else attention_mask.float()
    if spec.attention.kind == "hierarchical":
        x = _hourglass_layers(sd, spec, x, mask)
    else:
        for layer in range(m.n_layers):
            x = _block(sd, spec, layer, x, mask)
    if m.final_norm:
        x = _norm(x, sd, "norm", m.norm, m.norm_eps)
    if m.family != "decoder":
        return x
    logits = x @ (sd["embed.weight"] if m.tie_embeddings else sd["lm_head.weight"]).T
    return logits if m.final_softcap is None else m.final_softcap * torch.tanh(logits / m.final_softcap)


def sharpen(model, gain: float = 3.0):
    """Scale every layer's q and k projections by `gain` (scores by gain^2): attention far from uniform, so
    a 1% scale error or a wrong mask moves the outputs well beyond fp32 tolerance. Returns the model."""
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.weight.mul_(gain)
                if proj.bias is not None:
                    proj.bias.mul_(gain)
    return model


def attention_entropy_ratio(model, input_ids: Tensor) -> float:
    """Mean entropy of layer 0's full-attention rows over log(n) (1 = uniform): how sharp the model is."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    m = model.spec.model
    x = sd["embed.weight"][input_ids]
    if m.pos_encoding == "learned":
        x = x + sd["pos_embed.weight"][: input_ids.shape[1]]
    if m.norm_position == "pre":
        x = _norm(x, sd, "blocks.0.norm1", m.norm, m.norm_eps)
    b, n, _ = x.shape
    q = _linear(x, sd, "blocks.0.attn.q_proj").view(b, n, m.n_heads, m.head_dim).transpose(1, 2)
    k = _linear(x, sd, "blocks.0.attn.k_proj").view(b, n, m.kv_heads, m.head_dim).transpose(1, 2)
    k = k.repeat_interleave(m.n_heads // m.kv_heads, 1)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(m.head_dim), -1)
    return float((-(w * w.clamp_min(1e-30).log()).sum(-1)).mean() / math.log(n))


__all__ = ["attention", "attention_entropy_ratio", "forward", "sharpen"]
