"""`effx adapt` (effx.models.adapt): attention transfer and LoRA bring a swapped model back to its teacher.

Tiny random Hugging Face models (BERT and Llama, hidden 32, 2 layers, initializer_range 0.2 so that attention
is far from uniform and a swap really changes the outputs) with a WordLevel tokenizer trained on CPython's
pydoc topics, which are also the text. One torch thread: the numbers (and the resume test's bitwise equality)
do not depend on how busy the machine is.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from effx.core.errors import ArtifactError, CompatibilityError, OutputPathError, SpecError
from effx.models import build_model, import_hf, load_model, save_model
from effx.models.adapt import (
    Interrupted,
    adapt,
    load_pair,
    pooling_projection,
    prefix_projection,
    scheduled_lr,
    stage1_loss,
    stage2_loss,
    start_projections,
    vary_lengths,
)
from effx.models.hf_import import import_to_folder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 200
SEQ = 32
LINFORMER = {"attention.kind": "linformer", "attention.k": 8, "model.max_seq_len": SEQ}
LOCAL = {"attention.kind": "local", "attention.window": 4}
HEDGEHOG = {"attention.kind": "linear", "attention.feature_map": "hedgehog"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_corpus(folder):
    """A text file (the first 12 pydoc topics, ~60k characters) and a tokenizer trained on it."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:12])
    path = folder / "text.txt"
    path.write_text(text)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", bos_token="<s>")
    return path, fast


def write_bert(folder, tokenizer, initializer_range=0.2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=initializer_range)
    transformers.BertModel(cfg).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_llama(folder, tokenizer):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   initializer_range=0.2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    text, tokenizer = write_corpus(root)
    return {"text": text, "bert": write_bert(root / "bert", tokenizer), "llama": write_llama(root / "llama", tokenizer),
            "tokenizer": tokenizer}


def run(corpus, out, model="bert", overrides=LINFORMER, **kw):
    kw = {"seq": SEQ, "batch": 8, "steps": 100, "lr": 1e-2, "plots": False} | kw  # tiny E/F: 32 wide
    return adapt(f"hf:{corpus[model]}", out, texts=[corpus["text"]], overrides=overrides, **kw)


