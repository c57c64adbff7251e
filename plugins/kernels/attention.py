"""Fused softmax attention over positions: LocalAttention, BlockSparseAttention, PagedAttention (+ the dense
attention Linformer runs over its projected keys).

One core (`_attend`) serves every softmax op, so the masking rules, the GQA layout and the empty-row rule
are written once:

* Rows are (query, head) pairs of one KV head, interleaved as row = i * n_rep + rep. All n_rep query heads
  that share a KV head ride in one program and every K/V tile is loaded once for them (GQA aware); the
  interleaving keeps a tile's query positions consecutive, so the window / layout skip stays tight.
* Q is scaled and rounded to the input dtype before QK^T, as the reference does; scores, the online
  softmax and the accumulator are fp32; P is rounded to the input dtype for the PV product (tensor cores).
* Positions decide everything (the reference's mask): a key slot with position -1 is empty. Before the
  main loop a vectorised scan over the key positions finds the first and last key any query of the tile
  may see, and inside the loop a tile whose keys no query may see is skipped and a tile that every query
  sees fully is not masked. These bounds use per-tile min/max of positions only, so they hold for any
  order of positions (a ring cache's slots included); sorted positions just make them tight.
* A row with no allowed key gets the plain mean of every value (keys of empty slots included), as the
  reference's softmax over all-lowest scores gives; the kernel computes that mean only when such a row
  exists.

Decode (few queries, long cache) splits the keys over programs (flash-decoding) and merges the partial
softmax states in a second kernel. TensorRT plugins launch exactly one kernel without workspace, so the
plugins use the single-pass entries; the split entries serve the torch CUDA path.

Triton functions here are plain functions jitted by `_common.load` (see there for why).
"""

from __future__ import annotations

import torch
from torch import Tensor

from effx.plugins.kernels import _common

tl = None  # triton.language, bound by _common.load()

MASK_NONE, MASK_LOCAL, MASK_BLOCK_SPARSE = 0, 1, 2
MASK_VALUE = _common.MASK_VALUE
POS_BIG = 1 << 62  # larger than any position, smaller than int64 max so that `x - window` cannot wrap
INTERPRETED = False  # set by _common.load


def _dot(a, b):
    """a @ b with fp32 accumulation and no TF32 rounding of fp32 operands (fp32 must match to 1e-4)."""
    if INTERPRETED and a.dtype == tl.bfloat16:
        # triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits; bf16 x bf16 products
        # are exact in fp32, so upcasting first is what the tensor cores compute
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


# -- mask rules (mirror effx.plugins.local / block_sparse) ----------------------------------------------
def _pmod(a, b):
    """a mod b in [0, b) for b > 0 (Triton's % truncates like C)."""
    r = a % b
    return tl.where(r < 0, r + b, r)


def _floor_div(a, b):
    """Floor division for b > 0: torch's `//` on a position of -1 gives block -1, C division gives 0."""
    return (a - _pmod(a, b)) // b


