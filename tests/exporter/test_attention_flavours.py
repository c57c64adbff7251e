"""Op flavours: the standard ONNX `Attention` (opset 25: sliding windows, soft-capping) where the flavour picks it,
effx's nodes elsewhere; each export equals the PyTorch reference (fp32, <= 1e-4) on what effx compares."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from effx.core.errors import SpecError
from effx.core.flavours import DEFAULT_ATTENTION_OPS, SITES, opset_for, parse_attention_ops, resolve_attention_ops
from effx.core.options import DEFAULT_OPSET, MAX_OPSET, ExportOptions
from effx.exporter import export_model
from effx.exporter.export import attention_sites
from effx.models import build_model
from effx.plugins.standard import onnx_attention_reference
from effx.targets.profiles import TARGETS, get_target
from tests.exporter.ort_helpers import decode_in_ort, session
from tests.helpers import decoder_spec, encoder_spec
from tests.oracle import sharpen

TOL = 1e-4
SOFTCAP = 5.0  # sharpened scores reach well past 5: a dropped or misplaced cap moves the outputs


def _attention_nodes(path):
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    effx_ops = [n.op_type for n in model.graph.node if n.domain == "effx"]
    return attrs, effx_ops, model


def _windows_and_full(choice):
    """The sites this file covers (other sites, e.g. linear, have their own tests)."""
    return {site: choice[site] for site in ("full", "local", "local-step")}


def _export(tmp_path, spec, **kw):
    model = sharpen(build_model(spec))  # sharp attention: a window or scale error shows
    return model, export_model(model, tmp_path / "onnx", **kw), tmp_path / "onnx"


# -- the mechanism ------------------------------------------------------------------------------------------
def test_without_opset_the_export_takes_what_the_chosen_standard_ops_need():
    """No --opset: 23, raised to 25 for a chosen Attention-25 (windows, soft-capping) and to 27 for LinearAttention,
    only for the sites the model has; --trt-plugins graphs keep effx nodes, so they raise nothing for them."""
    def needs(spec, ops=None, trt=False):
        model = build_model(spec)
        return opset_for(resolve_attention_ops(DEFAULT_ATTENTION_OPS, ops), attention_sites(model),
                         bool(spec.model.attn_softcap), trt, DEFAULT_OPSET, MAX_OPSET)

    linear = {"feature_map": "elu"}
    assert needs(decoder_spec("full", "contiguous")) == 23
    assert needs(decoder_spec("linear", "state", linear)) == 27
    assert needs(encoder_spec("linear", linear)) == 23  # encoders keep the effx node
    assert needs(decoder_spec("linear", "state", linear), "linear=effx") == 23
    assert needs(decoder_spec("linear", "state", linear), trt=True) == 23
    assert needs(decoder_spec("full", "contiguous", attn_softcap=SOFTCAP)) == 25
    assert needs(decoder_spec("full", "contiguous", attn_softcap=SOFTCAP), "full=effx") == 23
    local = {"window": 4}
    assert needs(encoder_spec("local", local)) == 23  # cpu: local=effx (measured)
    assert needs(encoder_spec("local", local), "local=onnx") == 25


def test_flavour_option_is_validated_with_one_line_errors():
    assert ExportOptions.parse({"attention_ops": " local = onnx ,full=effx"}).attention_ops == "full=effx,local=onnx"
    for bad, culprit in [("local=fast", "'local=fast'"), ("sparse=onnx", "'sparse=onnx'"), ("local", "'local'"),
                         ("local=onnx,local=effx", "local is given twice")]:
        with pytest.raises(SpecError, match=culprit) as err:
            ExportOptions.parse({"attention_ops": bad})
        assert "\n" not in str(err.value) and "--attention-ops" in str(err.value)


def test_every_target_chooses_a_flavour_for_every_site_and_cpu_is_the_export_default():
    for profile in TARGETS.values():
        assert set(profile.attention_ops()) == set(SITES), profile.name
    cpu = get_target("cpu")
    assert cpu.attention_ops() == DEFAULT_ATTENTION_OPS and cpu.op_flavours_source  # measured, source recorded
    assert "op_flavours" not in cpu.row()["unverified"] and "op_flavours" in get_target("t4").row()["unverified"]
    assert cpu.attention_ops("local=onnx") == DEFAULT_ATTENTION_OPS | {"local": "onnx"}
    with pytest.raises(SpecError, match="leaves out local-step"):
        resolve_attention_ops(parse_attention_ops("full=onnx,local=effx"))


def test_onnx_attention_op_is_onnx_runtime_attention_25():
    """The torch op the models export through computes what ONNX Runtime's Attention-25 node computes: windows,
    causal flag, soft-capping, GQA and a ZERO row where a query has no allowed key."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) * 2 for s in ((2, 4, 9, 8), (2, 2, 9, 8), (2, 2, 9, 8)))
    mask = np.ones((2, 1, 1, 9), bool)
    mask[1, ..., 3:] = False  # row 1: keys 3.. are padding
    for causal, left, right, softcap in [(0, 1, 1, 0.0), (1, 2, 0, 3.0), (0, -1, -1, 3.0), (1, -1, -1, 0.0)]:
        attrs = {"scale": 0.3, "is_causal": causal, "softcap": softcap} | \
            ({"left_window_size": left, "right_window_size": right} if left >= 0 else {})
        node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], **attrs)
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in zip("qkv", (q, k, v), strict=True)]
        inputs.append(helper.make_tensor_value_info("m", TensorProto.BOOL, mask.shape))
        graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=10)
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"q": q, "k": k, "v": v, "m": mask})[0]
        ref = onnx_attention_reference(*map(torch.from_numpy, (q, k, v, mask)), bool(causal), left, right, 0.3,
                                       softcap).numpy()
        assert np.abs(got - ref).max() <= 1e-5, attrs
        if (causal, left) == (0, 1):  # queries 4.. of row 1 see keys i-1..i+1, all padding: zero rows in both
            assert np.all(got[1, :, 4:] == 0) and np.all(ref[1, :, 4:] == 0) and np.all(np.abs(got[1, :, :4]).sum(-1) > 0)