def held_out_ids(corpus, report, family="encoder"):
    """The evaluated held-out sequences, rebuilt here from the text (the end of the stream)."""
    tok = corpus["tokenizer"]
    lines = [x for x in corpus["text"].read_text().splitlines() if x.strip()]
    stream = [t for ids in tok(lines, add_special_tokens=False)["input_ids"] for t in ids]
    head, tail = ([tok.cls_token_id], [tok.sep_token_id]) if family == "encoder" else ([tok.bos_token_id], [])
    body = SEQ - len(head) - len(tail)
    rows = [head + stream[i * body:(i + 1) * body] + tail for i in range(len(stream) // body)]
    n_held, n_eval = report["text"]["held_out_sequences"], report["text"]["evaluated_sequences"]
    return torch.tensor(rows[len(rows) - n_held:][:n_eval])


def attention_mse(teacher, student, ids):
    """Per layer: MSE of the student's attention on the teacher's input of that layer (computed here)."""
    grabbed = {}
    hooks = [blk.attn.register_forward_hook(lambda m, a, o, i=i: grabbed.__setitem__(i, (a[0], o)))
             for i, blk in enumerate(teacher.blocks)]
    with torch.no_grad():
        teacher(ids)
        pos = torch.arange(ids.shape[1]).expand(ids.shape)
        errs = [((student.blocks[i].attn(x, pos, None) - y) ** 2).mean().item() for i, (x, y) in sorted(grabbed.items())]
    for h in hooks:
        h.remove()
    return errs


def embedding_cosine(teacher, student, ids):
    with torch.no_grad():
        return torch.cosine_similarity(student(ids).mean(1), teacher(ids).mean(1), dim=-1).mean().item()


# ------------------------------------------------------------------------------------------------ stage 1
def test_linformer_transfer_cuts_every_layer_error_tenfold(corpus, tmp_path):
    result = run(corpus, tmp_path / "out", steps=100)
    rep = result.report
    errs = rep["layer_attention_mse"]
    assert errs["layers"] == [0, 1]
    for before, after in zip(errs["before"], errs["after"], strict=True):
        assert after <= before / 10, errs

    # the report's numbers are what the saved folder does (recomputed here from the files)
    teacher = import_hf(corpus["bert"], {"model.max_seq_len": SEQ})
    adapted, bare = load_model(tmp_path / "out"), import_hf(corpus["bert"], LINFORMER)
    ids = held_out_ids(corpus, rep)
    assert attention_mse(teacher, adapted, ids) == pytest.approx(errs["after"], rel=1e-4)
    assert attention_mse(teacher, bare, ids) == pytest.approx(errs["before"], rel=1e-4)
    cos_after, cos_before = embedding_cosine(teacher, adapted, ids), embedding_cosine(teacher, bare, ids)
    assert rep["held_out"]["after"]["embedding_cosine"] == pytest.approx(cos_after, abs=1e-5)
    assert rep["held_out"]["before"]["embedding_cosine"] == pytest.approx(cos_before, abs=1e-5)
    assert cos_after > cos_before + 0.2  # the bare Linformer swap is far off (random E/F); adapted it is close

    # stage 1 trains only what the swap added: every tensor the teacher has is untouched
    got, ref = adapted.state_dict(), teacher.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    assert sorted(set(got) - set(ref)) == sorted(rep["stages"][0]["trains"]) == [
        "blocks.0.attn.e", "blocks.0.attn.f", "blocks.1.attn.e", "blocks.1.attn.f"]
    assert rep["stages"][1]["steps_done"] == 0  # LoRA off by default when stage 1 has parameters
    # provenance: the teacher and the kind, in origin.json and adapt.json
    origin = json.loads((tmp_path / "out" / "origin.json").read_text())
    assert origin["hf"] == str(corpus["bert"].resolve()) and origin["attention"] == "full"
    assert origin["adapted"] == {"teacher": str(corpus["bert"].resolve()), "kind": "linformer", "report": "adapt.json"}
    assert json.loads((tmp_path / "out" / "adapt.json").read_text())["held_out"] == rep["held_out"]


def test_pooling_start_averages_segments_and_is_exact_when_k_covers_the_sequence(corpus):
    assert torch.equal(pooling_projection(2, 6, 8), torch.tensor([[1 / 3] * 3 + [0.0] * 5,
                                                                   [0.0] * 3 + [1 / 3] * 3 + [0.0] * 2]))
    assert torch.equal(pooling_projection(4, 2, 3), torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]]))
    # k = 2n: every position is repeated twice, which leaves softmax attention exactly full attention
    pair = load_pair(f"hf:{corpus['bert']}", {"attention.kind": "linformer", "attention.k": 2 * SEQ,
                                              "model.max_seq_len": 2 * SEQ})
    ids = torch.randint(5, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    assert (pair.student(ids) - pair.teacher(ids)).abs().max() > 0.1  # the imported random projections
    assert start_projections(pair, SEQ) == [f"blocks.{i}.attn.{x}" for i in range(2) for x in "ef"]
    assert (pair.student(ids) - pair.teacher(ids)).abs().max() < 1e-5


def test_cosine_schedule_falls_from_the_rate_to_its_floor_by_the_last_step():
    rates = [scheduled_lr(1e-3, "cosine", t, 11) for t in range(11)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(5e-5) and rates[5] == pytest.approx(5.25e-4)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert {scheduled_lr(1e-3, "constant", t, 11) for t in range(11)} == {1e-3}


def test_prefix_start_keeps_each_token_of_a_short_input(corpus, monkeypatch):
    assert torch.equal(prefix_projection(2, 6, 8), torch.tensor([[1.0] + [0.0] * 7, [0.0, 1.0] + [0.0] * 6]))
    assert torch.equal(prefix_projection(4, 2, 3), pooling_projection(4, 2, 3))  # k >= n: pooling is exact
    # k = SEQ / 2 over SEQ positions: an input of up to k tokens keeps every token's key and value; only the
    # empty rows' share of the softmax separates it from full attention, which masking them removes exactly
    k = SEQ // 2
    pair = load_pair(f"hf:{corpus['bert']}", {"attention.kind": "linformer", "attention.k": k,
                                              "model.max_seq_len": SEQ})
    assert start_projections(pair, SEQ, "prefix") == [f"blocks.{i}.attn.{x}" for i in range(2) for x in "ef"]
    ids = torch.randint(5, VOCAB, (2, k), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, k - 3:] = 0
    teacher = pair.teacher(ids, mask)
    pooled = load_pair(f"hf:{corpus['bert']}", {"attention.kind": "linformer", "attention.k": k,
                                                "model.max_seq_len": SEQ})
    start_projections(pooled, SEQ, "pool")
    real = mask.bool()
    err_prefix = (pair.student(ids, mask) - teacher)[real].abs().max()
    err_pool = (pooled.student(ids, mask) - teacher)[real].abs().max()
    assert err_prefix < err_pool / 2, (err_prefix, err_pool)
    from effx.models import linformer
    from effx.plugins.common import softmax_attention

    def without_empty_rows(self, q, k_, v, positions, key_mask):  # rows past the input's length masked out
        e, f = (x[:, :, :k_.shape[2]] for x in self.projections())
        m = key_mask[:, None, :, None].to(k_.dtype)
        allowed = ((e.abs() @ m).squeeze(-1) > 0)[:, :, None, :]
        return softmax_attention(q, e @ (k_ * m), f @ (v * m), allowed, self.scale)

    monkeypatch.setattr(linformer.LinformerAttention, "attend_sequence", without_empty_rows)
    assert (pair.student(ids, mask) - teacher)[real].abs().max() < 1e-4


def test_hedgehog_transfer_cuts_every_layer_error_tenfold_and_exports(corpus, tmp_path):
    """Stage 1 trains the Hedgehog maps (identity start) so each layer's linear attention mimics softmax.
    The BERT here has initializer_range 0.1: at 0.2 (the other tests' model, near one-hot random attention)
    the softmax-feature map plateaus at ~5x (layer 0) and ~12x (layer 1) whatever the width or steps."""
    from effx.exporter import export_model
    from tests.exporter.ort_helpers import encoder_error

    bert = write_bert(tmp_path / "bert01", corpus["tokenizer"], initializer_range=0.1)
    rep = adapt(f"hf:{bert}", tmp_path / "out", texts=[corpus["text"]], overrides=HEDGEHOG, seq=SEQ, steps=400,
                lr=1e-2, plots=False).report
    errs = rep["layer_attention_mse"]
    for before, after in zip(errs["before"], errs["after"], strict=True):
        assert after <= before / 10, errs
    assert rep["stages"][0]["trains"] == [f"blocks.{i}.attn.hedgehog_{x}" for i in range(2) for x in "kq"]
    assert rep["stages"][1]["steps_done"] == 0  # the maps are stage 1's: no LoRA by default
    assert rep["held_out"]["after"]["embedding_cosine"] > rep["held_out"]["before"]["embedding_cosine"]
    teacher, adapted = import_hf(bert), load_model(tmp_path / "out")
    got, ref = adapted.state_dict(), teacher.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())  # only the maps moved
    ident = build_model(adapted.spec).blocks[0].attn.hedgehog_q
    assert not torch.allclose(got["blocks.0.attn.hedgehog_q"], ident)
    # the adapted model exports like any other (encoder: effx's node taking precomputed features)
    export_model(adapted, tmp_path / "onnx")
    assert encoder_error(tmp_path / "onnx" / "model.onnx", adapted, 2, SEQ, pad_last=5) <= 1e-4


def test_adapted_hedgehog_decoder_exports_as_linear_attention_27(corpus, tmp_path):
    import numpy as np

    from effx.exporter import export_model
    from tests.exporter.ort_helpers import decode_in_ort

    rep = run(corpus, tmp_path / "out", model="llama", overrides=HEDGEHOG, steps=40).report
    assert rep["family"] == "decoder" and rep["stages"][0]["steps_done"] == 40
    assert all(a < b for a, b in zip(rep["layer_attention_mse"]["after"], rep["layer_attention_mse"]["before"],
                                     strict=True))
    adapted = load_model(tmp_path / "out")
    manifest = export_model(adapted, tmp_path / "onnx")  # the default: opset 27, as LinearAttention needs
    assert manifest.opsets[""] == 27
    assert manifest.custom_ops == []
    ids = torch.randint(5, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = adapted(ids).numpy()
    assert np.abs(decode_in_ort(tmp_path / "onnx", manifest, ids.numpy(), 5) - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------------ stage 2
def test_lora_on_a_window_kind_drifts_less_than_the_bare_swap(corpus, tmp_path):
    rep = run(corpus, tmp_path / "out", overrides=LOCAL, steps=150, plots=True).report
    before, after = rep["held_out"]["before"], rep["held_out"]["after"]
    assert rep["stages"][0]["steps_done"] == 0 and rep["stages"][1]["steps_done"] == 150
    assert rep["stages"][1]["rank"] == 8  # on by default: local adds nothing to train
    assert after["embedding_cosine"] > before["embedding_cosine"]
    assert after["token_cosine"] > before["token_cosine"] + 0.01
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000

    # merged: an ordinary folder (no adapter tensors); only q/k/v/o moved, and they reproduce the report
    teacher, adapted = import_hf(corpus["bert"]), load_model(tmp_path / "out")
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(weights) == set(teacher.state_dict())
    for name, value in teacher.state_dict().items():
        moved = not torch.equal(weights[name], value)
        assert moved == any(f"attn.{p}.weight" in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")), name
    ids = held_out_ids(corpus, rep)
    assert embedding_cosine(teacher, adapted, ids) == pytest.approx(after["embedding_cosine"], abs=1e-5)


def test_decoder_lora_brings_the_student_closer_to_the_teacher(corpus, tmp_path):
    rep = run(corpus, tmp_path / "out", model="llama", overrides=LOCAL, steps=100, lora_lr=3e-3).report
    before, after = rep["held_out"]["before"], rep["held_out"]["after"]
    assert rep["family"] == "decoder" and rep["kind"] == "local"
    assert before["teacher_perplexity"] == pytest.approx(after["teacher_perplexity"])
    assert after["kl_from_teacher"] < 0.8 * before["kl_from_teacher"], (before, after)
    assert abs(after["perplexity"] - after["teacher_perplexity"]) < abs(before["perplexity"] - before["teacher_perplexity"])
    # the teacher's perplexity, recomputed from the Hugging Face model itself on the held-out text
    ids = held_out_ids(corpus, rep, family="decoder")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(corpus["llama"])).eval()
    with torch.no_grad():
        loss = hf(input_ids=ids, labels=ids).loss.item()
    assert after["teacher_perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)


# -------------------------------------------------------------------------------------------------- resume
def test_resume_after_an_interruption_reaches_the_same_weights(corpus, tmp_path):
    kw = {"overrides": LINFORMER, "steps": 12, "lora_rank": 4, "lora_steps": 12, "checkpoint_every": 5, "seed": 3}
    straight = run(corpus, tmp_path / "a", **kw).report

    def stop_at(stage, done, total, loss):
        if stage == "lora" and done == 7:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        run(corpus, tmp_path / "b", on_step=stop_at, **kw)
    assert (info.value.stage, info.value.step) == ("lora", 7)
    assert not (tmp_path / "b").exists()  # no half-written output
    state = torch.load(str(tmp_path / "b.checkpoint" / "checkpoint.pt"), weights_only=True)
    assert state["done"] == {"attention_transfer": 12, "lora": 7}  # the interrupted step's own state
    with pytest.raises(OutputPathError, match="--resume"):
        run(corpus, tmp_path / "b", **kw)
    with pytest.raises(SpecError, match="other settings"):
        run(corpus, tmp_path / "b", resume=True, **(kw | {"seed": 4}))
    resumed = run(corpus, tmp_path / "b", resume=True, **kw)
    assert resumed.resumed_from == str(tmp_path / "b.checkpoint" / "checkpoint.pt")
    assert not (tmp_path / "b.checkpoint").exists()
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s["loss"] for s in resumed.report["stages"]] == [s["loss"] for s in straight["stages"]]

    # a finished output continues with more steps (into itself, without --overwrite); at a constant rate that is
    # the longer run itself (the cosine schedule follows the planned steps, so a longer plan has other rates)
    run(corpus, tmp_path / "c", overrides=LINFORMER, steps=6, schedule="constant")
    more = run(corpus, tmp_path / "c", overrides=LINFORMER, steps=12, resume=True, schedule="constant")
    direct = run(corpus, tmp_path / "d", overrides=LINFORMER, steps=12, schedule="constant")
    assert more.resumed_from == str(tmp_path / "c" / "checkpoint.pt")
    c, d = (load_file(str(tmp_path / x / "model.safetensors")) for x in ("c", "d"))
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert more.report["stages"][0]["loss"] == direct.report["stages"][0]["loss"]


# ------------------------------------------------------------------------------------------ model folders
def test_an_imported_swap_adapts_and_a_model_without_provenance_is_refused(corpus, tmp_path):
    import_to_folder(corpus["bert"], tmp_path / "swapped", LINFORMER)
    rep = adapt(tmp_path / "swapped", tmp_path / "out", texts=[corpus["text"]], seq=SEQ, steps=30, lr=1e-2,
                plots=False).report
    assert rep["kind"] == "linformer" and rep["teacher"]["hf"] == str(corpus["bert"].resolve())
    assert all(a < b for a, b in zip(rep["layer_attention_mse"]["after"], rep["layer_attention_mse"]["before"],
                                     strict=True))

    plain = tmp_path / "plain"
    save_model(build_model(import_hf(corpus["bert"]).spec), plain)  # no origin.json
    with pytest.raises(ArtifactError, match="not a swap of anything"):
        adapt(plain, tmp_path / "o2", texts=[corpus["text"]], seq=SEQ)
    import_to_folder(corpus["bert"], tmp_path / "same")  # imported without a swap
    with pytest.raises(SpecError, match="nothing was swapped"):
        adapt(tmp_path / "same", tmp_path / "o3", texts=[corpus["text"]], seq=SEQ)


@pytest.mark.parametrize("case", ["no_text", "empty_text", "missing_text", "no_tokenizer", "nothing_to_adapt",
                                  "no_attention", "decoder_linformer", "seq_too_long", "text_too_short",
                                  "bad_lengths", "decoder_varied"])
def test_bad_input_is_refused_before_training(corpus, tmp_path, case):
    texts, model, overrides, kw = [corpus["text"]], f"hf:{corpus['bert']}", LINFORMER, {}
    if case == "no_text":
        texts, error, match = [], SpecError, "--text"
    elif case == "empty_text":
        (tmp_path / "empty.txt").write_text("  \n\n")
        texts, error, match = [tmp_path / "empty.txt"], SpecError, "no text"
    elif case == "missing_text":
        texts, error, match = [tmp_path / "absent.txt"], ArtifactError, "no such file"
    elif case == "no_tokenizer":
        bare = tmp_path / "bert"
        shutil.copytree(corpus["bert"], bare)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (bare / f).unlink()
        model, error, match = f"hf:{bare}", ArtifactError, "no tokenizer"
    elif case == "nothing_to_adapt":
        overrides, kw, error, match = LOCAL, {"lora_rank": 0}, SpecError, "adds no parameters"
    elif case == "no_attention":
        overrides, error, match = {}, SpecError, "--attention"
    elif case == "decoder_linformer":
        model, overrides, error, match = f"hf:{corpus['llama']}", {"attention.kind": "linformer"}, CompatibilityError, "causal"
    elif case == "seq_too_long":
        kw, error, match = {"seq": 64}, SpecError, "max_seq_len"
    elif case == "bad_lengths":
        kw, error, match = {"lengths": "ragged"}, SpecError, "--lengths 'ragged'"
    elif case == "decoder_varied":
        model, overrides, kw = f"hf:{corpus['llama']}", LOCAL, {"lengths": "varied"}
        error, match = SpecError, "--lengths varied"
    else:
        (tmp_path / "short.txt").write_text("def class return " * 10)
        texts, error, match = [tmp_path / "short.txt"], SpecError, "fewer than two sequences"
    with pytest.raises(error, match=match):
        adapt(model, tmp_path / "out", texts=texts, overrides=overrides, **({"seq": SEQ} | kw))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()


# ------------------------------------------------------------------------------------------ varied lengths
def test_varied_rows_end_in_sep_and_their_losses_ignore_the_padding(corpus):
    """--lengths varied: rows cut to seeded random lengths, [SEP]-ended and padded; both stages' losses on a
    padded row equal the losses on the same row unpadded (the mask reaches every term)."""
    tok = corpus["tokenizer"]
    rows = torch.randint(5, VOCAB, (6, SEQ), generator=torch.Generator().manual_seed(1))
    rows[:, 0] = tok.cls_token_id
    special = {"pad": tok.pad_token_id, "sep": tok.sep_token_id}
    ids, mask = vary_lengths(rows, special, seed=0, stage_no=2, step=3)
    again, _ = vary_lengths(rows, special, seed=0, stage_no=2, step=3)
    other, _ = vary_lengths(rows, special, seed=0, stage_no=2, step=4)
    assert torch.equal(ids, again) and not torch.equal(ids, other)  # a function of (seed, stage, step)
    lengths = mask.sum(1)
    assert lengths.min() >= 8 and lengths.max() <= SEQ and len(set(lengths.tolist())) > 1
    for r, n in enumerate(lengths.tolist()):
        assert ids[r, n - 1] == tok.sep_token_id and (ids[r, n:] == tok.pad_token_id).all()
        assert torch.equal(ids[r, :n - 1], rows[r, :n - 1])

    pair = load_pair(f"hf:{corpus['bert']}", LOCAL)
    r = int(torch.argmin(lengths))  # the shortest row: the most padding
    n = int(lengths[r])
    with torch.no_grad():
        padded = stage2_loss(pair, ids[r:r + 1], mask[r:r + 1]).item()
        alone = stage2_loss(pair, ids[r:r + 1, :n]).item()
        unmasked = stage2_loss(pair, ids[r:r + 1]).item()  # padding read as tokens: a different loss
        padded1 = stage1_loss(pair, ids[r:r + 1], [0, 1], mask[r:r + 1])[0].item()
        alone1 = stage1_loss(pair, ids[r:r + 1, :n], [0, 1])[0].item()
    assert padded > 1e-4 and padded == pytest.approx(alone, rel=1e-4)
    assert abs(unmasked - alone) > 1e-3 * alone
    assert padded1 > 1e-4 and padded1 == pytest.approx(alone1, rel=1e-4)


def test_varied_lengths_training_records_itself_and_brings_short_inputs_closer(corpus, tmp_path):
    """Trained on varied lengths, the student is closer to the teacher on short inputs (sentence-like, where the
    window still cuts) than the bare swap, and than the same LoRA trained on packed rows only."""
    rep = run(corpus, tmp_path / "varied", overrides=LOCAL, lengths="varied", steps=150, lr=1e-4).report
    assert rep["lengths"] == "varied" and rep["stages"][1]["steps_done"] == 150
    run(corpus, tmp_path / "packed", overrides=LOCAL, steps=150, lr=1e-4)
    teacher, bare = import_hf(corpus["bert"]), import_hf(corpus["bert"], LOCAL)
    varied, packed = load_model(tmp_path / "varied"), load_model(tmp_path / "packed")

    def token_cosine(model, ids):
        with torch.no_grad():
            return torch.cosine_similarity(model(ids), teacher(ids), dim=-1).mean().item()

    for n in (8, 16):
        ids = held_out_ids(corpus, rep)[:, :n].clone()
        ids[:, -1] = corpus["tokenizer"].sep_token_id
        assert embedding_cosine(teacher, varied, ids) > embedding_cosine(teacher, bare, ids), n
        assert token_cosine(varied, ids) > token_cosine(bare, ids) + 0.005, n
    ids = held_out_ids(corpus, rep)[:, :8].clone()
    ids[:, -1] = corpus["tokenizer"].sep_token_id
    assert embedding_cosine(teacher, varied, ids) > embedding_cosine(teacher, packed, ids)
