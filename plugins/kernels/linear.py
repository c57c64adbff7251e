"""Fused linear attention (effx::NormalizedLinearAttention, effx::NormalizedLinearAttentionState).

Feature maps (effx.plugins.linear.feature_map), computed in fp32 inside the kernels:
  elu    phi(x) = elu(x) + 1                                  (m = D features)
  favor  phi(x) = exp(omega x' - |x'|^2 / 2 - c) / sqrt(m),  x' = x D^(-1/4); c = row max for queries, 0 for keys
  identity  phi(x) = x: q and k are features already (a learned map ran before the op); m = their width
            QK_DIM, which may differ from the value width HEAD_DIM

Kernels (program = one (batch, KV head, block of value columns); the n_rep query heads sharing a KV head
reuse its state, so GQA costs no extra state):
* `linear_attention_kernel` (non-causal): pass 1 sums S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) over the
  sequence (padding weighted by k_valid), pass 2 writes phi(q_i) S / (phi(q_i) . z + eps).
* `linear_attention_state_kernel` (causal, chunked): per chunk of C tokens the intra-chunk part is the
  quadratic masked form A = tril(phi(Q) phi(K)^T), the inter-chunk part reads the running state:
  y = (A V + phi(Q) S) / (A 1 + phi(Q) z + eps), then S += phi(K)^T V, z += sum phi(K). It equals the
  prefix-sum reference (S_i, z_i include token i) and returns the final state.
* `linear_attention_decode_kernel`: one new token: S = S0 + phi(k) v^T, z = z0 + phi(k), y from the new
  state. Pure vector work, no tensor-core tiles.
State (S, z) is carried in fp32 and stored in the dtype of s0/z0, as the reference does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from effx.plugins.kernels import _common

tl = None  # triton.language, bound by _common.load()

ELU, FAVOR, IDENTITY = 0, 1, 2
FEATURE_MAPS = {"elu": ELU, "favor": FAVOR, "identity": IDENTITY}
INTERPRETED = False  # set by _common.load


def _dot(a, b):
    """fp32 x fp32 -> fp32 without TF32: feature products and states need full precision."""
    return tl.dot(a, b, input_precision="ieee")


def _phi(x, x_ptr, rows, row_ok, omega_ptr, M, FEATURE: tl.constexpr, IS_QUERY: tl.constexpr,
         PROJ_DOT: tl.constexpr, HEAD_DIM: tl.constexpr, X_SCALE: tl.constexpr, PHI_SCALE: tl.constexpr,
         BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """Features of rows x (R, BLOCK_D) fp32 (zero-padded columns) -> (R, BLOCK_F) fp32, zero past M.

    x_ptr + rows are the rows' start offsets: without PROJ_DOT the favor projection omega x is summed one
    head-dim column at a time from memory (CUDA cores, no shared memory), which keeps large feature
    counts within the 48 KB a TensorRT plugin launch gets; with PROJ_DOT it is one tensor-core tile.
    """
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < M
    if FEATURE == 0:
        phi = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
        phi = tl.where(f_ok[None, :], phi, 0.0)  # elu: features = columns (BLOCK_F == BLOCK_D)
    elif FEATURE == 2:
        phi = tl.where(f_ok[None, :], x, 0.0)  # identity: the columns are the features (BLOCK_F == BLOCK_D)
    else:
        xs = x * X_SCALE
        if PROJ_DOT:
            offs_d = tl.arange(0, BLOCK_D)
            om = tl.load(omega_ptr + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                         mask=f_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
            logits = _dot(xs, tl.trans(om))  # (R, BLOCK_F)
        else:
            logits = tl.zeros([x.shape[0], BLOCK_F], dtype=tl.float32)
            for d in range(0, HEAD_DIM):
                xd = tl.load(x_ptr + rows + d, mask=row_ok, other=0.0).to(tl.float32) * X_SCALE
                od = tl.load(omega_ptr + offs_f * HEAD_DIM + d, mask=f_ok, other=0.0).to(tl.float32)
                logits += xd[:, None] * od[None, :]
        logits = logits - 0.5 * tl.sum(xs * xs, 1)[:, None]
        if IS_QUERY:
            logits = logits - tl.max(tl.where(f_ok[None, :], logits, -3.4028234663852886e38), 1)[:, None]
        phi = tl.where(f_ok[None, :], tl.exp(logits) * PHI_SCALE, 0.0)
    return phi


def _phi_vec(x, omega_ptr, M, FEATURE: tl.constexpr, IS_QUERY: tl.constexpr, HEAD_DIM: tl.constexpr,
             X_SCALE: tl.constexpr, PHI_SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """Features of one row x (BLOCK_D,) -> (BLOCK_F,), with reductions instead of tensor-core tiles."""
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < M
    if FEATURE == 0:
        phi = tl.where(f_ok & (x > 0), x + 1.0, tl.where(f_ok, tl.exp(tl.minimum(x, 0.0)), 0.0))
    elif FEATURE == 2:
        phi = tl.where(f_ok, x, 0.0)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        om = tl.load(omega_ptr + offs_f[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=f_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
        xs = x * X_SCALE
        logits = tl.sum(om * xs[None, :], 1) - 0.5 * tl.sum(xs * xs, 0)
        if IS_QUERY:
            logits = logits - tl.max(tl.where(f_ok, logits, -3.4028234663852886e38), 0)
        phi = tl.where(f_ok, tl.exp(logits) * PHI_SCALE, 0.0)
    return phi


def _load_rows(ptr, head_row, offs_c, c_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows offs_c of one (batch, head) slab (N, D) as fp32 (R, BLOCK_D), zero outside."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + (head_row + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=c_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return x.to(tl.float32)


def linear_attention_kernel(q_ptr, k_ptr, v_ptr, k_valid_ptr, omega_ptr, H, H_KV, N, y_ptr,
                            EPS: tl.constexpr, FEATURE: tl.constexpr, M: tl.constexpr, HEAD_DIM: tl.constexpr,
                            QK_DIM: tl.constexpr, X_SCALE: tl.constexpr, PHI_SCALE: tl.constexpr, PROJ_DOT: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                            BLOCK_DV: tl.constexpr):
    pid_v = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    n_rep = H // H_KV
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < HEAD_DIM
    kv_row = bk.to(tl.int64) * N
    s = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < N
        rows = (kv_row + offs_c) * QK_DIM
        phik = _phi(_load_rows(k_ptr, kv_row, offs_c, c_ok, QK_DIM, BLOCK_D), k_ptr, rows, c_ok, omega_ptr, M,
                    FEATURE, False, PROJ_DOT, QK_DIM, X_SCALE, PHI_SCALE, BLOCK_D, BLOCK_F)
        weight = tl.load(k_valid_ptr + b * N + offs_c, mask=c_ok, other=0.0).to(tl.float32)  # 0 = padding
        phik = phik * weight[:, None]
        v = tl.load(v_ptr + (kv_row + offs_c)[:, None] * HEAD_DIM + offs_v[None, :],
                    mask=c_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        s += _dot(tl.trans(phik), v)
        z += tl.sum(phik, 0)
    for rep in range(0, n_rep):
        q_row = (b * H + kvh * n_rep + rep).to(tl.int64) * N
        for c0 in range(0, N, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < N
            rows = (q_row + offs_c) * QK_DIM
            phiq = _phi(_load_rows(q_ptr, q_row, offs_c, c_ok, QK_DIM, BLOCK_D), q_ptr, rows, c_ok, omega_ptr, M,
                        FEATURE, True, PROJ_DOT, QK_DIM, X_SCALE, PHI_SCALE, BLOCK_D, BLOCK_F)
            num = _dot(phiq, s)
            den = tl.sum(phiq * z[None, :], 1) + EPS
            tl.store(y_ptr + (q_row + offs_c)[:, None] * HEAD_DIM + offs_v[None, :],
                     (num / den[:, None]).to(y_ptr.dtype.element_ty), mask=c_ok[:, None] & v_ok[None, :])


def linear_attention_state_kernel(q_ptr, k_ptr, v_ptr, s0_ptr, z0_ptr, omega_ptr, H, H_KV, N, y_ptr, s_ptr, z_ptr,
                                  EPS: tl.constexpr, FEATURE: tl.constexpr, M: tl.constexpr,
                                  HEAD_DIM: tl.constexpr, QK_DIM: tl.constexpr, X_SCALE: tl.constexpr,
                                  PHI_SCALE: tl.constexpr, PROJ_DOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_v = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    n_rep = H // H_KV
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < HEAD_DIM
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < M
    state_off = (bk.to(tl.int64) * M + offs_f)[:, None] * HEAD_DIM + offs_v[None, :]
    state_mask = f_ok[:, None] & v_ok[None, :]
    s = tl.load(s0_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)  # (BLOCK_F, BLOCK_DV)
    z = tl.load(z0_ptr + bk.to(tl.int64) * M + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    kv_row = bk.to(tl.int64) * N
    causal = tl.arange(0, BLOCK_C)[:, None] >= tl.arange(0, BLOCK_C)[None, :]  # key j <= query i
    for c0 in range(0, N, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < N
        rows = (kv_row + offs_c) * QK_DIM
        phik = _phi(_load_rows(k_ptr, kv_row, offs_c, c_ok, QK_DIM, BLOCK_D), k_ptr, rows, c_ok, omega_ptr, M,
                    FEATURE, False, PROJ_DOT, QK_DIM, X_SCALE, PHI_SCALE, BLOCK_D, BLOCK_F)
        phik = tl.where(c_ok[:, None], phik, 0.0)  # rows past N must not enter the state
        v = tl.load(v_ptr + (kv_row + offs_c)[:, None] * HEAD_DIM + offs_v[None, :],
                    mask=c_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        for rep in range(0, n_rep):
            q_row = (b * H + kvh * n_rep + rep).to(tl.int64) * N
            rows = (q_row + offs_c) * QK_DIM
            phiq = _phi(_load_rows(q_ptr, q_row, offs_c, c_ok, QK_DIM, BLOCK_D), q_ptr, rows, c_ok, omega_ptr, M,
                        FEATURE, True, PROJ_DOT, QK_DIM, X_SCALE, PHI_SCALE, BLOCK_D, BLOCK_F)
            a = tl.where(causal, _dot(phiq, tl.trans(phik)), 0.0)  # (C, C) intra-chunk weights
            num = _dot(a, v) + _dot(phiq, s)
            den = tl.sum(a, 1) + tl.sum(phiq * z[None, :], 1) + EPS
            tl.store(y_ptr + (q_row + offs_c)[:, None] * HEAD_DIM + offs_v[None, :],
                     (num / den[:, None]).to(y_ptr.dtype.element_ty), mask=c_ok[:, None] & v_ok[None, :])
        s += _dot(tl.trans(phik), v)
        z += tl.sum(phik, 0)
    tl.store(s_ptr + state_off, s.to(s_ptr.dtype.element_ty), mask=state_mask)
    if pid_v == 0:  # z does not depend on the value columns: one program writes it
        tl.store(z_ptr + bk.to(tl.int64) * M + offs_f, z.to(z_ptr.dtype.element_ty), mask=f_ok)


def linear_attention_decode_kernel(q_ptr, k_ptr, v_ptr, s0_ptr, z0_ptr, omega_ptr, H, H_KV, N, y_ptr, s_ptr, z_ptr,
                                   EPS: tl.constexpr, FEATURE: tl.constexpr, M: tl.constexpr,
                                   HEAD_DIM: tl.constexpr, QK_DIM: tl.constexpr, X_SCALE: tl.constexpr,
                                   PHI_SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
    """N is always 1 here; it is an argument so that both LinearAttentionState kernels share one ABI."""
    pid_v = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    n_rep = H // H_KV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < QK_DIM
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < HEAD_DIM
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < M
    kx = tl.load(k_ptr + bk.to(tl.int64) * QK_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    phik = _phi_vec(kx, omega_ptr, M, FEATURE, False, QK_DIM, X_SCALE, PHI_SCALE, BLOCK_D, BLOCK_F)
    v = tl.load(v_ptr + bk.to(tl.int64) * HEAD_DIM + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    state_off = (bk.to(tl.int64) * M + offs_f)[:, None] * HEAD_DIM + offs_v[None, :]
    state_mask = f_ok[:, None] & v_ok[None, :]
    s = tl.load(s0_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32) + phik[:, None] * v[None, :]
    z = tl.load(z0_ptr + bk.to(tl.int64) * M + offs_f, mask=f_ok, other=0.0).to(tl.float32) + phik
    for rep in range(0, n_rep):
        h = kvh * n_rep + rep
        qx = tl.load(q_ptr + (b * H + h).to(tl.int64) * QK_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        phiq = _phi_vec(qx, omega_ptr, M, FEATURE, True, QK_DIM, X_SCALE, PHI_SCALE, BLOCK_D, BLOCK_F)
        num = tl.sum(phiq[:, None] * s, 0)
        den = tl.sum(phiq * z, 0) + EPS
        tl.store(y_ptr + (b * H + h).to(tl.int64) * HEAD_DIM + offs_v, (num / den).to(y_ptr.dtype.element_ty),
                 mask=v_ok)
    tl.store(s_ptr + state_off, s.to(s_ptr.dtype.element_ty), mask=state_mask)
    if pid_v == 0:  # z does not depend on the value columns: one program writes it
        tl.store(z_ptr + bk.to(tl.int64) * M + offs_f, z.to(z_ptr.dtype.element_ty), mask=f_ok)


TRITON_CONSTANTS = ("INTERPRETED",)
TRITON_FUNCTIONS = ("_dot", "_phi", "_phi_vec", "_load_rows", "linear_attention_kernel",
                    "linear_attention_state_kernel", "linear_attention_decode_kernel")


# -- host side -----------------------------------------------------------------------------------------
def feature_constexprs(kind: str, head_dim: int, omega: Tensor | None) -> dict:
    """Compile-time constants of a feature map: kind, feature count M and the two fixed scales. head_dim is the
    width of q and k (for identity: the features, M = head_dim)."""
    if kind not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {kind!r}")
    if kind == "identity":
        return {"FEATURE": IDENTITY, "M": head_dim, "X_SCALE": 1.0, "PHI_SCALE": 1.0}
    if kind == "favor":
        if omega is None or omega.dim() != 2 or omega.shape[1] != head_dim:
            raise ValueError(f"favor needs omega (m, D={head_dim}), got {None if omega is None else tuple(omega.shape)}")
        m = omega.shape[0]
        return {"FEATURE": FAVOR, "M": m, "X_SCALE": head_dim ** -0.25, "PHI_SCALE": 1.0 / math.sqrt(m)}
    return {"FEATURE": ELU, "M": head_dim, "X_SCALE": 1.0, "PHI_SCALE": 1.0}


def _blocks(consts: dict, qk_dim: int, head_dim: int, gpu: bool, proj_dot: bool | None) -> dict:
    """Tiles for the torch path (BLOCK_D spans a q/k row, BLOCK_DV value columns). On the GPU the favor
    projection uses tensor cores (Triton's launcher raises the shared-memory limit as needed); the interpreter
    tests pick either form."""
    block_d = _common.block_dim(qk_dim)
    block_f = block_d if consts["FEATURE"] in (ELU, IDENTITY) else _common.block_dim(consts["M"])
    return {"BLOCK_D": block_d, "BLOCK_F": block_f,
            "BLOCK_DV": min(_common.block_dim(head_dim), 32 if gpu else 16),
            "PROJ_DOT": gpu if proj_dot is None else proj_dot}


def _check(q: Tensor, k: Tensor, v: Tensor, kind: str) -> None:
    """q (B,H,N,d), k (B,H_kv,N,d), v (B,H_kv,N,D): d == D unless the features come precomputed (identity)."""
    _common.check_float(q, k, v)
    same = q.shape[-1] == v.shape[-1] or kind == "identity"
    if (k.shape[:-1] != v.shape[:-1] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]
            or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1] or not same):
        raise ValueError(f"q (B,H,N,D), k/v (B,H_kv,N,D) expected, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")


def _launch_extra(ns, gpu_warps: int) -> dict:
    return {} if ns.IS_INTERPRETED else {"num_warps": gpu_warps, "num_stages": 1}


def linear_attention(q: Tensor, k: Tensor, v: Tensor, k_valid: Tensor | None, omega: Tensor | None,
                     feature_map_kind: str, eps: float, *, proj_dot: bool | None = None) -> Tensor:
    """effx::NormalizedLinearAttention (non-causal), fused."""
    _check(q, k, v, feature_map_kind)
    b, h, n, qk = q.shape
    h_kv, d = k.shape[1], v.shape[-1]
    consts = feature_constexprs(feature_map_kind, qk, omega)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_valid = torch.ones(b, n, device=q.device, dtype=q.dtype) if k_valid is None else k_valid.contiguous()
    omega = q if omega is None else omega.contiguous()  # elu never reads it; any pointer will do
    y = q.new_empty(b, h, n, d)
    if y.numel() == 0:
        return y
    ns = _common.load("linear", _common.interpret_for(q))
    gpu = q.device.type == "cuda"
    blocks = _blocks(consts, qk, d, gpu, proj_dot)
    ns.linear_attention_kernel[(-(-d // blocks["BLOCK_DV"]), b * h_kv)](
        q, k, v, k_valid, omega, h, h_kv, n, y, EPS=float(eps), HEAD_DIM=d, QK_DIM=qk, BLOCK_C=32 if gpu else 16,
        **consts, **blocks, **_launch_extra(ns, 4))
    return y


def linear_attention_state(q: Tensor, k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, omega: Tensor | None,
                           feature_map_kind: str, eps: float, *, block_c: int | None = None,
                           proj_dot: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """effx::NormalizedLinearAttentionState (causal from a state), fused: chunked prefill, or the decode kernel for one token."""
    _check(q, k, v, feature_map_kind)
    b, h, n, qk = q.shape
    h_kv, d = k.shape[1], v.shape[-1]
    consts = feature_constexprs(feature_map_kind, qk, omega)
    if s0.shape != (b, h_kv, consts["M"], d) or z0.shape != (b, h_kv, consts["M"]):
        raise ValueError(f"state shapes {tuple(s0.shape)}, {tuple(z0.shape)} do not match (B,H_kv,m,D), (B,H_kv,m)")
    q, k, v, s0, z0 = (t.contiguous() for t in (q, k, v, s0, z0))
    omega = q if omega is None else omega.contiguous()
    y, s, z = q.new_empty(b, h, n, d), torch.empty_like(s0), torch.empty_like(z0)
    if n == 0:
        return y, s0.clone(), z0.clone()
    ns = _common.load("linear", _common.interpret_for(q))
    gpu = q.device.type == "cuda"
    blocks = _blocks(consts, qk, d, gpu, proj_dot)
    grid = (-(-d // blocks["BLOCK_DV"]), b * h_kv)
    if n == 1:
        blocks.pop("PROJ_DOT")  # one row: the decode kernel projects with reductions
        ns.linear_attention_decode_kernel[grid](q, k, v, s0, z0, omega, h, h_kv, n, y, s, z, EPS=float(eps), HEAD_DIM=d,
                                                QK_DIM=qk, **consts, **blocks, **_launch_extra(ns, 4))
    else:
        ns.linear_attention_state_kernel[grid](q, k, v, s0, z0, omega, h, h_kv, n, y, s, z, EPS=float(eps),
                                               HEAD_DIM=d, QK_DIM=qk, BLOCK_C=block_c or (32 if gpu else 16),
                                               **consts, **blocks, **_launch_extra(ns, 4))
    return y, s, z
