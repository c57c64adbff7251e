"""Hugging Face import: tiny random HF models saved locally load into effx and match transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effx.core.errors import ArtifactError, SpecError
from effx.models.hf_import import hf_spec, import_hf, load_mapped
from tests.helpers import decode_chunks

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 100


def _save(model, folder, bin_format=False, **kw):
    model.save_pretrained(str(folder), **kw)
    if bin_format:  # the legacy pytorch_model.bin (transformers 5 writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _hf(cfg_cls, model_cls, seed=0, **cfg):
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**cfg)).eval()


def _bert(**kw):
    return _hf(transformers.BertConfig, transformers.BertModel, vocab_size=VOCAB, hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, **kw)


def _ids(batch, n, low=3, seed=0):
    # low >= 3 keeps pad/bos/eos ids (RoBERTa's position ids depend on the pad token) out of the tokens
    return torch.randint(low, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    hf = _bert()
    return hf, _save(hf, tmp_path_factory.mktemp("bert"))


# ----------------------------------------------------------------------------------------------- encoders
def test_bert_matches_transformers_with_padding(bert_dir):
    hf, folder = bert_dir
    model = import_hf(folder)
    assert model.spec.model.family == "encoder" and model.spec.kv_cache.layout == "none"
    ids = _ids(3, 13)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model(ids, mask)
    assert got.shape == ref.shape
    assert (got - ref)[mask.bool()].abs().max().item() <= TOL  # real tokens
    assert (got - ref).abs().max().item() <= TOL  # padded rows too (they read the same real keys)


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_roberta_and_distilbert_match_transformers(arch, tmp_path):
    if arch == "roberta":
        hf = _hf(transformers.RobertaConfig, transformers.RobertaModel, vocab_size=VOCAB, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=66)
    else:
        hf = _hf(transformers.DistilBertConfig, transformers.DistilBertModel, vocab_size=VOCAB, dim=32, n_layers=2,
                 n_heads=4, hidden_dim=64, max_position_embeddings=64)
    # the RoBERTa case is saved as pytorch_model.bin (torch.load(weights_only=True) path)
    folder = _save(hf, tmp_path, bin_format=arch == "roberta")
    if arch == "roberta":
        assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    model = import_hf(folder)
    assert model.spec.model.max_seq_len == 64  # RoBERTa: 66 positions minus padding_idx + 1
    ids = _ids(2, 11)
    ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert (model(ids) - ref).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------- decoders
def _decode(model, ids, chunks):
    return decode_chunks(model, ids, chunks)[0]


def _llama(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0) | kw
    return _hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, **cfg)


DECODERS = {
    "gpt2": lambda: _hf(transformers.GPT2Config, transformers.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2,
                        n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama-gqa-llama3": lambda: _llama(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama-linear-tied": lambda: _llama(num_key_value_heads=1, tie_word_embeddings=True,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_logits_and_decoding_match_transformers(name, tmp_path):
    hf = DECODERS[name]()
    model = import_hf(_save(hf, tmp_path))
    m = model.spec.model
    assert m.family == "decoder" and model.spec.kv_cache.layout == "contiguous"
    if name.startswith("llama"):
        assert m.rope_scaling is not None and m.rope_scaling.type == ("llama3" if "llama3" in name else "linear")
        assert m.kv_heads == hf.config.num_key_value_heads
    ids = _ids(2, 19)
    ref = hf(input_ids=ids).logits
    full = model(ids)
    assert (full - ref).abs().max().item() <= TOL
    # prompt then token-by-token decoding through the contiguous KV cache
    assert (_decode(model, ids, [7] + [1] * 12) - ref).abs().max().item() <= TOL


def test_sharded_checkpoint_loads(tmp_path):
    hf = DECODERS["gpt2"]()
    folder = _save(hf, tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    ids = _ids(1, 9)
    assert (import_hf(folder)(ids) - hf(input_ids=ids).logits).abs().max().item() <= TOL


# -------------------------------------------------------------------------------------------------- ONNX
def test_imported_llama_exports_and_decodes_in_onnx_runtime(tmp_path):
    from effx.exporter import export_model
    from tests.exporter.ort_helpers import decode_in_ort

    hf = DECODERS["llama-gqa-llama3"]()
    model = import_hf(_save(hf, tmp_path / "hf"), {"model.max_seq_len": 32})
    manifest = export_model(model, tmp_path / "onnx")
    ids = _ids(2, 11)
    ref = hf(input_ids=ids).logits.numpy()
    got = decode_in_ort(tmp_path / "onnx", manifest, ids.numpy(), prompt=5)
    assert np.abs(got - ref).max() <= TOL


# ---------------------------------------------------------------------------------------- errors, swaps
def test_unsupported_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(SpecError) as exc:
        import_hf(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "'t5' is not supported" in msg and str(tmp_path / "config.json") in msg
    assert msg.endswith("effx imports bert, roberta, distilbert, gpt2, llama, mistral, qwen2, qwen3, phi3, gemma2, "
                        "gemma3_text, gemma3")


def test_missing_folder_config_and_weights_name_the_file(tmp_path, bert_dir):
    with pytest.raises(ArtifactError, match="no such folder"):
        import_hf(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="config.json: not found"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text((bert_dir[1] / "config.json").read_text())
    with pytest.raises(ArtifactError, match="no weights found") as exc:
        import_hf(tmp_path)
    assert "\n" not in str(exc.value)


def test_architecture_fields_cannot_be_overridden(bert_dir):
    config = json.loads((bert_dir[1] / "config.json").read_text())
    with pytest.raises(SpecError, match="model.d_model comes from"):
        hf_spec(config, {"model.d_model": 64})
    assert hf_spec(config, {"model.max_seq_len": 16}).model.max_seq_len == 16
    with pytest.raises(SpecError, match="exceeds the 64 learned positions"):
        hf_spec(config, {"model.max_seq_len": 128})


def test_linformer_swap_on_bert_loads_known_weights_and_keeps_effx_init(bert_dir):
    hf, folder = bert_dir
    base = import_hf(folder)
    swapped = import_hf(folder, {"attention.kind": "linformer", "attention.k": 8})
    assert swapped.spec.attention.kind == "linformer" and swapped.spec.attention.k == 8
    base_sd, swapped_sd = base.state_dict(), swapped.state_dict()
    new = sorted(set(swapped_sd) - set(base_sd))
    assert new == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("e", "f")]
    for k, v in base_sd.items():  # every HF weight carried over
        assert torch.equal(v, swapped_sd[k]), k
    ids = _ids(2, 12)
    ref = hf(input_ids=ids).last_hidden_state
    out = swapped(ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max().item() > 1e-2  # different attention, not fine-tuned


def test_swapped_decoder_gets_a_compatible_cache_and_favor_features(tmp_path):
    folder = _save(DECODERS["llama-linear-tied"](), tmp_path)
    model = import_hf(folder, {"attention.kind": "linear", "attention.feature_map": "favor", "attention.nb_features": 8})
    assert model.spec.kv_cache.layout == "state"
    ids = _ids(1, 9)
    assert (_decode(model, ids, [4] + [1] * 5) - model(ids)).abs().max().item() <= 1e-4
    with pytest.raises(SpecError, match="attention.kind=linformer with model.family=decoder"):
        import_hf(folder, {"attention.kind": "linformer"})


def test_missing_key_check_only_allows_new_attention_parameters(bert_dir):
    model = import_hf(bert_dir[1], {"attention.kind": "linformer", "attention.k": 8})
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".attn.e") and not k.endswith(".attn.f")}
    load_mapped(model, state)  # E/F missing: fine
    with pytest.raises(ArtifactError, match=r"missing blocks\.0\.mlp\.up\.weight"):
        load_mapped(model, {k: v for k, v in state.items() if k != "blocks.0.mlp.up.weight"})
    with pytest.raises(ArtifactError, match="unexpected extra.weight"):
        load_mapped(model, state | {"extra.weight": torch.zeros(1)})
    full = import_hf(bert_dir[1])
    with pytest.raises(ArtifactError, match="weights do not fit"):
        load_mapped(full, {k: v for k, v in full.state_dict().items() if k != "norm1.weight"} | {"x": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_import_and_run_with_swapped_attention_report_drift(bert_dir, tmp_path, capsys, monkeypatch):
    from effx.check.report import ValidationReport
    from tests.cli.test_cli import run_cli

    hf, folder = bert_dir
    code, out, err = run_cli(["import", str(folder), "-o", str(tmp_path / "m")], capsys, monkeypatch)
    assert code == 0, err
    assert "bert -> effx encoder" in out and json.loads((tmp_path / "m" / "origin.json").read_text())["model_type"] == "bert"
    code, _, err = run_cli(["import", str(tmp_path / "nothing"), "-o", str(tmp_path / "m2")], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "m2").exists()

    # the main job on the imported model, attention swapped: passes against the swapped model, reports drift
    code, out, err = run_cli(["run", "--model", f"hf:{folder}", "--attention", "linformer", "--linformer-k", "8",
                              "-o", str(tmp_path / "run"), "--seq", "12"], capsys, monkeypatch)
    assert code == 0, err
    report = ValidationReport.model_validate_json((tmp_path / "run" / "report" / "report.json").read_text())
    assert report.passed and report.attention == "linformer" and report.reference["source"].endswith("model")
    (drift,) = report.drift
    assert drift.max_abs > 1e-3 and not drift.passed  # swapped attention moves away from the original
    assert "fine-tun" in (tmp_path / "run" / "report" / "report.md").read_text()
