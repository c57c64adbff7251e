"""Incremental decoding equals the full forward, for every compatible (attention, cache layout)."""

import pytest
import torch

from effx.models import build_model, load_model, save_model
from effx.models.cache import PagedCache
from tests.helpers import DECODER_CASES, ENCODER_CASES, case_id, decode_chunks, decoder_spec, encoder_spec
from tests.oracle import sharpen

TOL = 1e-5
N = 17


_decode = decode_chunks


def test_every_compatible_decoder_pair_is_covered():
    from effx.core.registry import ATTENTION

    pairs = {(kind, layout) for kind, e in ATTENTION.items() if "decoder" in e.families for layout in e.cache_layouts}
    assert pairs == {(c[0], c[1]) for c in DECODER_CASES}


@pytest.mark.parametrize("case", DECODER_CASES, ids=case_id)
def test_token_by_token_and_prompt_then_decode_equal_full_forward(case, tokens):
    kind, layout, attention, cache = case
    model = sharpen(build_model(decoder_spec(kind, layout, attention, cache)))  # sharp: slot errors show
    ids = tokens(2, N)
    full = model(ids)
    token_by_token, _ = _decode(model, ids, [1] * N)
    assert (token_by_token - full).abs().max().item() <= TOL
    # a prompt longer than windows / pooling groups, a second chunk, then single tokens
    prompt_then_decode, cache_after = _decode(model, ids, [7, 5] + [1] * (N - 12))
    assert (prompt_then_decode - full).abs().max().item() <= TOL
    assert cache_after.lengths.tolist() == [N, N]


def test_hedgehog_decode_equals_full_forward(tokens):
    """Learned feature maps (moved off their identity start) through the state cache: prompt, chunk, tokens."""
    model = sharpen(build_model(decoder_spec("linear", "state", {"feature_map": "hedgehog", "hedgehog_dim": 6})))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hedgehog" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ids = tokens(2, N)
    full = model(ids)
    for chunks in ([1] * N, [7, 5] + [1] * (N - 12)):
        got, cache = _decode(model, ids, chunks)
        assert (got - full).abs().max().item() <= TOL
    assert cache.layers[0]["s"].shape == (2, 2, 12, 16) and cache.layers[0]["z"].shape == (2, 2, 12)  # m = 2 D'


@pytest.mark.parametrize("case", [c for c in DECODER_CASES if c[1] == "paged"], ids=case_id)
def test_paged_batch_with_different_prompt_lengths(case, tokens):
    kind, layout, attention, cache_params = case
    model = sharpen(build_model(decoder_spec(kind, layout, attention, cache_params)))
    lengths = [5, 2, 8]
    seqs = [tokens(1, n + 4, seed=i)[0] for i, n in enumerate(lengths)]
    prompt = torch.zeros(3, max(lengths), dtype=torch.int64)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b][:n]
    cache = model.empty_cache(3)
    logits, cache = model.step(prompt, cache, new_lengths=torch.tensor(lengths))
    assert isinstance(cache, PagedCache) and cache.lengths.tolist() == lengths
    steps = [logits]
    for t in range(4):
        nxt = torch.stack([seqs[b][lengths[b] + t] for b in range(3)])[:, None]
        out, cache = model.step(nxt, cache)
        steps.append(out)
    for b, n in enumerate(lengths):
        ref = model(seqs[b][None])  # this sequence alone, whole
        got = torch.cat([steps[0][b:b + 1, :n]] + [s[b:b + 1] for s in steps[1:]], 1)
        assert (got - ref).abs().max().item() <= TOL
    # the sequences' blocks are distinct
    used = [cache.block_table[b, : cache.blocks_used[b]].tolist() for b in range(3)]
    flat = [x for u in used for x in u]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("layout,grows", [("contiguous", True), ("ring", False), ("state", False)])
def test_cache_memory(layout, grows, tokens):
    """Every layout's buffers keep their size while decoding; a contiguous cache is sized by its capacity (the
    tokens the host will cache), a ring by its window, a state by neither."""
    kind = {"contiguous": "full", "ring": "local", "state": "linear"}[layout]
    model = build_model(decoder_spec(kind, layout, {"window": 4} if kind == "local" else {}))
    ids = tokens(2, 12)
    cache = model.empty_cache(2, capacity=12)
    sizes = []
    for t in range(12):
        _, cache = model.step(ids[:, t:t + 1], cache)
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1  # written in place: nothing grows
    per_token = 2 * 3 * 2 * 2 * 16 * 4  # K and V x layers x batch x H_kv x head_dim x fp32
    doubled = model.empty_cache(2, capacity=24).nbytes()
    if grows:
        assert sizes[0] == 12 * per_token and doubled == 24 * per_token
    else:
        assert doubled == sizes[0]
        if layout == "ring":
            assert sizes[0] == 4 * per_token  # the window's 4 slots (one token per step)


def test_paged_pool_is_fixed_and_blocks_grow_by_block(tokens):
    model = build_model(decoder_spec("full", "paged", cache={"block_size": 4, "num_blocks": 24}))
    cache = model.empty_cache(1)
    pool = cache.nbytes()
    in_use = []
    ids = tokens(1, 9)
    for t in range(9):
        _, cache = model.step(ids[:, t:t + 1], cache)
        in_use.append(cache.nbytes_in_use())
        assert cache.nbytes() == pool
    assert len(set(in_use[0:4])) == 1 and in_use[4] > in_use[3] and in_use[8] > in_use[7]


def test_decoding_past_max_seq_len_is_an_error(tokens):
    from effx.core.errors import EffxError

    model = build_model(decoder_spec("full", "contiguous", max_seq_len=8))
    cache = model.empty_cache(1)
    _, cache = model.step(tokens(1, 8), cache)
    with pytest.raises(EffxError, match="max_seq_len"):
        model.step(tokens(1, 1), cache)


@pytest.mark.parametrize("case", ENCODER_CASES[:2] + DECODER_CASES[-2:], ids=case_id)
def test_save_load_round_trip_is_exact(case, tmp_path, tokens):
    spec = encoder_spec(case[0], case[1]) if len(case) == 2 else decoder_spec(*case)
    model = build_model(spec)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.spec == spec
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)
    ids = tokens(2, 9)
    assert torch.equal(model(ids), loaded(ids))


def test_same_seed_same_weights_other_seed_differs():
    a = build_model(encoder_spec("full", seed=3))
    b = build_model(encoder_spec("full", seed=3))
    c = build_model(encoder_spec("full", seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.embed.weight, c.embed.weight)
