"""Checkpoints that already use efficient attention (Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3): effx
imports each family's per-layer schedule and matches transformers (eager attention), in PyTorch and in
ONNX Runtime, whole sequence and decode loop, with windowed layers cached in window-sized ring buffers.

The models are tiny, random and sharp (q/k scaled up: attention far from uniform), sequences are at least
3x the window, and soft-capping is set low enough to bite, so a window edge, a scale or a cap error shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from effx.core.errors import SpecError  # noqa: E402
from effx.core.manifest import Manifest  # noqa: E402
from effx.core.protocol import DecodeDriver, decode_loop, greedy  # noqa: E402
from effx.exporter import export_model  # noqa: E402
from effx.models.hf_import import import_hf  # noqa: E402
from effx.targets.ort import OrtRunner  # noqa: E402
from tests.helpers import decode_chunks  # noqa: E402

WINDOW = 4
N = 15  # > 3 x WINDOW
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, attn_implementation="eager")
FAMILIES = {
    # name: (config class, model class, config kwargs, what effx should make of it)
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_hidden_layers=2, sliding_window=WINDOW, head_dim=16), "local"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
              "full x1 + local x2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                   head_dim=24), "full x2 + local x1"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(num_hidden_layers=2, sliding_window=WINDOW, pad_token_id=0, eos_token_id=1, bos_token_id=1),
             "local"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=2, sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=24,
                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5), "local x1 + full x1"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=3, sliding_window=WINDOW, head_dim=32, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1_000_000.0}}),
               "local x2 + full x1"),
}


def _sharpen_hf(model, gain: float = 4.0) -> None:
    """Scale q and k (their projections, or the q/k norms that follow them) so attention is far from uniform."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):
                for norm in (attn.q_norm, attn.k_norm):
                    gemma = type(norm).__name__.startswith("Gemma")
                    norm.weight.copy_((norm.weight + 1) * gain - 1 if gemma else norm.weight * gain)
            elif hasattr(attn, "qkv_proj"):  # Phi-3: the q and k rows of the fused projection
                c = model.config
                head_dim = c.hidden_size // c.num_attention_heads
                attn.qkv_proj.weight[:(c.num_attention_heads + c.num_key_value_heads) * head_dim].mul_(gain)
            else:
                attn.q_proj.weight.mul_(gain)
                attn.k_proj.weight.mul_(gain)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random, sharp checkpoint per family, saved as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for name, (config_cls, model_cls, kwargs, _) in FAMILIES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**(COMMON | kwargs))
        model = getattr(transformers, model_cls)(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # norms and biases away from their initial values
                p.add_(torch.randn_like(p) * 0.05)
        _sharpen_hf(model)
        model.save_pretrained(root / name)
        made[name] = (root / name, model)
    return made


def _ids(n: int = N, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_pytorch_reference_matches_transformers_and_decodes_with_the_hybrid_cache(family, checkpoints):
    folder, hf = checkpoints[family]
    model = import_hf(folder)
    assert model.spec.attention_summary() == FAMILIES[family][3]
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
        assert (got - ref).abs().max() <= 1e-4, float((got - ref).abs().max())
        stepped, cache = decode_chunks(model, ids, [5] + [1] * (N - 5))
        assert (stepped - ref).abs().max() <= 1e-4
    for i, layer in enumerate(model.spec.resolved_layers()):  # windowed layers: window-sized ring buffers
        key = cache.layers[i]["key"]
        if layer.attention.kind == "local":
            assert layer.kv_cache.layout == "ring" and key.shape[2] == WINDOW
        else:  # a buffer of max_seq_len slots (the host's capacity), the first N written
            assert layer.kv_cache.layout == "contiguous" and key.shape[2] == model.spec.model.max_seq_len
            written = key.abs().sum(-1).gt(0).all(dim=(0, 1))
            assert written[:N].all() and not written[N:].any()


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for family, (folder, _) in checkpoints.items():
        model = import_hf(folder)
        manifest = export_model(model, root / family)
        out[family] = (root / family, manifest, model)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_matches_transformers_whole_sequence_decode_loop_and_greedy(family, checkpoints, exports):
    _, hf = checkpoints[family]
    folder, manifest, model = exports[family]
    ids = _ids(seed=1)
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    with OrtRunner(folder, manifest) as runner:
        whole = DecodeDriver(manifest, 2, N).prefill(runner.infer, ids.numpy())["logits"]
        assert np.abs(whole - ref).max() <= 1e-4
        stepped = np.concatenate(decode_loop(runner.infer, manifest, ids.numpy(), 4), axis=1)
        assert np.abs(stepped - ref).max() <= 1e-4
        prompt = ids[:, :6]
        tokens = greedy(runner.infer, manifest, prompt.numpy(), 32)
    assert np.array_equal(tokens, _hf_greedy(hf, prompt, 32))


def _hf_greedy(hf, prompt: torch.Tensor, steps: int) -> np.ndarray:
    """Greedy tokens from transformers' whole-sequence (eager) forward, one token at a time. (Its generate()
    goes through its own sliding-window cache, which for Gemma 3 here disagrees with its own forward.)"""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:].numpy()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_window_layers_keep_their_size_however_long_the_decode_runs(family, exports):
    folder, manifest, _ = exports[family]
    plan = manifest.kv_cache
    ids = _ids(n=40, batch=1, seed=2)
    with OrtRunner(folder, manifest) as runner:
        driver = DecodeDriver(manifest, 1, 40)
        driver.prefill(runner.infer, ids[:, :3].numpy())
        sizes = []
        for t in range(3, 40):
            driver.step(runner.infer, ids[:, t:t + 1].numpy())
            # slots and written slots (a row of zeros was never written) per layer
            sizes.append({name: (arr.shape[2], int((np.abs(arr[0, 0]).sum(-1) > 0).sum()))
                          for name, arr in driver.cache.items() if name.endswith(".key")})
    for layer in plan.layers:
        series = [s[f"past.{layer.index}.key"] for s in sizes]
        if layer.layout == "ring":  # W slots, all written once the decode passes W tokens
            assert {n for n, _ in series} == {WINDOW} and layer.params["window"] == WINDOW
            assert series[-1][1] == WINDOW
        else:  # the host's buffer of 40 slots; the cached tokens grow by one per step
            assert {n for n, _ in series} == {40} and [w for _, w in series] == list(range(4, 41)) and layer.grows
    assert plan.layout == ("ring" if family == "mistral" else "hybrid")


def test_paged_global_layers_with_ring_local_layers(checkpoints, tmp_path):
    """Gemma 3 with its global layers paged: one block table for them, rings for the local layers."""
    folder, hf = checkpoints["gemma3"]
    model = import_hf(folder, {"kv_cache.layout": "paged", "kv_cache.block_size": 4, "kv_cache.num_blocks": 40})
    assert [layer.kv_cache.layout for layer in model.spec.resolved_layers()] == ["ring", "ring", "paged"]
    manifest = export_model(model, tmp_path / "onnx")
    assert manifest.kv_cache.paged and {c.name for c in manifest.kv_cache.controls} >= {"block_table", "new_lengths"}
    prefill_inputs = [t.name for t in manifest.graphs["prefill"].inputs]
    assert {"past.2.key_pool", "past.0.key"} <= set(prefill_inputs)  # pools and rings: the host's buffers
    ids = _ids(seed=3)
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    with OrtRunner(tmp_path / "onnx", manifest) as runner:
        got = np.concatenate(decode_loop(runner.infer, manifest, ids.numpy(), 5), axis=1)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("family,edit,key", [
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "rope_scaling.rope_type"),
    ("mistral", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_scaling.rope_type"),
    ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
])
def test_an_option_effx_lacks_is_one_line_naming_the_key(family, edit, key, checkpoints, tmp_path):
    folder = tmp_path / family
    shutil.copytree(checkpoints[family][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    if "rope_scaling" in edit or "partial_rotary_factor" in edit:
        config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=key.replace(".", r"\.")) as err:
        import_hf(folder)
    assert "\n" not in str(err.value)


def test_a_gemma3_checkpoint_imports_its_text_model(checkpoints, tmp_path):
    """A multimodal `gemma3` folder: the text_config and the language model's weights."""
    folder, hf = checkpoints["gemma3"]
    text = json.loads((folder / "config.json").read_text())
    multi = tmp_path / "gemma3-mm"
    multi.mkdir()
    (multi / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                   "tie_word_embeddings": True}))
    from safetensors.torch import load_file, save_file

    weights = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in
               load_file(str(folder / "model.safetensors")).items()}
    save_file(weights, str(multi / "model.safetensors"))
    ids = _ids(seed=4)
    with torch.no_grad():
        assert (import_hf(multi)(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_manifest_cache_plan_names_every_layer(exports):
    _, manifest, model = exports["qwen2"]
    plan = manifest.kv_cache
    assert plan.layout == "hybrid" and [x.layout for x in plan.layers] == ["contiguous", "ring", "ring"]
    assert [x.kind for x in plan.layers] == ["full", "local", "local"] and plan.grows
    assert all(t in {c.input for c in plan.tensors} for x in plan.layers for t in x.tensors)
    assert any("ring layers" in step for step in plan.protocol)
    again = Manifest.model_validate_json(json.dumps(manifest.model_dump(mode="json")))
    assert again.kv_cache == plan


def test_import_records_the_native_attention_so_validate_shows_no_drift(checkpoints, tmp_path):
    model = import_hf(checkpoints["mistral"][0])
    assert model.origin["attention"] == "local"
    swapped = import_hf(checkpoints["mistral"][0], {"attention.kind": "full"})
    assert swapped.origin["attention"] == "local" and swapped.spec.attention_summary() == "full"
    assert Path(swapped.origin["hf"]).is_dir()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_configs_without_layer_types_take_the_schedule_from_max_window_layers(family, checkpoints, tmp_path):
    """Configs written before transformers derived `layer_types` (and hand-written ones) carry only
    use_sliding_window + max_window_layers: layer i slides when i >= max_window_layers, as transformers reads it."""
    folder, hf = checkpoints[family]
    old = tmp_path / family
    shutil.copytree(folder, old)
    config = json.loads((old / "config.json").read_text())
    config.pop("layer_types", None)
    (old / "config.json").write_text(json.dumps(config))
    model = import_hf(old)
    first = hf.config.max_window_layers
    expected = ["full" if i < first else "local" for i in range(hf.config.num_hidden_layers)]
    assert [layer.attention.kind for layer in model.spec.resolved_layers()] == expected
    assert model.spec.attention_summary() == FAMILIES[family][3]
    ids = _ids()
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
