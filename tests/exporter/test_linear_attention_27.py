"""Causal linear attention exports as ONNX LinearAttention (opset 27) where the graph's opset has it: the
features computed around the op, the normaliser as an extra value column, the state as [S, z] at the op's
boundary. Encoders and `--trt-plugins` graphs keep effx's node. Equal to PyTorch (fp32, <= 1e-4) in ONNX
Runtime, prefill and token by token, elu, FAVOR+ and Hedgehog, with grouped KV heads (4 query heads, 2 KV)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from effx.core.flavours import DEFAULT_ATTENTION_OPS
from effx.exporter import export_model
from effx.exporter import onnx_export as ox
from effx.models import build_model
from effx.models.attention import attention_flavours, export_opset
from effx.plugins.linear import (
    linear_attention_recurrence_reference,
    linear_attention_state_reference,
    normalized_state_attention_standard,
)
from tests.exporter.ort_helpers import decode_in_ort, encoder_error
from tests.helpers import decoder_spec, encoder_spec
from tests.oracle import sharpen

TOL = 1e-4
CASES = {
    "elu": {"feature_map": "elu"},
    "favor": {"feature_map": "favor", "nb_features": 24},
    "hedgehog": {"feature_map": "hedgehog", "hedgehog_dim": 12},
}


def learned(model):
    """Hedgehog maps moved off their identity start (as after `effx adapt`), so a swapped or skipped map shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hedgehog" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _ops(path):
    proto = onnx.load(str(path))
    return [n.op_type for n in proto.graph.node], proto


# ------------------------------------------------------------------------------------------ the torch side
def test_recurrence_op_is_onnx_linear_attention():
    """effx::linear_attention_recurrence computes what ONNX Runtime's LinearAttention-27 does (d_k != d_v, GQA,
    a past state, scale not 1)."""
    b, t, h, h_kv, dk, dv = 2, 5, 4, 2, 6, 9
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(b, t, h * dk, generator=g), torch.rand(b, t, h_kv * dk, generator=g)
    v, past = torch.randn(b, t, h_kv * dv, generator=g), torch.randn(b, h_kv, dk, dv, generator=g)
    node = helper.make_node("LinearAttention", ["q", "k", "v", "past"], ["y", "present"], q_num_heads=h,
                            kv_num_heads=h_kv, update_rule="linear", scale=0.7)
    f32 = TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("q", f32, ["B", "T", h * dk]), helper.make_tensor_value_info("k", f32, ["B", "T", h_kv * dk]),
        helper.make_tensor_value_info("v", f32, ["B", "T", h_kv * dv]), helper.make_tensor_value_info("past", f32, ["B", h_kv, dk, dv])],
        [helper.make_tensor_value_info("y", f32, ["B", "T", h * dv]), helper.make_tensor_value_info("present", f32, ["B", h_kv, dk, dv])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)], ir_version=ox.IR_VERSION)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, present = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "past": past.numpy()})
    ref_y, ref_state = linear_attention_recurrence_reference(q, k, v, past, h, h_kv, 0.7)
    assert np.abs(ref_y.numpy() - y).max() < 1e-5 and np.abs(ref_state.numpy() - present).max() < 1e-5


@pytest.mark.parametrize("kind", ["elu", "favor"])
def test_normaliser_as_a_value_column_equals_the_state_op(kind):
    from effx.plugins.linear import favor_projection, feature_map

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    omega = favor_projection(16, 8, g) if kind == "favor" else None
    m = 16 if kind == "favor" else 8
    s0, z0 = torch.rand(2, 2, m, 8, generator=g), torch.rand(2, 2, m, generator=g)
    ref = linear_attention_state_reference(q, k, v, s0, z0, omega, kind, 1e-6)
    got = normalized_state_attention_standard(feature_map(q, omega, kind, True), feature_map(k, omega, kind, False),
                                              v, s0, z0, 1e-6)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kind", list(CASES))
def test_standard_path_in_pytorch_equals_the_effx_op(kind, tokens):
    """What the opset-27 graph traces (standard path) equals the eager model, prompt and decode steps."""
    model = learned(sharpen(build_model(decoder_spec("linear", "state", CASES[kind], n_layers=2))))
    ids = tokens(2, 9)
    with torch.no_grad():
        ref, cache = model.step(ids[:, :6], model.empty_cache(2))
        ref_next, _ = model.step(ids[:, 6:], cache)
        with export_opset(27), attention_flavours(DEFAULT_ATTENTION_OPS | {"linear": "onnx"}):
            got, cache = model.step(ids[:, :6], model.empty_cache(2))
            got_next, _ = model.step(ids[:, 6:], cache)
    assert (got - ref).abs().max() < 1e-5 and (got_next - ref_next).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ exports
