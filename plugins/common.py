"""Math shared by the attention ops: GQA head expansion and masked softmax attention over positions.

Positions make one op serve every stage: a query at absolute position q_pos[b, i] may see the key at
k_pos[b, j] when the op's rule allows it; k_pos = -1 marks an empty slot (padding, unused ring or paged
slots). Prefill passes arange positions, a contiguous cache passes offsets, a ring or paged cache passes
the positions its slots hold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.opspec import MASK_VALUE


def expand_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, H_kv, N, D) -> (B, H_kv * n_rep, N, D): query head h uses KV head h // n_rep (contiguous groups)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float,
                      softcap: float = 0.0) -> Tensor:
    """softmax(cap((scale Q) K^T), masked) V, with cap(s) = softcap * tanh(s / softcap) when softcap > 0
    (attention-logit soft-capping, Gemma 2) and cap(s) = s otherwise.

    q: (B, H, Nq, D); k, v: (B, H_kv, Nk, D); allowed: bool, broadcastable to (B, H, Nq, Nk).
    Q is scaled before the product (TensorRT's MHA fusion needs that form). Masked scores get MASK_VALUE
    rather than -inf, so a row with no allowed key stays finite.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = expand_kv(k, n_rep), expand_kv(v, n_rep)
    scores = (q * scale) @ k.transpose(-1, -2)  # (B, H, Nq, Nk)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, MASK_VALUE)
    return torch.softmax(scores, dim=-1) @ v  # (B, H, Nq, D)


def split_positions(q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Nq), (B, Nk) -> query (B,1,Nq,1), key (B,1,1,Nk) positions and key validity (B,1,1,Nk)."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    return qp, kp, kp >= 0


def causal_allowed(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    qp, kp, valid = split_positions(q_pos, k_pos)
    return valid & (kp <= qp)


def arange_positions(batch: int, n: int, device: torch.device, key_mask: Tensor | None = None) -> Tensor:
    """Positions 0..n-1 for every row; where key_mask (B, n) is 0 the position is -1 (padding)."""
    pos = torch.arange(n, device=device).expand(batch, n)
    if key_mask is not None:
        pos = torch.where(key_mask.bool(), pos, torch.full_like(pos, -1))
    return pos
