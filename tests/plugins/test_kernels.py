"""The fused Triton kernels against the ops' reference math (Triton interpreter on CPU, or CUDA).

Shapes are tiny (the interpreter runs every program in Python) but chosen to cross every boundary the
kernels have: sequence lengths that are not a multiple of the tile (ragged tails), GQA (4 query heads on
2 KV heads), empty key slots (-1), windows of 1 and wider than the sequence, block layouts from sparse to
all-on, key positions in ring-buffer order, rows with no allowed key, and the split-K decode path.
"""

from __future__ import annotations

import pytest
import torch

import effx.plugins  # noqa: F401 (registers the ops)
from effx.plugins.block_sparse import block_sparse_attention_reference
from effx.plugins.common import softmax_attention
from effx.plugins.kernels import attention, linear, linformer
from effx.plugins.linear import (
    favor_projection,
    linear_attention_reference,
    linear_attention_state_reference,
)
from effx.plugins.linformer import linformer_attention_reference
from effx.plugins.local import local_attention_reference
from effx.plugins.paged import paged_attention_reference

FP32_TOL = 1e-4
SMALL = attention.TileConfig(16, 16, 16, 4, 1)  # 16-wide tiles and scans: N = 37 spans three of each
B, H, H_KV, N, D = 2, 4, 2, 37, 12  # D = 12 also pads the head dim to a 16-wide tile