@pytest.mark.parametrize("kind", list(CASES))
def test_decoder_exports_linear_attention_27_and_equals_pytorch(kind, tmp_path):
    layers = 2 if kind == "elu" else 1
    model = learned(sharpen(build_model(decoder_spec("linear", "state", CASES[kind], n_layers=layers))))
    manifest = export_model(model, tmp_path / "o", opset=27)
    assert manifest.opsets == {"": 27} and manifest.custom_ops == []
    for graph in ("prefill", "decode"):
        ops, proto = _ops(tmp_path / "o" / f"{graph}.onnx")
        assert ops.count("LinearAttention") == layers and not proto.functions
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
        assert [(o.domain, o.version) for o in proto.opset_import] == [("", 27)]
        for node in (n for n in proto.graph.node if n.op_type == "LinearAttention"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"q_num_heads": 4, "kv_num_heads": 2, "update_rule": b"linear", "scale": 1.0}
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).numpy()
    for prompt in (6, 1):  # a prompt then single tokens; token by token from the first
        got = decode_in_ort(tmp_path / "o", manifest, ids.numpy(), prompt)
        assert np.abs(got - ref).max() <= TOL, prompt


def test_trt_plugin_graphs_and_encoders_keep_the_effx_node(tmp_path):
    model = learned(sharpen(build_model(decoder_spec("linear", "state", CASES["hedgehog"], n_layers=1))))
    manifest = export_model(model, tmp_path / "p", opset=27, trt_plugins=True)
    ops, proto = _ops(tmp_path / "p" / "decode.onnx")
    assert "LinearAttention" not in ops and ops.count("NormalizedLinearAttentionState") == 1
    assert [c.op_type for c in manifest.custom_ops] == ["NormalizedLinearAttentionState"]
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).numpy()
    assert np.abs(decode_in_ort(tmp_path / "p", manifest, ids.numpy(), 5) - ref).max() <= TOL

    enc = learned(sharpen(build_model(encoder_spec("linear", CASES["hedgehog"], n_layers=1))))
    export_model(enc, tmp_path / "e", opset=27)
    ops, proto = _ops(tmp_path / "e" / "model.onnx")
    assert "LinearAttention" not in ops and ops.count("NormalizedLinearAttention") == 1
    assert encoder_error(tmp_path / "e" / "model.onnx", enc, 2, 12, pad_last=3) <= TOL


def test_the_effx_flavour_for_the_linear_site_keeps_the_effx_node(tmp_path):
    model = sharpen(build_model(decoder_spec("linear", "state", CASES["elu"], n_layers=1)))
    manifest = export_model(model, tmp_path / "f", opset=27, attention_ops="linear=effx")
    ops, _ = _ops(tmp_path / "f" / "prefill.onnx")
    assert "LinearAttention" not in ops and ops.count("NormalizedLinearAttentionState") == 1
    assert manifest.attention_ops["linear"] == "effx"


def _range_graph(opset: int) -> onnx.ModelProto:
    i64 = TensorProto.INT64
    graph = helper.make_graph([helper.make_node("Range", ["a", "b", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info(n, i64, []) for n in "abc"],
                              [helper.make_tensor_value_info("y", i64, ["n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ox.IR_VERSION)


def test_raising_the_opset_refuses_ops_that_changed(monkeypatch):
    raised = _range_graph(25)
    ox.raise_opset(raised, 27)  # Range-27 only adds fp16/bf16: the traced int64 Range means the same
    assert raised.opset_import[0].version == 27
    onnx.checker.check_model(raised, full_check=True)
    assert session_from(raised).run(None, {"a": np.array(1), "b": np.array(7), "c": np.array(2)})[0].tolist() == [1, 3, 5]
    monkeypatch.setattr(ox, "UNCHANGED_FOR_TRACED", set())
    with pytest.raises(ox.ExportError, match="Range changed between opset 25 .* and 27; export with --opset 25"):
        ox.raise_opset(_range_graph(25), 27)


def test_a_staged_standard_op_below_its_opset_is_refused():
    from effx.plugins.onnx_body import STAGING_DOMAIN, staged_op

    staged_op("LinearAttention", 27)
    model = _range_graph(23)
    model.graph.node.append(helper.make_node("LinearAttention", ["q", "k", "v"], ["o"], domain=STAGING_DOMAIN))
    with pytest.raises(ox.ExportError, match="LinearAttention is ai.onnx opset 27, the graph's is 23"):
        ox.raise_opset(model, 23)


def session_from(model: onnx.ModelProto):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

