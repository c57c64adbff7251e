"""Fused Linformer attention: softmax(Q (E K)^T * scale) (F V), E and F (H or 1, k, N).

Two forms of the same math:

* torch CUDA path (linear in N): `linformer_project_kernel` writes K' = E K and V' = F V, (B, H_kv, k, D) in
  the input dtype (the reference rounds them too), in one launch; then the dense flash kernel of
  attention.py runs Q against them with an online softmax. The N x k score matrix never reaches memory.
* TensorRT AOT plugin (one kernel, no workspace): `linformer_attention_kernel` projects each chunk of k
  rows on the fly inside every query-block program and feeds it straight to the online softmax. It reads
  K and V once per query block, so its cost grows as N^2 k D / BLOCK_M: fine for the sequence lengths
  Linformer models use on Jetson-class devices; for long sequences the better TensorRT graph is
  MatMul(E, K), MatMul(F, V) and TensorRT's own fused attention, which an exporter can emit instead.

GQA: K and V may have H_kv < H heads; E/F have 1 head (shared) or one per K/V head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.kernels import _common, attention

tl = None  # triton.language, bound by _common.load()

MASK_VALUE = _common.MASK_VALUE
INTERPRETED = False  # set by _common.load


def _dot(a, b):
    if INTERPRETED and a.dtype == tl.bfloat16:  # interpreter bf16 dot bug, see attention._dot
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


def linformer_project_kernel(k_ptr, v_ptr, e_ptr, f_ptr, N, KP, H_KV, E_HEADS, kp_ptr, vp_ptr,
                             HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """K'[b,h] = E[h or 0] K[b,h], V'[b,h] = F[h or 0] V[b,h] for BLOCK_K projected rows."""
    pid_k = tl.program_id(0)
    bh = tl.program_id(1)
    eh = (bh % H_KV) % E_HEADS  # E_HEADS is 1 (shared) or H_kv
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < KP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    e_rows = (eh * KP + offs_k).to(tl.int64) * N
    x_base = bh.to(tl.int64) * N * HEAD_DIM
    acc_k = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        p_mask = k_ok[:, None] & n_ok[None, :]
        e = tl.load(e_ptr + e_rows[:, None] + offs_n[None, :], mask=p_mask, other=0.0)
        f = tl.load(f_ptr + e_rows[:, None] + offs_n[None, :], mask=p_mask, other=0.0)
        x_off = x_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        x_mask = n_ok[:, None] & d_ok[None, :]
        acc_k += _dot(e, tl.load(k_ptr + x_off, mask=x_mask, other=0.0))
        acc_v += _dot(f, tl.load(v_ptr + x_off, mask=x_mask, other=0.0))
    out = (bh.to(tl.int64) * KP + offs_k)[:, None] * HEAD_DIM + offs_d[None, :]
    mask = k_ok[:, None] & d_ok[None, :]
    tl.store(kp_ptr + out, acc_k.to(kp_ptr.dtype.element_ty), mask=mask)
    tl.store(vp_ptr + out, acc_v.to(vp_ptr.dtype.element_ty), mask=mask)


def linformer_attention_kernel(q_ptr, k_ptr, v_ptr, e_ptr, f_ptr, H, H_KV, N, KP, E_HEADS, y_ptr,
                               SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One launch: rows = (query, head) pairs of a KV head (GQA packed as in attention.py); for each chunk
    of BLOCK_N projected keys, project K and V over the sequence in BLOCK_L steps, then one online-softmax
    step. Neither K', V' nor the scores leave the program."""
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    eh = kvh % E_HEADS
    n_rep = H // H_KV
    offs_r = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_r < N * n_rep
    q_rows = ((b * H + kvh * n_rep + offs_r % n_rep).to(tl.int64) * N + offs_r // n_rep) * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * SCALE).to(q_ptr.dtype.element_ty)
    x_base = bk.to(tl.int64) * N * HEAD_DIM
    m_i = tl.full([BLOCK_M], MASK_VALUE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, KP, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = offs_j < KP
        e_rows = (eh * KP + offs_j).to(tl.int64) * N
        kc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        vc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_L):
            offs_n = n0 + tl.arange(0, BLOCK_L)
            n_ok = offs_n < N
            p_mask = j_ok[:, None] & n_ok[None, :]
            e = tl.load(e_ptr + e_rows[:, None] + offs_n[None, :], mask=p_mask, other=0.0)
            f = tl.load(f_ptr + e_rows[:, None] + offs_n[None, :], mask=p_mask, other=0.0)
            x_off = x_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
            x_mask = n_ok[:, None] & d_ok[None, :]
            kc += _dot(e, tl.load(k_ptr + x_off, mask=x_mask, other=0.0))
            vc += _dot(f, tl.load(v_ptr + x_off, mask=x_mask, other=0.0))
        kc = kc.to(k_ptr.dtype.element_ty)  # the reference rounds E K and F V to the input dtype
        vc = vc.to(v_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(kc))
        s = tl.where(j_ok[None, :], s, MASK_VALUE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v_ptr.dtype.element_ty), vc)
        m_i = m_new
    out = acc / l_i[:, None]  # every row has KP >= 1 real keys
    tl.store(y_ptr + q_rows[:, None] + offs_d[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


TRITON_CONSTANTS = ("MASK_VALUE", "INTERPRETED")
TRITON_FUNCTIONS = ("_dot", "linformer_project_kernel", "linformer_attention_kernel")


def _check(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor) -> None:
    _common.check_float(q, k, v, e, f)
    if e.shape != f.shape or e.dim() != 3 or e.shape[2] != k.shape[2]:
        raise ValueError(f"E, F must be (H or 1, k, N={k.shape[2]}), got {tuple(e.shape)}, {tuple(f.shape)}")
    if e.shape[0] not in (1, k.shape[1]):
        raise ValueError(f"E has {e.shape[0]} heads; it must be shared (1) or one per K/V head ({k.shape[1]})")
    if q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"q (B,H,N,D), k/v (B,H_kv,N,D) expected, got {tuple(q.shape)}, {tuple(k.shape)}")


def project(k: Tensor, v: Tensor, e: Tensor, f: Tensor, block_k: int | None = None,
            block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """(E K, F V) in the input dtype, (B, H_kv, k, D)."""
    b, h_kv, n, d = k.shape
    kp = e.shape[1]
    k, v, e, f = k.contiguous(), v.contiguous(), e.contiguous(), f.contiguous()
    k_proj = torch.empty(b, h_kv, kp, d, device=k.device, dtype=k.dtype)
    v_proj = torch.empty_like(k_proj)
    ns = _common.load("linformer", _common.interpret_for(k))
    gpu = k.device.type == "cuda"
    block_k = block_k or (64 if gpu else 16)
    block_n = block_n or (64 if gpu else 16)
    extra = {} if ns.IS_INTERPRETED else {"num_warps": 4, "num_stages": 2}
    ns.linformer_project_kernel[(-(-kp // block_k), b * h_kv)](
        k, v, e, f, n, kp, h_kv, e.shape[0], k_proj, v_proj, HEAD_DIM=d, BLOCK_K=block_k, BLOCK_N=block_n,
        BLOCK_D=_common.block_dim(d), **extra)
    return k_proj, v_proj


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, e: Tensor, f: Tensor, scale: float, *,
                        fused: bool = False) -> Tensor:
    """effx::LinformerAttention. `fused=True` runs the single-launch kernel the TensorRT plugin embeds."""
    _check(q, k, v, e, f)
    if q.numel() == 0:
        return torch.empty_like(q)
    if not fused:
        k_proj, v_proj = project(k, v, e, f)
        return attention.dense_attention(q, k_proj, v_proj, scale)
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    q, k, v, e, f = (t.contiguous() for t in (q, k, v, e, f))
    y = torch.empty_like(q)
    ns = _common.load("linformer", _common.interpret_for(q))
    gpu = q.device.type == "cuda"
    block_m, block_n, block_l = (64, 32, 64) if gpu else (16, 16, 16)
    extra = {} if ns.IS_INTERPRETED else {"num_warps": 4, "num_stages": 2}
    ns.linformer_attention_kernel[(-(-(n * (h // h_kv)) // block_m), b * h_kv)](
        q, k, v, e, f, h, h_kv, n, e.shape[1], e.shape[0], y, SCALE=float(scale), HEAD_DIM=d, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=_common.block_dim(d), **extra)
    return y