# -- sliding windows and soft-capping as Attention-25 ---------------------------------------------------------
def test_local_encoder_as_attention_25_matches_pytorch_on_real_tokens(tmp_path):
    window = 3
    spec = encoder_spec("local", {"window": window}, n_layers=2, attn_softcap=SOFTCAP)  # encoders: no GQA
    model, manifest, out = _export(tmp_path, spec, opset=25, attention_ops="local=onnx")
    attrs, effx_ops, proto = _attention_nodes(out / "model.onnx")
    assert effx_ops == [] and _windows_and_full(manifest.attention_ops) == {"full": "onnx", "local": "onnx", "local-step": "onnx"}
    assert [(a["left_window_size"], a["right_window_size"], a["is_causal"], a["softcap"]) for a in attrs] == \
        [(window - 1, window - 1, 0, SOFTCAP)] * 2
    ids = torch.randint(0, spec.model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 20, dtype=torch.int64)
    mask[1, 14:] = 0  # 6 padded tokens > window: queries 17.. have no real key in their window
    mask[2, 19:] = 0
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = session(out / "model.onnx").run(None, feed)[0]
    real = mask.numpy().astype(bool)
    assert np.abs(got - ref)[real].max() <= TOL  # what effx validate compares: real tokens only
    # sharp enough to bite: a 1% scale error in the exported windows shows
    for node in proto.graph.node:
        for a in node.attribute:
            if node.op_type == "Attention" and a.name == "scale":
                a.f *= 1.01
    wrong = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(wrong - ref)[real].max() > 10 * TOL


@pytest.mark.parametrize("layout", ["ring", "contiguous"])
def test_local_decoder_prefill_and_steps_as_attention_25_match_pytorch(layout, tmp_path):
    window = 4
    spec = decoder_spec("local", layout, {"window": window}, n_layers=2, attn_softcap=SOFTCAP)  # GQA 4:2
    model, manifest, out = _export(tmp_path, spec, opset=25, attention_ops="local=onnx,local-step=onnx")
    assert _windows_and_full(manifest.attention_ops) == {"full": "onnx", "local": "onnx", "local-step": "onnx"}
    prefill, effx_prefill, _ = _attention_nodes(out / "prefill.onnx")
    decode, effx_decode, _ = _attention_nodes(out / "decode.onnx")
    assert effx_prefill == effx_decode == []
    assert [(a["left_window_size"], a["right_window_size"], a["is_causal"], a["softcap"]) for a in prefill] == \
        [(window - 1, 0, 1, SOFTCAP)] * 2
    assert [a["softcap"] for a in decode] == [SOFTCAP] * 2 and all("left_window_size" not in a for a in decode)
    ids = torch.randint(0, spec.model.vocab_size, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).numpy()
    for prompt in (9, 2):  # a prompt longer than the window, then steps; a short one, then many steps
        assert np.abs(decode_in_ort(out, manifest, ids.numpy(), prompt) - ref).max() <= TOL, prompt