def rand(*shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def qkv(kernel_device):
    q = rand(B, H, N, D, seed=1, device=kernel_device)
    k = rand(B, H_KV, N, D, seed=2, device=kernel_device)
    v = rand(B, H_KV, N, D, seed=3, device=kernel_device)
    pos = torch.arange(N, device=kernel_device).expand(B, N).contiguous()
    k_pos = pos.clone()
    k_pos[1, 30:] = -1  # right padding of the second sequence
    k_pos[0, 3:6] = -1  # and a hole in the first
    return q, k, v, pos, k_pos


# -- LocalAttention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("window", [1, 5, 100], ids=lambda w: f"w{w}")
def test_local_prefill(qkv, causal, window):
    q, k, v, pos, k_pos = qkv
    out = attention.local_attention(q, k, v, pos, k_pos, window, causal, D**-0.5, config=SMALL)
    ref = local_attention_reference(q, k, v, pos, k_pos, window, causal, D**-0.5)
    assert max_err(out, ref) <= FP32_TOL


@pytest.mark.parametrize("window", [1, 4, 50])
@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
def test_local_decode_ring_positions(qkv, window, splits):
    """Decode rows against keys whose positions are in ring order (not sorted) with empty slots."""
    q, k, v, pos, _ = qkv
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0)).to(q.device)
    k_ring, v_ring = k[:, :, perm].contiguous(), v[:, :, perm].contiguous()
    k_pos = pos[:, perm].contiguous()
    k_pos[0, :4] = -1
    q_new = q[:, :, :3].contiguous()
    q_pos = torch.tensor([[36, 37, 38], [20, 21, 22]], device=q.device)
    out = attention.local_attention(q_new, k_ring, v_ring, q_pos, k_pos, window, True, 0.3, num_splits=splits,
                                    config=SMALL)
    ref = local_attention_reference(q_new, k_ring, v_ring, q_pos, k_pos, window, True, 0.3)
    assert max_err(out, ref) <= FP32_TOL


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
def test_rows_without_allowed_keys_get_the_mean_value(qkv, splits):
    """The reference gives a query that may see no key the plain mean of all values (softmax over equal
    lowest scores), empty slots included; rows that do see keys are unaffected."""
    q, k, v, _, k_pos = qkv
    q_new = q[:, :, :3].contiguous()
    q_pos = torch.tensor([[10, -5, 12], [-1, 21, 22]], device=q.device)
    out = attention.local_attention(q_new, k, v, q_pos, k_pos, 3, True, 0.3, num_splits=splits, config=SMALL)
    ref = local_attention_reference(q_new, k, v, q_pos, k_pos, 3, True, 0.3)
    assert max_err(out, ref) <= FP32_TOL
    mean = v.mean(2).repeat_interleave(H // H_KV, 1)  # (B,H,D)
    assert max_err(out[0, :, 1], mean[0]) <= FP32_TOL


@pytest.mark.parametrize("splits", [1, 3], ids=["single", "split3"])
@pytest.mark.parametrize("softcap", [0.5, 2.0], ids=lambda c: f"cap{c}")
def test_local_softcap(qkv, softcap, splits):
    """Attention-logit soft-capping (Gemma 2): scores capped to c tanh(s / c) before the mask. The scale is
    large so the cap bites (scores of several c)."""
    q, k, v, pos, k_pos = qkv
    for q_use, q_pos in ((q, pos), (q[:, :, -2:].contiguous(), pos[:, -2:].contiguous())):
        out = attention.local_attention(q_use, k, v, q_pos, k_pos, 6, True, 1.5, softcap, num_splits=splits,
                                        config=SMALL)
        ref = local_attention_reference(q_use, k, v, q_pos, k_pos, 6, True, 1.5, softcap)
        assert max_err(out, ref) <= FP32_TOL
        assert max_err(out, local_attention_reference(q_use, k, v, q_pos, k_pos, 6, True, 1.5)) > 1e-2


# -- BlockSparseAttention ---------------------------------------------------------------------------------
LAYOUTS = {
    "local1+global1+stride3": (4, 1, 1, 3),
    "local-only-bs8": (8, 1, 0, 0),
    "odd-block5+stride2": (5, 2, 1, 2),
    "block32-wider-than-tile": (32, 1, 0, 0),  # whole key tiles inside one block: the element causal mask rules
    "all-on": (4, 100, 0, 0),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_block_sparse(qkv, causal, layout):
    q, k, v, pos, k_pos = qkv
    bs, lb, gb, sb = LAYOUTS[layout]
    out = attention.block_sparse_attention(q, k, v, pos, k_pos, bs, lb, gb, sb, causal, 0.3, config=SMALL)
    ref = block_sparse_attention_reference(q, k, v, pos, k_pos, bs, lb, gb, sb, causal, 0.3)
    assert max_err(out, ref) <= FP32_TOL
    if layout == "all-on":  # every block allowed: plain (causal) softmax attention over the valid keys
        qp, kp = pos[:, None, :, None], k_pos[:, None, None, :]
        allowed = (kp >= 0) & (kp <= qp) if causal else (kp >= 0).expand(-1, -1, N, -1)
        assert max_err(out, softmax_attention(q, k, v, allowed, 0.3)) <= FP32_TOL


def test_block_sparse_decode_split(qkv):
    q, k, v, pos, k_pos = qkv
    q_new, q_pos = q[:, :, -2:].contiguous(), pos[:, -2:].contiguous()
    out = attention.block_sparse_attention(q_new, k, v, q_pos, k_pos, 4, 1, 1, 3, True, 0.3, num_splits=2,
                                           config=SMALL)
    ref = block_sparse_attention_reference(q_new, k, v, q_pos, k_pos, 4, 1, 1, 3, True, 0.3)
    assert max_err(out, ref) <= FP32_TOL


# -- PagedAttention -----------------------------------------------------------------------------------------
@pytest.fixture
def paged(kernel_device):
    page, blocks = 4, 9
    k_pool = rand(blocks, page, H_KV, D, seed=4, device=kernel_device)
    v_pool = rand(blocks, page, H_KV, D, seed=5, device=kernel_device)
    block_table = torch.tensor([[3, 1, 7, 0, 2], [5, 8, 4, 6, 0]], device=kernel_device)  # unordered pages
    seq_lens = torch.tensor([17, 9], device=kernel_device)  # ragged: 17 = 4 pages + 1, 9 = 2 pages + 1
    q = rand(B, H, 3, D, seed=6, device=kernel_device)
    q_pos = torch.tensor([[14, 15, 16], [6, 7, 8]], device=kernel_device)
    return q, k_pool, v_pool, block_table, q_pos, seq_lens


@pytest.mark.parametrize("window", [0, 1, 5], ids=["full", "w1", "w5"])
@pytest.mark.parametrize("splits", [1, 2], ids=["single", "split2"])
def test_paged(paged, window, splits):
    out = attention.paged_attention(*paged, window, 0.3, num_splits=splits, config=SMALL)
    ref = paged_attention_reference(*paged, window, 0.3)
    assert max_err(out, ref) <= FP32_TOL


@pytest.mark.parametrize("splits", [1, 2], ids=["single", "split2"])
def test_paged_softcap(paged, splits):
    out = attention.paged_attention(*paged, 5, 1.5, 0.75, num_splits=splits, config=SMALL)
    ref = paged_attention_reference(*paged, 5, 1.5, 0.75)
    assert max_err(out, ref) <= FP32_TOL


@pytest.mark.parametrize("splits", [1, 2], ids=["single", "split2"])
def test_paged_rows_without_keys(paged, splits):
    q, k_pool, v_pool, block_table, q_pos, seq_lens = paged
    q_pos = q_pos.clone()
    q_pos[1, 0] = -1  # a padding query: sees nothing, gets the mean of every gathered row
    out = attention.paged_attention(q, k_pool, v_pool, block_table, q_pos, seq_lens, 2, 0.3, num_splits=splits,
                                    config=SMALL)
    ref = paged_attention_reference(q, k_pool, v_pool, block_table, q_pos, seq_lens, 2, 0.3)
    assert max_err(out, ref) <= FP32_TOL


# -- low precision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["local", "block_sparse", "paged"])
def test_softmax_family_low_precision(qkv, paged, close_lowp, op, dtype):
    if op == "paged":
        q, k_pool, v_pool, bt, q_pos, seq_lens = paged
        inputs = [t.to(dtype) for t in (q, k_pool, v_pool)]
        run = attention.paged_attention(*inputs, bt, q_pos, seq_lens, 5, 0.3, config=SMALL)
        ref = paged_attention_reference(*inputs, bt, q_pos, seq_lens, 5, 0.3)
        ref32 = paged_attention_reference(*(t.float() for t in inputs), bt, q_pos, seq_lens, 5, 0.3)
        scale = inputs[2].float().abs().max().item()
    else:
        q, k, v, pos, k_pos = qkv
        inputs = [t.to(dtype) for t in (q, k, v)]
        if op == "local":
            kernel, reference, args = attention.local_attention, local_attention_reference, (7, True, 0.3)
        else:
            kernel, reference, args = attention.block_sparse_attention, block_sparse_attention_reference, \
                (4, 1, 1, 3, False, 0.3)
        run = kernel(*inputs, pos, k_pos, *args, config=SMALL)
        ref = reference(*inputs, pos, k_pos, *args)
        ref32 = reference(*(t.float() for t in inputs), pos, k_pos, *args)
        scale = inputs[2].float().abs().max().item()
    close_lowp(run, ref32, scale, dtype, ref_lowp=ref)


# -- LinformerAttention -----------------------------------------------------------------------------------
LINFORMER = {  # (B, H, H_kv, N, D, k, E heads)
    "per-head-E": (2, 2, 2, 37, 12, 20, 2),
    "gqa-shared-E": (1, 4, 2, 33, 16, 9, 1),
    "k>n": (2, 2, 1, 17, 8, 40, 1),
}


@pytest.mark.parametrize("fused", [False, True], ids=["project+flash", "single-launch"])
@pytest.mark.parametrize("case", list(LINFORMER), ids=list(LINFORMER))
def test_linformer(kernel_device, case, fused):
    b, h, h_kv, n, d, kp, eh = LINFORMER[case]
    q, k, v = (rand(b, hh, n, d, seed=s, device=kernel_device) for s, hh in ((1, h), (2, h_kv), (3, h_kv)))
    e = rand(eh, kp, n, seed=4, device=kernel_device) / n**0.5
    f = rand(eh, kp, n, seed=5, device=kernel_device) / n**0.5
    out = linformer.linformer_attention(q, k, v, e, f, 0.3, fused=fused)
    assert max_err(out, linformer_attention_reference(q, k, v, e, f, 0.3)) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["project+flash", "single-launch"])
def test_linformer_low_precision(kernel_device, close_lowp, dtype, fused):
    b, h, h_kv, n, d, kp, eh = LINFORMER["gqa-shared-E"]
    q, k, v = (rand(b, hh, n, d, seed=s, device=kernel_device, dtype=dtype) for s, hh in ((1, h), (2, h_kv), (3, h_kv)))
    e = (rand(eh, kp, n, seed=4, device=kernel_device) / n**0.5).to(dtype)
    f = (rand(eh, kp, n, seed=5, device=kernel_device) / n**0.5).to(dtype)
    out = linformer.linformer_attention(q, k, v, e, f, 0.3, fused=fused)
    ref32 = linformer_attention_reference(*(t.float() for t in (q, k, v, e, f)), 0.3)
    # outputs are means of the projected values F V, so those bound them
    scale = (f.float() @ v.float()).abs().max().item()
    close_lowp(out, ref32, scale, dtype, ref_lowp=linformer_attention_reference(q, k, v, e, f, 0.3))


# -- NormalizedLinearAttention / NormalizedLinearAttentionState -----------------------------------------------------------------
LINEAR = {"mha": (2, 2, 2, 37, 12), "gqa": (1, 4, 2, 33, 16)}  # (B, H, H_kv, N, D)
FAVOR_M = 20  # not a power of two: the feature tile is padded


def linear_inputs(case, kind, device, dtype=torch.float32):
    b, h, h_kv, n, d = LINEAR[case]
    q, k, v = (rand(b, hh, n, d, seed=s, device=device, dtype=dtype) for s, hh in ((1, h), (2, h_kv), (3, h_kv)))
    omega = None
    if kind == "favor":
        omega = favor_projection(FAVOR_M, d, torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
    m = FAVOR_M if kind == "favor" else d
    s0 = rand(b, h_kv, m, d, seed=8, device=device, dtype=dtype).abs()  # a state from earlier tokens
    z0 = (rand(b, h_kv, m, seed=9, device=device).abs() + 1).to(dtype)
    return q, k, v, omega, s0, z0


# favor's projection omega x runs as one tensor-core tile (torch path) or column by column (the form the
# TensorRT plugin falls back to when omega's tile would not fit its shared memory); elu has no projection
FEATURES = [("elu", True), ("favor", True), ("favor", False)]
FEATURE_IDS = ["elu", "favor-tile-proj", "favor-column-proj"]


@pytest.mark.parametrize(("kind", "proj_dot"), FEATURES, ids=FEATURE_IDS)
@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_non_causal(kernel_device, case, kind, proj_dot):
    q, k, v, omega, _, _ = linear_inputs(case, kind, kernel_device)
    k_valid = torch.ones(q.shape[0], q.shape[2], device=q.device)
    k_valid[0, -5:] = 0  # padding leaves both sums
    out = linear.linear_attention(q, k, v, k_valid, omega, kind, 1e-6, proj_dot=proj_dot)
    assert max_err(out, linear_attention_reference(q, k, v, k_valid, omega, kind, 1e-6)) <= FP32_TOL


@pytest.mark.parametrize(("kind", "proj_dot"), FEATURES, ids=FEATURE_IDS)
@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_state_chunked_equals_prefix_sums(kernel_device, case, kind, proj_dot):
    """Chunked (intra-chunk quadratic, inter-chunk state) == the prefix-sum reference, state included."""
    q, k, v, omega, s0, z0 = linear_inputs(case, kind, kernel_device)
    y, s, z = linear.linear_attention_state(q, k, v, s0, z0, omega, kind, 1e-6, proj_dot=proj_dot)
    ry, rs, rz = linear_attention_state_reference(q, k, v, s0, z0, omega, kind, 1e-6)
    assert max_err(y, ry) <= FP32_TOL
    # the state is a sum over all tokens: compare relative to its size (summation order differs)
    assert max_err(s, rs) <= FP32_TOL * rs.abs().max().item()
    assert max_err(z, rz) <= FP32_TOL * rz.abs().max().item()


@pytest.mark.parametrize("kind", ["elu", "favor"])
def test_linear_decode_step_and_state_chain(kernel_device, kind):
    """The single-token kernel, chained over a few steps, equals one prefix-sum pass over those tokens."""
    q, k, v, omega, s0, z0 = linear_inputs("gqa", kind, kernel_device)
    s, z = s0, z0
    outs = []
    for t in range(3):
        y, s, z = linear.linear_attention_state(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], s, z, omega,
                                                kind, 1e-6)
        outs.append(y)
    ry, rs, rz = linear_attention_state_reference(q[:, :, :3], k[:, :, :3], v[:, :, :3], s0, z0, omega, kind, 1e-6)
    assert max_err(torch.cat(outs, 2), ry) <= FP32_TOL
    assert max_err(s, rs) <= FP32_TOL * rs.abs().max().item()
    assert max_err(z, rz) <= FP32_TOL * rz.abs().max().item()


IDENTITY_M = 24  # precomputed features (Hedgehog: 2 D'), wider than the values and not a power of two


@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_identity_features(kernel_device, case):
    """feature_map 'identity' (the features come precomputed, m != D): non-causal with padding, the chunked
    prefill from a state, and decode steps chained, each against the reference."""
    b, h, h_kv, n, d = LINEAR[case]
    m = IDENTITY_M
    # Hedgehog's features are softmaxes: positive, each half sums to 1
    q = rand(b, h, n, m, seed=1, device=kernel_device).softmax(-1)
    k = rand(b, h_kv, n, m, seed=2, device=kernel_device).softmax(-1)
    v = rand(b, h_kv, n, d, seed=3, device=kernel_device)
    s0, z0 = rand(b, h_kv, m, d, seed=8, device=kernel_device).abs(), rand(b, h_kv, m, seed=9, device=kernel_device).abs() + 1
    k_valid = torch.ones(b, n, device=kernel_device)
    k_valid[0, -5:] = 0
    out = linear.linear_attention(q, k, v, k_valid, None, "identity", 1e-6)
    assert out.shape == (b, h, n, d)
    assert max_err(out, linear_attention_reference(q, k, v, k_valid, None, "identity", 1e-6)) <= FP32_TOL
    y, s, z = linear.linear_attention_state(q, k, v, s0, z0, None, "identity", 1e-6)
    ry, rs, rz = linear_attention_state_reference(q, k, v, s0, z0, None, "identity", 1e-6)
    assert max_err(y, ry) <= FP32_TOL and max_err(s, rs) <= FP32_TOL * rs.abs().max().item()
    assert max_err(z, rz) <= FP32_TOL * rz.abs().max().item()
    s, z, outs = s0, z0, []
    for t in range(3):
        y, s, z = linear.linear_attention_state(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], s, z, None,
                                                "identity", 1e-6)
        outs.append(y)
    ry, rs, _ = linear_attention_state_reference(q[:, :, :3], k[:, :, :3], v[:, :, :3], s0, z0, None, "identity", 1e-6)
    assert max_err(torch.cat(outs, 2), ry) <= FP32_TOL and max_err(s, rs) <= FP32_TOL * rs.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["elu", "favor"])
def test_linear_low_precision(kernel_device, close_lowp, kind, dtype):
    """Low-precision inputs: the kernels compute features and states in fp32 and round once, so they are
    held to the bound even where the reference (features and cumulative sums in the low dtype) is not."""
    q, k, v, omega, s0, z0 = linear_inputs("gqa", kind, kernel_device, dtype)
    up = [None if t is None else t.float() for t in (q, k, v, omega, s0, z0)]
    scale = v.float().abs().max().item()
    out = linear.linear_attention(q, k, v, None, omega, kind, 1e-6)
    close_lowp(out, linear_attention_reference(up[0], up[1], up[2], None, up[3], kind, 1e-6), scale, dtype)
    y, s, z = linear.linear_attention_state(q, k, v, s0, z0, omega, kind, 1e-6)
    ry, rs, rz = linear_attention_state_reference(up[0], up[1], up[2], up[4], up[5], up[3], kind, 1e-6)
    close_lowp(y, ry, scale, dtype)
    close_lowp(s, rs, rs.abs().max().item(), dtype)
    close_lowp(z, rz, rz.abs().max().item(), dtype)
