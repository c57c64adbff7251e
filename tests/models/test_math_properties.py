"""Properties the math must have whatever the implementation: padding invariance (encoders), causality
(decoders), window and block locality, and independence of the rows of a batch. Sharp models (attention far
from uniform), so a leak shows."""

from __future__ import annotations

import pytest
import torch

from effx.models import build_model
from tests import oracle
from tests.helpers import case_id, decode_chunks, decoder_spec, encoder_spec
from tests.models.test_oracle import DECODERS, ENCODERS

TOL = 2e-5  # same math, other shapes (batch, padding): summation order only


def _sharp(spec):
    return oracle.sharpen(build_model(spec))


def _ids(vocab: int, batch: int, n: int, seed: int = 0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _decoder(case):
    kind, attention, model_kw = case
    layout = {"linear": "state", "hierarchical": "multiscale"}.get(kind, "contiguous")
    return _sharp(decoder_spec(kind, layout, attention, **({"n_layers": 2} | model_kw)))


@pytest.mark.parametrize("case", ENCODERS, ids=case_id)
def test_encoder_outputs_on_real_tokens_ignore_padding(case):
    kind, attention, model_kw = case
    model = _sharp(encoder_spec(kind, attention, **({"n_layers": 2} | model_kw)))
    vocab = model.spec.model.vocab_size
    real = [9, 14, 5]  # ragged rows
    ids = _ids(vocab, 3, 20, seed=1)
    with torch.no_grad():
        alone = [model(ids[b:b + 1, :n]) for b, n in enumerate(real)]  # each row unpadded, by itself
        for width in (max(real), 20):  # the batch padded to its longest row, and padded further
            mask = torch.zeros(3, width, dtype=torch.int64)
            for b, n in enumerate(real):
                mask[b, :n] = 1
            batch = ids[:, :width] * mask + (1 - mask) * 7  # padding tokens: anything
            out = model(batch, mask)
            for b, n in enumerate(real):
                assert (out[b, :n] - alone[b][0]).abs().max() <= TOL, (width, b)


@pytest.mark.parametrize("case", DECODERS, ids=case_id)
def test_decoder_logits_do_not_see_the_future(case):
    model = _decoder(case)
    vocab = model.spec.model.vocab_size
    ids = _ids(vocab, 2, 18, seed=2)
    with torch.no_grad():
        base = model(ids)
        for i in (0, 6, 11):
            changed = ids.clone()
            changed[:, i + 1:] = (changed[:, i + 1:] + 13) % vocab
            out = model(changed)
            assert (out[:, :i + 1] - base[:, :i + 1]).abs().max() <= TOL, i
            assert (out[:, i + 1:] - base[:, i + 1:]).abs().max() > 1e-3  # the change does reach later tokens


def _reach(kind: str, attention: dict, causal: bool, i: int, j: int) -> bool:
    """Whether a query at position i sees the key at j (the README's definitions)."""
    if kind == "local":
        w = attention["window"]
        return (i - w < j <= i) if causal else abs(i - j) < w
    bs, lb, gb, sb = (attention.get(k, d) for k, d in (("block_size", 16), ("local_blocks", 1),
                                                        ("global_blocks", 1), ("stride_blocks", 0)))
    qb, kb = i // bs, j // bs
    d = qb - kb
    if causal:
        ok = 0 <= d < lb or (kb < gb and d >= 0) or (sb > 0 and d >= 0 and d % sb == 0)
        return ok and j <= i
    return abs(d) < lb or kb < gb or qb < gb or (sb > 0 and abs(d) % sb == 0)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("kind,attention", [
    ("local", {"window": 4}), ("local", {"window": 1}),
    ("block_sparse", {"block_size": 3, "stride_blocks": 2}),
    ("block_sparse", {"block_size": 2, "local_blocks": 2, "global_blocks": 0}),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}{v}" for k, v in x.items()))
def test_a_key_outside_the_window_changes_nothing(family, kind, attention):
    """One layer: a token reaches position i only through attention, so changing a token the layer's rule
    does not let i see must leave i's output exactly as it was, and changing one it sees must not."""
    spec = (encoder_spec(kind, attention, n_layers=1) if family == "encoder"
            else decoder_spec(kind, "contiguous", attention, n_layers=1))
    model = _sharp(spec)
    n, i = 16, 9
    ids = _ids(model.spec.model.vocab_size, 1, n, seed=3)
    with torch.no_grad():
        base = model(ids)[0, i]
        for j in range(n):
            if j == i:
                continue
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 101) % model.spec.model.vocab_size
            moved = float((model(changed)[0, i] - base).abs().max())
            if _reach(kind, attention, family == "decoder", i, j):
                assert moved > 1e-4, (j, moved)
            else:
                assert moved == 0.0 or moved <= 1e-6, (j, moved)


@pytest.mark.parametrize("case", ENCODERS[:13], ids=case_id)
def test_encoder_batch_rows_are_independent(case):
    kind, attention, model_kw = case
    model = _sharp(encoder_spec(kind, attention, **({"n_layers": 2} | model_kw)))
    ids = _ids(model.spec.model.vocab_size, 4, 15, seed=4)
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out, out_p = model(ids, mask), model(ids[perm], mask[perm])
    keep = mask[perm].bool()
    assert (out_p - out[perm])[keep].abs().max() <= TOL


@pytest.mark.parametrize("kind,layout,attention,cache", [
    ("full", "paged", {}, {"block_size": 4, "num_blocks": 24}),
    ("local", "paged", {"window": 5}, {"block_size": 4, "num_blocks": 24}),
    ("local", "ring", {"window": 5}, {}),
    ("linear", "state", {"feature_map": "elu"}, {}),
    ("hierarchical", "multiscale", {"factors": [1, 3]}, {}),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}{v}" for k, v in x.items()))
def test_decoding_a_permuted_batch_permutes_the_logits(kind, layout, attention, cache):
    """Batch rows are independent through every cache: a paged pool shared by the batch included."""
    model = _sharp(decoder_spec(kind, layout, attention, cache, n_layers=2))
    ids = _ids(model.spec.model.vocab_size, 3, 12, seed=5)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out, _ = decode_chunks(model, ids, [5, 1, 1, 1, 4])
        out_p, _ = decode_chunks(model, ids[perm], [5, 1, 1, 1, 4])
        whole = model(ids)
    assert (out - whole).abs().max() <= 1e-4
    assert (out_p - out[perm]).abs().max() <= TOL
