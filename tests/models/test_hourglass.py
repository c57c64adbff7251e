"""The hourglass (attention.kind = hierarchical) as Nawrot et al. describe it: whole layers at shortened
resolutions. f = 1 is the base transformer, shortened layers see n/f tokens, decoding runs a level once per
f tokens with a cache that grows by one entry per f tokens, and prefill + decode equals the whole sequence."""

from __future__ import annotations

import pytest
import torch

from effx.models import build_model
from effx.models.attention import StepInputs
from tests import oracle
from tests.helpers import decode_chunks, decoder_spec, encoder_spec

VARIANTS = [({"factors": [1, 3]}, 3), ({"factors": [1, 2, 4]}, 5),
            ({"factors": [1, 2, 4], "shorten": "linear", "upsample": "linear"}, 6), ({"factors": [1, 4]}, 2)]


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_factor_one_everywhere_is_the_base_transformer_exactly(family):
    make = (lambda kind, a, cache: encoder_spec(kind, a, n_layers=3)) if family == "encoder" else \
        (lambda kind, a, cache: decoder_spec(kind, cache, a, n_layers=3))
    base = build_model(make("full", {}, "contiguous"))
    hourglass = build_model(make("hierarchical", {"factors": [1]}, "multiscale"))
    hourglass.load_state_dict(base.state_dict())
    ids = _ids(2, 19)
    with torch.no_grad():
        assert torch.equal(hourglass(ids), base(ids))


@pytest.mark.parametrize("attention,layers", VARIANTS, ids=lambda v: str(v))
def test_every_sublayer_of_a_shortened_level_runs_on_n_over_f_tokens(attention, layers):
    model = build_model(decoder_spec("hierarchical", "multiscale", attention, n_layers=layers))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1])) for b in model.blocks]
    n = 23
    with torch.no_grad():
        model(_ids(2, n))
    for h in hooks:
        h.remove()
    assert seen == [-(-n // b.attn.factor) for b in model.blocks]  # attention AND MLP see ceil(n / f) tokens
    assert max(b.attn.factor for b in model.blocks) == attention["factors"][-1]


@pytest.mark.parametrize("attention,layers", VARIANTS, ids=lambda v: str(v))
def test_decoding_runs_a_level_once_per_f_tokens_and_equals_the_whole_sequence(attention, layers):
    model = oracle.sharpen(build_model(decoder_spec("hierarchical", "multiscale", attention, n_layers=layers)))
    ids = _ids(2, 29, seed=1)
    with torch.no_grad():
        whole = model(ids)
        for chunks in ([1] * 29, [7, 1, 1, 1, 9, 1, 9], [29]):
            stepped, cache = decode_chunks(model, ids, chunks)
            assert (stepped - whole).abs().max() <= 1e-4, chunks
            for block, state in zip(model.blocks, cache.layers, strict=True):
                if block.attn.factor == 1:  # the host's buffers: token p in slot p, the slots after 29 unwritten
                    assert state["key"].shape[2] == model.spec.model.max_seq_len
                    assert state["key"][:, :, 28].abs().sum() > 0 and not state["key"][:, :, 29:].any()
                else:  # one pooled entry per f tokens
                    assert state["key"].shape[2] == -(-29 // block.attn.factor)
            assert all(s["tail"].shape[1] < 4 for s in cache.layers if "tail" in s)


def test_a_shortened_level_runs_only_when_a_group_completes():
    model = build_model(decoder_spec("hierarchical", "multiscale", {"factors": [1, 4]}, n_layers=3))
    ids = _ids(1, 12, seed=2)
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[1]))
    with torch.no_grad():
        decode_chunks(model, ids, [1] * 12)
    # token p completes group p // 4 when p % 4 == 0 (the k - 1 shift): the level gets 1 token then, else 0
    assert calls == [1 if p % 4 == 0 else 0 for p in range(12)]


def test_encoder_padding_and_learned_pooling():
    model = oracle.sharpen(build_model(encoder_spec("hierarchical", {"factors": [1, 2], "shorten": "linear",
                                                                      "upsample": "linear"}, n_layers=3)))
    ids = _ids(2, 13, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = model(ids, mask)
        alone = model(ids[1:, :8])
        assert (out[1, :8] - alone[0]).abs().max() <= 2e-5
        assert (out - oracle.forward(model, ids, mask))[mask.bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("attention,layers", VARIANTS, ids=lambda v: str(v))
def test_a_step_that_completes_no_group_runs_only_the_factor_one_layers(attention, layers):
    model = oracle.sharpen(build_model(decoder_spec("hierarchical", "multiscale", attention, n_layers=layers)))
    hourglass = model.hourglass
    k = hourglass.first_ratio
    assert k == attention["factors"][1]
    for start in range(12):  # positions start .. start + s - 1 complete a group iff one of them is a multiple of k
        for s in range(1, 6):
            assert hourglass.completes_group(start, s) == any(p % k == 0 for p in range(start, start + s))
    ids = _ids(2, 21, seed=4)
    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, _a: ran.append(m)) for b in model.blocks]
    with torch.no_grad():
        whole = model(ids)
        _, cache = model.step(ids[:, :1], model.empty_cache(2))
        fine_steps = 0
        for p in range(1, 21):
            if not hourglass.completes_group(p, 1):
                q_pos = cache.lengths[:, None]
                inputs = StepInputs(cache.lengths, q_pos, torch.ones_like(cache.lengths))
                ran.clear()
                x, changed = hourglass.step_fine(model.blocks, model.embed_tokens(ids[:, p:p + 1], q_pos),
                                                 cache.layers, inputs)
                assert [list(model.blocks).index(b) for b in ran] == hourglass.fine_layers()
                assert (model.head(x) - whole[:, p:p + 1]).abs().max() <= 1e-4
                fine_steps += 1
            _, after = model.step(ids[:, p:p + 1], cache)  # the general step: what the fine one must leave
            if not hourglass.completes_group(p, 1):
                for i, layer in enumerate(after.layers):  # what it changes, it changes alike; the rest stays
                    for name, t in layer.items():
                        expected = changed[i][name] if name in changed.get(i, {}) else cache.layers[i][name]
                        assert expected.shape == t.shape and torch.allclose(expected, t, atol=1e-5), (p, i, name)
            cache = after
    for h in hooks:
        h.remove()
    assert fine_steps == sum(p % k != 0 for p in range(1, 21))