def _allowed(qp, kp, W, BS, LB, GB, SB, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """(rows, keys) bool: may query position qp see key position kp (kp = -1: empty slot)."""
    q = qp[:, None]
    k = kp[None, :]
    ok = k >= 0
    if MASK_KIND == 1:
        if CAUSAL:
            ok = ok & (k <= q) & (k > q - W)
        else:
            ok = ok & (q - k < W) & (k - q < W)
    elif MASK_KIND == 2:
        d = _floor_div(q, BS) - tl.maximum(k, 0) // BS
        kb = tl.maximum(k, 0) // BS
        sb = tl.maximum(SB, 1)
        if CAUSAL:
            fwd = d >= 0
            rule = (fwd & (d < LB)) | (fwd & (kb < GB)) | (fwd & (SB > 0) & (d % sb == 0))
            ok = ok & rule & (k <= q)
        else:
            ad = tl.abs(d)
            rule = (ad < LB) | (kb < GB) | (_floor_div(q, BS) < GB) | ((SB > 0) & (ad % sb == 0))
            ok = ok & rule
    return ok


def _key_relevant(kp, qp_lo, qp_hi, W, BS, LB, GB, SB, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """(keys,) bool: may any query with position in [qp_lo, qp_hi] see the key? (a superset of the truth)"""
    ok = kp >= 0
    if MASK_KIND == 1:
        if CAUSAL:
            ok = ok & (kp <= qp_hi) & (kp > qp_lo - W)
        else:
            ok = ok & (kp > qp_lo - W) & (kp < qp_hi + W)
    elif MASK_KIND == 2:
        kb = tl.maximum(kp, 0) // BS
        qb_lo = _floor_div(qp_lo, BS)
        qb_hi = _floor_div(qp_hi, BS)
        dlo = qb_lo - kb
        dhi = qb_hi - kb
        sb = tl.maximum(SB, 1)
        top = dhi - _pmod(dhi, sb)  # the largest multiple of the stride <= dhi
        if CAUSAL:
            lo = tl.maximum(dlo, 0)
            rule = ((lo <= dhi) & (lo < LB)) | ((kb < GB) & (dhi >= 0)) | ((SB > 0) & (dhi >= 0) & (top >= lo))
            ok = ok & (kp <= qp_hi) & rule
        else:
            rule = ((dlo < LB) & (dhi > -LB)) | (kb < GB) | (qb_lo < GB) | ((SB > 0) & (top >= dlo))
            ok = ok & rule
    return ok


def _tile_full(kp_min, kp_max, all_valid, qp_lo, qp_hi, W, BS, LB, GB, SB,
               MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Scalar: does every query in [qp_lo, qp_hi] see every key in [kp_min, kp_max]? (sufficient test)"""
    full = all_valid
    if MASK_KIND == 1:
        if CAUSAL:
            full = full & (kp_max <= qp_lo) & (kp_min > qp_hi - W)
        else:
            full = full & (qp_hi - kp_min < W) & (kp_max - qp_lo < W)
    elif MASK_KIND == 2:
        qb_lo = _floor_div(qp_lo, BS)
        qb_hi = _floor_div(qp_hi, BS)
        kb_lo = tl.maximum(kp_min, 0) // BS
        kb_hi = tl.maximum(kp_max, 0) // BS
        dmin = qb_lo - kb_hi
        dmax = qb_hi - kb_lo
        if CAUSAL:
            full = full & (kp_max <= qp_lo) & (dmin >= 0) & ((dmax < LB) | (kb_hi < GB))
        else:
            full = full & (((dmax < LB) & (dmin > -LB)) | (kb_hi < GB) | (qb_hi < GB))
    return full


# -- key addressing: contiguous (B, H_kv, N, D) or paged pool (blocks, page, H_kv, D) ---------------------
def _key_tile(offs_n, in_range, kpos_ptr, bt_ptr, b, kvh, H_KV, NK, seq_len, PAGE, MAX_BLOCKS,
              HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, PAGED: tl.constexpr):
    """Positions (-1 = empty) and element offsets of the key rows offs_n of sequence b, KV head kvh."""
    if PAGED:
        page = offs_n // PAGE
        phys = tl.load(bt_ptr + b * MAX_BLOCKS + page, mask=in_range, other=0).to(tl.int64)
        rows = (phys * PAGE + offs_n % PAGE) * H_KV + kvh
        kp = tl.where(in_range & (offs_n < seq_len), offs_n.to(tl.int64), -1)
    else:
        rows = (b * H_KV + kvh).to(tl.int64) * NK + offs_n
        if MASK_KIND == 0:
            kp = tl.where(in_range, offs_n.to(tl.int64), -1)
        else:
            kp = tl.load(kpos_ptr + b * NK + offs_n, mask=in_range, other=-1).to(tl.int64)
    return kp, rows * HEAD_DIM


def _mean_values(v_ptr, bt_ptr, b, kvh, H_KV, NK, PAGE, MAX_BLOCKS, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean of all NK value rows of (b, kvh): the output of a query with no allowed key."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < NK
        _, rows = _key_tile(offs_n, in_range, bt_ptr, bt_ptr, b, kvh, H_KV, NK, NK, PAGE, MAX_BLOCKS,
                            HEAD_DIM, 0, PAGED)
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :], other=0.0)
        total += tl.sum(v.to(tl.float32), 0)
    return total / tl.maximum(NK, 1)


def _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows row0.. of KV head kvh: element offsets of their q/y rows, their query index, validity."""
    n_rep = H // H_KV
    offs_r = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_r < NQ * n_rep
    i_row = offs_r // n_rep
    h_row = kvh * n_rep + offs_r % n_rep
    q_rows = ((b * H + h_row).to(tl.int64) * NQ + i_row) * HEAD_DIM
    return q_rows, i_row, row_ok


def _tanh(x):
    """tanh from exp (no tanh in every Triton backend): 1 - 2 / (exp(2x) + 1), exact at both tails."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


def _attend(q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, bt_ptr, seqlen_ptr,
            b, kvh, row0, H, H_KV, NQ, NK, key_lo, key_hi, W, BS, LB, GB, SB, PAGE, MAX_BLOCKS,
            SCALE: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
            PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, SCAN: tl.constexpr):
    """Online-softmax state of BLOCK_M rows over keys [key_lo, key_hi): (acc, row max, row sum, has_key).
    SOFTCAP > 0 caps the scores: SOFTCAP * tanh(s / SOFTCAP) (Gemma 2), before the mask."""
    q_rows, i_row, row_ok = _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * SCALE).to(q_ptr.dtype.element_ty)  # scaled and rounded like the reference

    if MASK_KIND == 0:
        qp = i_row.to(tl.int64)
    else:
        qp = tl.load(qpos_ptr + b * NQ + i_row, mask=row_ok, other=0).to(tl.int64)
    qp_lo = tl.min(tl.where(row_ok, qp, POS_BIG), 0)
    qp_hi = tl.max(tl.where(row_ok, qp, -POS_BIG), 0)

    seq_len = key_hi
    lo = key_lo
    hi = key_hi
    if PAGED:
        # logical positions are the slot indices: the window bounds the range directly (clamped in int64
        # before narrowing, so far-away positions cannot wrap)
        seq_len = tl.load(seqlen_ptr + b).to(tl.int32)
        top = tl.minimum(key_hi, seq_len).to(tl.int64)
        hi = tl.minimum(top, qp_hi + 1).to(tl.int32)
        lo = tl.minimum(tl.maximum(qp_lo - W + 1, key_lo), top).to(tl.int32)
    elif MASK_KIND != 0:
        # any key order: find the first and last key any row may see with one vectorised pass
        first = key_hi + 0 * key_lo
        last = key_lo - 1 + 0 * key_hi
        for s0 in range(key_lo, key_hi, SCAN):
            offs = s0 + tl.arange(0, SCAN)
            in_range = offs < key_hi
            kp = tl.load(kpos_ptr + b * NK + offs, mask=in_range, other=-1).to(tl.int64)
            rel = _key_relevant(kp, qp_lo, qp_hi, W, BS, LB, GB, SB, MASK_KIND, CAUSAL) & in_range
            first = tl.minimum(first, tl.min(tl.where(rel, offs, key_hi), 0))
            last = tl.maximum(last, tl.max(tl.where(rel, offs, key_lo - 1), 0))
        lo = first
        hi = last + 1

    m_i = tl.full([BLOCK_M], MASK_VALUE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    has = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < hi
        kp, k_rows = _key_tile(offs_n, in_range, kpos_ptr, bt_ptr, b, kvh, H_KV, NK, seq_len, PAGE, MAX_BLOCKS,
                               HEAD_DIM, MASK_KIND, PAGED)
        rel = _key_relevant(kp, qp_lo, qp_hi, W, BS, LB, GB, SB, MASK_KIND, CAUSAL)
        if tl.max(rel.to(tl.int32), 0) > 0:
            kv_mask = in_range[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32
            if SOFTCAP > 0:
                s = SOFTCAP * _tanh(s / SOFTCAP)
            kp_min = tl.min(tl.where(kp >= 0, kp, POS_BIG), 0)
            kp_max = tl.max(kp, 0)
            all_valid = tl.min(kp, 0) >= 0
            if _tile_full(kp_min, kp_max, all_valid, qp_lo, qp_hi, W, BS, LB, GB, SB, MASK_KIND, CAUSAL):
                has = has | 1
            else:
                ok = _allowed(qp, kp, W, BS, LB, GB, SB, MASK_KIND, CAUSAL)
                s = tl.where(ok, s, MASK_VALUE)
                has = has | tl.max(ok.to(tl.int32), 1)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v_ptr.dtype.element_ty), v)
            m_i = m_new
    return acc, m_i, l_i, has


def _finish(acc, l_i, has, q_rows, row_ok, y_ptr, v_ptr, bt_ptr, b, kvh, H_KV, NK, PAGE, MAX_BLOCKS,
            HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalise, give rows without an allowed key the mean value, store in y's dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if tl.max(tl.where(row_ok & (has == 0), 1, 0), 0) > 0:
        mean = _mean_values(v_ptr, bt_ptr, b, kvh, H_KV, NK, PAGE, MAX_BLOCKS, HEAD_DIM, PAGED, BLOCK_N, BLOCK_D)
        out = tl.where((has > 0)[:, None], out, mean[None, :])
    tl.store(y_ptr + q_rows[:, None] + offs_d[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _store_partial(acc, m_i, l_i, has, row0, bk, split, NUM_SPLITS, ROWS, ws_m_ptr, ws_l_ptr, ws_has_ptr, ws_acc_ptr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_r < ROWS
    base = (bk * NUM_SPLITS + split).to(tl.int64) * ROWS + offs_r
    tl.store(ws_m_ptr + base, m_i, mask=row_ok)
    tl.store(ws_l_ptr + base, l_i, mask=row_ok)
    tl.store(ws_has_ptr + base, has, mask=row_ok)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(ws_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])


# -- entries: one per op, argument order = TensorRT plugin ABI (inputs, int32 extras, outputs) ---------
def local_attention_kernel(q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, H, H_KV, NQ, NK, WINDOW, y_ptr,
                           SCALE: tl.constexpr, SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCAN: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    acc, m_i, l_i, has = _attend(q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, k_pos_ptr, k_pos_ptr,
                                 b, kvh, row0, H, H_KV, NQ, NK, 0, NK, WINDOW, 1, 0, 0, 0, 1, 1,
                                 SCALE, SOFTCAP, 1, CAUSAL, False, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, SCAN)
    q_rows, _, row_ok = _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM, BLOCK_M)
    _finish(acc, l_i, has, q_rows, row_ok, y_ptr, v_ptr, k_pos_ptr, b, kvh, H_KV, NK, 1, 1,
            HEAD_DIM, False, BLOCK_N, BLOCK_D)


def block_sparse_attention_kernel(q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, H, H_KV, NQ, NK,
                                  BLOCK_SIZE, LOCAL_BLOCKS, GLOBAL_BLOCKS, STRIDE_BLOCKS, y_ptr,
                                  SCALE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  SCAN: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    acc, m_i, l_i, has = _attend(q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, k_pos_ptr, k_pos_ptr,
                                 b, kvh, row0, H, H_KV, NQ, NK, 0, NK, 0, BLOCK_SIZE, LOCAL_BLOCKS,
                                 GLOBAL_BLOCKS, STRIDE_BLOCKS, 1, 1,
                                 SCALE, 0.0, 2, CAUSAL, False, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, SCAN)
    q_rows, _, row_ok = _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM, BLOCK_M)
    _finish(acc, l_i, has, q_rows, row_ok, y_ptr, v_ptr, k_pos_ptr, b, kvh, H_KV, NK, 1, 1,
            HEAD_DIM, False, BLOCK_N, BLOCK_D)


def paged_attention_kernel(q_ptr, k_pool_ptr, v_pool_ptr, block_table_ptr, q_pos_ptr, seq_lens_ptr,
                           H, H_KV, NQ, PAGE, MAX_BLOCKS, WINDOW, y_ptr,
                           SCALE: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    length = MAX_BLOCKS * PAGE  # keys the reference gathers (block table order)
    window = tl.where(WINDOW > 0, WINDOW, length + 1)  # 0 = no window: full causal
    acc, m_i, l_i, has = _attend(q_ptr, k_pool_ptr, v_pool_ptr, q_pos_ptr, q_pos_ptr, block_table_ptr, seq_lens_ptr,
                                 b, kvh, row0, H, H_KV, NQ, length, 0, length, window, 1, 0, 0, 0, PAGE, MAX_BLOCKS,
                                 SCALE, SOFTCAP, 1, True, True, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_N)
    q_rows, _, row_ok = _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM, BLOCK_M)
    _finish(acc, l_i, has, q_rows, row_ok, y_ptr, v_pool_ptr, block_table_ptr, b, kvh, H_KV, length, PAGE,
            MAX_BLOCKS, HEAD_DIM, True, BLOCK_N, BLOCK_D)


def dense_attention_kernel(q_ptr, k_ptr, v_ptr, H, H_KV, NQ, NK, y_ptr,
                           SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Unmasked softmax attention (Linformer over its projected keys)."""
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    acc, m_i, l_i, has = _attend(q_ptr, k_ptr, v_ptr, q_ptr, q_ptr, q_ptr, q_ptr,
                                 b, kvh, row0, H, H_KV, NQ, NK, 0, NK, 0, 1, 0, 0, 0, 1, 1,
                                 SCALE, 0.0, 0, False, False, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_N)
    q_rows, _, row_ok = _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM, BLOCK_M)
    _finish(acc, l_i, has, q_rows, row_ok, y_ptr, v_ptr, q_ptr, b, kvh, H_KV, NK, 1, 1,
            HEAD_DIM, False, BLOCK_N, BLOCK_D)


# split-K (flash-decoding) entries: program (row block, b * H_kv, split) -> partial softmax state
def softmax_split_kernel(q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, bt_ptr, seq_lens_ptr,
                         H, H_KV, NQ, NK, W, BS, LB, GB, SB, PAGE, MAX_BLOCKS, CHUNK, NUM_SPLITS,
                         ws_m_ptr, ws_l_ptr, ws_has_ptr, ws_acc_ptr,
                         SCALE: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                         PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, SCAN: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    split = tl.program_id(2)
    b = bk // H_KV
    kvh = bk % H_KV
    key_lo = split * CHUNK
    key_hi = tl.minimum(key_lo + CHUNK, NK)
    window = W
    if PAGED:
        window = tl.where(W > 0, W, NK + 1)
    acc, m_i, l_i, has = _attend(q_ptr, k_ptr, v_ptr, q_pos_ptr, k_pos_ptr, bt_ptr, seq_lens_ptr,
                                 b, kvh, row0, H, H_KV, NQ, NK, key_lo, key_hi, window, BS, LB, GB, SB, PAGE,
                                 MAX_BLOCKS, SCALE, SOFTCAP, MASK_KIND, CAUSAL, PAGED, HEAD_DIM, BLOCK_M, BLOCK_N,
                                 BLOCK_D, SCAN)
    _store_partial(acc, m_i, l_i, has, row0, bk, split, NUM_SPLITS, NQ * (H // H_KV),
                   ws_m_ptr, ws_l_ptr, ws_has_ptr, ws_acc_ptr, BLOCK_M, BLOCK_D)


def softmax_combine_kernel(ws_m_ptr, ws_l_ptr, ws_has_ptr, ws_acc_ptr, v_ptr, bt_ptr,
                           H, H_KV, NQ, NK, PAGE, MAX_BLOCKS, NUM_SPLITS, y_ptr,
                           PAGED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits' softmax states (the same rescaling as the online softmax, one split at a time)."""
    row0 = tl.program_id(0) * BLOCK_M
    bk = tl.program_id(1)
    b = bk // H_KV
    kvh = bk % H_KV
    rows = NQ * (H // H_KV)
    offs_r = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_r < rows
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], MASK_VALUE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    has = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        base = (bk * NUM_SPLITS + split).to(tl.int64) * rows + offs_r
        m_s = tl.load(ws_m_ptr + base, mask=row_ok, other=MASK_VALUE)
        l_s = tl.load(ws_l_ptr + base, mask=row_ok, other=0.0)
        has = has | tl.load(ws_has_ptr + base, mask=row_ok, other=0)
        acc_s = tl.load(ws_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp(m_i - m_new)
        beta = tl.exp(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    q_rows, _, row_ok = _query_rows(b, kvh, row0, H, H_KV, NQ, HEAD_DIM, BLOCK_M)
    _finish(acc, l_i, has, q_rows, row_ok, y_ptr, v_ptr, bt_ptr, b, kvh, H_KV, NK, PAGE, MAX_BLOCKS,
            HEAD_DIM, PAGED, BLOCK_N, BLOCK_D)


TRITON_CONSTANTS = ("MASK_VALUE", "POS_BIG", "INTERPRETED")  # module constants a Triton function reads
TRITON_FUNCTIONS = (
    "_dot", "_pmod", "_floor_div", "_allowed", "_key_relevant", "_tile_full", "_key_tile", "_mean_values", "_query_rows",
    "_tanh", "_attend", "_finish", "_store_partial",
    "local_attention_kernel", "block_sparse_attention_kernel", "paged_attention_kernel", "dense_attention_kernel",
    "softmax_split_kernel", "softmax_combine_kernel",
)


# -- host side -----------------------------------------------------------------------------------------
class TileConfig:
    """Tile sizes: GPU defaults (fp16 tensor cores, <= 48 KB shared memory at 2 stages), small ones for the
    interpreter so CPU tests stay fast and still cross tile and scan boundaries."""

    def __init__(self, block_m: int, block_n: int, scan: int, num_warps: int, num_stages: int):
        self.block_m, self.block_n, self.scan, self.num_warps, self.num_stages = block_m, block_n, scan, num_warps, num_stages

    @staticmethod
    def for_device(device: torch.device, head_dim: int, rows: int | None = None) -> TileConfig:
        """rows: query rows per KV head (Nq x n_rep); decode has a handful, so 16-row tiles waste less."""
        if device.type != "cuda":
            return TileConfig(16, 16, 16, 4, 1)
        block_m = 16 if rows is not None and rows <= 16 else 64
        if head_dim > 128:
            return TileConfig(min(block_m, 32), 32, 1024, 4, 2)
        return TileConfig(block_m, 64, 1024, 4, 2)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_kwargs(ns, cfg: TileConfig) -> dict:
    return {} if ns.IS_INTERPRETED else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _plan_splits(rows_blocks: int, programs: int, nk: int, cfg: TileConfig, device: torch.device,
                 num_splits: int | None) -> int:
    """Split the keys only when the grid alone leaves most SMs idle (decode) and each split keeps >= 4 tiles."""
    if num_splits is not None:
        return max(1, min(num_splits, _common.next_pow2(nk)))
    if rows_blocks > 1:
        return 1
    want = -(-2 * _common.sm_count(device) // max(programs, 1))
    return max(1, min(want, nk // (4 * cfg.block_n)))


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    _common.check_float(q, k, v)
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q (B,H,Nq,D), k/v (B,H_kv,Nk,D) expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of KV heads {k.shape[1]}")


def _softmax_family(q, k, v, q_pos, k_pos, mask_kind: int, causal: bool, scale: float, mask_params: tuple,
                    num_splits: int | None, config: TileConfig | None, softcap: float = 0.0) -> Tensor:
    _check_qkv(q, k, v)
    b, h, nq, d = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    y = torch.empty_like(q)
    if y.numel() == 0:
        return y
    ns = _common.load("attention", _common.interpret_for(q))
    rows = nq * (h // h_kv)
    cfg = config or TileConfig.for_device(q.device, d, rows)
    block_d = _common.block_dim(d)
    row_blocks = -(-rows // cfg.block_m)
    splits = _plan_splits(row_blocks, row_blocks * b * h_kv, nk, cfg, q.device, num_splits)
    w, bs, lb, gb, sb = mask_params
    if splits == 1:
        if mask_kind == MASK_LOCAL:
            ns.local_attention_kernel[(row_blocks, b * h_kv)](
                q, k, v, q_pos, k_pos, h, h_kv, nq, nk, w, y, SCALE=scale, SOFTCAP=softcap, CAUSAL=causal, HEAD_DIM=d,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, SCAN=cfg.scan, **_launch_kwargs(ns, cfg))
        else:
            ns.block_sparse_attention_kernel[(row_blocks, b * h_kv)](
                q, k, v, q_pos, k_pos, h, h_kv, nq, nk, bs, lb, gb, sb, y, SCALE=scale, CAUSAL=causal, HEAD_DIM=d,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, SCAN=cfg.scan, **_launch_kwargs(ns, cfg))
        return y
    _split_and_combine(ns, cfg, q, k, v, q_pos, k_pos, k_pos, k_pos, y, nk, splits, (w, bs, lb, gb, sb, 1, 1),
                       mask_kind, causal, False, scale, softcap)
    return y


def _split_and_combine(ns, cfg, q, k, v, q_pos, k_pos, block_table, seq_lens, y, nk, splits, params, mask_kind,
                       causal, paged, scale, softcap=0.0):
    b, h, nq, d = q.shape
    h_kv = k.shape[2] if paged else k.shape[1]
    block_d = _common.block_dim(d)
    rows = nq * (h // h_kv)
    row_blocks = -(-rows // cfg.block_m)
    chunk = _cdiv(_cdiv(nk, splits), cfg.block_n) * cfg.block_n  # keys per split, whole tiles
    splits = _cdiv(nk, chunk)
    ws = torch.empty(b * h_kv * splits * rows, device=q.device, dtype=torch.float32)
    ws_m, ws_l = ws, torch.empty_like(ws)
    ws_has = torch.empty(ws.shape, device=q.device, dtype=torch.int32)
    ws_acc = torch.empty(ws.numel() * block_d, device=q.device, dtype=torch.float32)
    w, bs, lb, gb, sb, page, max_blocks = params
    ns.softmax_split_kernel[(row_blocks, b * h_kv, splits)](
        q, k, v, q_pos, k_pos, block_table, seq_lens, h, h_kv, nq, nk, w, bs, lb, gb, sb, page, max_blocks,
        chunk, splits, ws_m, ws_l, ws_has, ws_acc, SCALE=scale, SOFTCAP=softcap, MASK_KIND=mask_kind, CAUSAL=causal,
        PAGED=paged,
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, SCAN=cfg.scan,
        **_launch_kwargs(ns, cfg))
    ns.softmax_combine_kernel[(row_blocks, b * h_kv)](
        ws_m, ws_l, ws_has, ws_acc, v, block_table, h, h_kv, nq, nk, page, max_blocks, splits, y,
        PAGED=paged, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        **_launch_kwargs(ns, cfg))


def local_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, causal: bool,
                    scale: float, softcap: float = 0.0, *, num_splits: int | None = None,
                    config: TileConfig | None = None) -> Tensor:
    """effx::LocalAttention, fused. Same arguments as effx.plugins.local.local_attention_reference."""
    return _softmax_family(q, k, v, q_pos, k_pos, MASK_LOCAL, bool(causal), float(scale), (int(window), 1, 0, 0, 0),
                           num_splits, config, float(softcap))


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, block_size: int,
                           local_blocks: int, global_blocks: int, stride_blocks: int, causal: bool, scale: float, *,
                           num_splits: int | None = None, config: TileConfig | None = None) -> Tensor:
    """effx::BlockSparseAttention, fused: visits only the key tiles the layout (and positions) allow."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return _softmax_family(q, k, v, q_pos, k_pos, MASK_BLOCK_SPARSE, bool(causal), float(scale),
                           (0, int(block_size), int(local_blocks), int(global_blocks), int(stride_blocks)),
                           num_splits, config)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, q_pos: Tensor, seq_lens: Tensor,
                    window: int, scale: float, softcap: float = 0.0, *, num_splits: int | None = None,
                    config: TileConfig | None = None) -> Tensor:
    """effx::PagedAttention, fused: reads K/V rows straight from the pool through the block table."""
    _common.check_float(q, k_pool, v_pool)
    b, h, nq, d = q.shape
    _, page, h_kv, _ = k_pool.shape
    max_blocks = block_table.shape[1]
    if h % h_kv:
        raise ValueError(f"query heads {h} must be a multiple of KV heads {h_kv}")
    q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
    block_table, q_pos, seq_lens = block_table.contiguous(), q_pos.contiguous(), seq_lens.contiguous()
    y = torch.empty_like(q)
    if y.numel() == 0:
        return y
    ns = _common.load("attention", _common.interpret_for(q))
    rows = nq * (h // h_kv)
    cfg = config or TileConfig.for_device(q.device, d, rows)
    block_d = _common.block_dim(d)
    length = max_blocks * page
    row_blocks = -(-rows // cfg.block_m)
    splits = _plan_splits(row_blocks, row_blocks * b * h_kv, length, cfg, q.device, num_splits)
    if splits == 1:
        ns.paged_attention_kernel[(row_blocks, b * h_kv)](
            q, k_pool, v_pool, block_table, q_pos, seq_lens, h, h_kv, nq, page, max_blocks, int(window), y,
            SCALE=float(scale), SOFTCAP=float(softcap), HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=block_d,
            **_launch_kwargs(ns, cfg))
        return y
    _split_and_combine(ns, cfg, q, k_pool, v_pool, q_pos, q_pos, block_table, seq_lens, y, length, splits,
                       (int(window), 1, 0, 0, 0, page, max_blocks), MASK_LOCAL, True, True, float(scale),
                       float(softcap))
    return y


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, config: TileConfig | None = None) -> Tensor:
    """softmax((scale Q) K^T) V without a mask; k/v may have fewer (GQA) heads."""
    _check_qkv(q, k, v)
    b, h, nq, d = q.shape
    h_kv, nk = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    y = torch.empty_like(q)
    if y.numel() == 0:
        return y
    ns = _common.load("attention", _common.interpret_for(q))
    cfg = config or TileConfig.for_device(q.device, d)
    rows = nq * (h // h_kv)
    ns.dense_attention_kernel[(-(-rows // cfg.block_m), b * h_kv)](
        q, k, v, h, h_kv, nq, nk, y, SCALE=float(scale), HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=_common.block_dim(d), **_launch_kwargs(ns, cfg))
    return y
