"""Shared blocks: norms, MLP, rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * w. Written as a division by the square root (not times rsqrt): ONNX Runtime's optimizer fuses
    exactly that form (Pow, ReduceMean, Add, Sqrt, Div, Mul) into one SimplifiedLayerNormalization kernel at
    any opset, and the exported graph stays plain ONNX for every other runtime."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), computed in float32 (w starts at 0)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())  # see RMSNorm
        return h.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float | None = None) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, 1e-6 if eps is None else eps)
    if kind == "gemma_rmsnorm":
        return GemmaRMSNorm(dim, 1e-6 if eps is None else eps)
    return nn.LayerNorm(dim, eps=1e-5 if eps is None else eps)


class MLP(nn.Module):
    """down(act(up(x))), or a gated form down(act(gate(x)) * up(x)): swiglu (silu, Llama), geglu_tanh
    (tanh-approximated gelu, Gemma)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu_tanh", bias: bool = True):
        super().__init__()
        self.activation = activation
        if activation in ("swiglu", "geglu_tanh"):
            self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.activation == "geglu_tanh":
            return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh" if self.activation == "gelu_tanh" else "none"))


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> Tensor:
    """Inverse frequencies (D/2,), with Hugging Face's linear / llama3 scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """RoPE (rotate-half form) with cos/sin tables for positions 0..max_seq_len-1."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling=None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (S, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (S, D)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        # x (B,H,N,D), positions (B,N) absolute; cached keys are stored already rotated
        cos = self.cos[positions][:, None].to(x.dtype)  # (B,1,N,D)
        sin = self.sin[positions][:, None].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