@pytest.mark.parametrize("opset", [25, 23])
def test_soft_capped_full_attention_matches_pytorch(opset, tmp_path):
    """Opset 25: Attention-25's softcap in prefill and steps; opset 23 (no softcap there): the decomposed math."""
    spec = decoder_spec("full", "contiguous", n_layers=2, attn_softcap=SOFTCAP)
    model, manifest, out = _export(tmp_path, spec, opset=opset)
    for graph in ("prefill.onnx", "decode.onnx"):
        attrs, effx_ops, proto = _attention_nodes(out / graph)
        assert effx_ops == []
        if opset == 25:
            assert [a["softcap"] for a in attrs] == [SOFTCAP] * 2
        else:
            assert attrs == [] and any(n.op_type == "Tanh" for n in proto.graph.node)
    assert manifest.attention_ops["full"] == ("onnx" if opset == 25 else "effx")
    ids = torch.randint(0, spec.model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(ids).numpy()
    assert np.abs(decode_in_ort(out, manifest, ids.numpy(), 6) - ref).max() <= TOL


def test_soft_capped_full_encoder_with_padding_matches_pytorch(tmp_path):
    spec = encoder_spec("full", n_layers=2, attn_softcap=SOFTCAP)
    model, manifest, out = _export(tmp_path, spec, opset=25)
    attrs, effx_ops, _ = _attention_nodes(out / "model.onnx")
    assert effx_ops == [] and [(a["softcap"], a["is_causal"]) for a in attrs] == [(SOFTCAP, 0)] * 2
    ids = torch.randint(0, spec.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = session(out / "model.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - ref)[mask.numpy().astype(bool)].max() <= TOL


# -- where the effx node stays ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [{"trt_plugins": True, "opset": 25, "attention_ops": "local=onnx"},
                                  {"opset": 23, "attention_ops": "local=onnx"},
                                  {"opset": 25}], ids=["trt-plugins", "opset-23", "cpu-default"])
def test_local_attention_stays_an_effx_node(case, tmp_path):
    """--trt-plugins graphs, opsets below 25 and the cpu target's measured choice (local=effx) keep
    effx::LocalAttention; no Attention node carries a window."""
    spec = encoder_spec("local", {"window": 3}, n_layers=2)
    model, manifest, out = _export(tmp_path, spec, **case)
    attrs, effx_ops, _ = _attention_nodes(out / "model.onnx")
    assert effx_ops == ["LocalAttention"] * 2 and attrs == []
    assert manifest.attention_ops["local"] == "effx"  # what the graph holds, not what was asked
    ids = torch.randint(0, spec.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = session(out / "model.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - ref).max() <= TOL


def test_run_takes_the_flavour_and_validate_compares_real_tokens(tmp_path):
    """`effx run --target cpu --opset 25 --attention-ops local=onnx`: the manifest records the sites (the others
    from the cpu profile), and validation (whose padded row has queries with no real key in their window:
    zero rows in Attention-25, the mean of the values in PyTorch) passes, since it compares real tokens."""
    from effx.core.manifest import Manifest
    from effx.core.options import BuildOptions
    from effx.core.spec import RunSpec
    from effx.pipeline import run_pipeline

    spec = RunSpec.parse({"model": {"family": "encoder", "n_layers": 2, "max_seq_len": 32, "attn_softcap": SOFTCAP},
                          "attention": {"kind": "local", "window": 2}})
    result = run_pipeline(spec, tmp_path / "run", export=ExportOptions.parse({"opset": 25, "attention_ops": "local=onnx"}),
                          build=BuildOptions(target="cpu"), batch=2, seq=16, model=sharpen(build_model(spec)))
    assert result.passed and result.report.passed
    manifest = Manifest.read(tmp_path / "run" / "onnx")
    assert _windows_and_full(manifest.attention_ops) == _windows_and_full(get_target("cpu").attention_ops() | {"local": "onnx"})
    attrs, effx_ops, _ = _attention_nodes(tmp_path / "run" / "onnx" / "model.onnx")
    assert effx_ops == [] and [a["left_window_size"] for a in attrs] == [1, 1]
