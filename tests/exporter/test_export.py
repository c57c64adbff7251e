"""Export -> onnx.checker (full) -> ONNX Runtime CPU equals PyTorch (fp32, <= 1e-4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from effx.core.manifest import Manifest, sha256_file
from effx.core.protocol import decode_loop
from effx.exporter import export_model
from effx.models import build_model
from effx.targets.ort import OrtRunner
from tests.exporter.ort_helpers import decode_in_ort, empty_cache_feed, encoder_error, runtimes_agree, session
from tests.helpers import DECODER_CASES, ENCODER_CASES, case_id, decoder_spec, encoder_spec
from tests.oracle import sharpen

TOL = 1e-4
_EXPORTS: dict = {}


def exported(tmp_path_factory, key, spec, **kw):
    """Export once per spec for the whole session (exports are the slow part)."""
    if key not in _EXPORTS:
        model = sharpen(build_model(spec))  # sharp attention: an ONNX body's mask or scale error shows
        out = tmp_path_factory.mktemp("onnx") / "out"
        _EXPORTS[key] = (model, out, export_model(model, out, **kw))
    return _EXPORTS[key]


def _effx_nodes(path):
    m = onnx.load(str(path))
    return [n for n in m.graph.node if n.domain == "effx"], m


@pytest.mark.parametrize("case", ENCODER_CASES, ids=case_id)
def test_encoder_matches_pytorch(case, tmp_path_factory):
    kind, attention = case
    layers = 3 if kind == "hierarchical" else 2
    spec = encoder_spec(kind, attention, n_layers=layers)
    model, out, manifest = exported(tmp_path_factory, ("enc", case_id(case)), spec)
    path = out / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    nodes, proto = _effx_nodes(path)
    expected = {"full": None, "linformer": "LinformerAttention", "local": "LocalAttention",
                "block_sparse": "BlockSparseAttention", "linear": "NormalizedLinearAttention",
                "hierarchical": None}[kind]
    if expected is None:
        assert nodes == [] and [n.op_type for n in proto.graph.node].count("Attention") == layers
    else:
        assert [n.op_type for n in nodes] == [expected] * layers  # one per layer
        assert [f.name for f in proto.functions] == [expected] and proto.functions[0].domain == "effx"
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["effx.dim.sequence"] == f"min=1 opt={min(128, spec.model.max_seq_len)} max={spec.model.max_seq_len}"
    assert manifest.graphs["model"].dims["sequence"].max == spec.model.max_seq_len
    for batch, n in [(1, 9), (3, 20)]:
        assert encoder_error(path, model, batch, n, pad_last=3) <= TOL, (batch, n)
    # a second ONNX runtime (onnx's reference evaluator) computes the same from the same file
    ids = np.random.default_rng(1).integers(0, spec.model.vocab_size, (2, 13))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    assert runtimes_agree(out, manifest, ids, mask=mask) <= TOL


@pytest.mark.parametrize("case", DECODER_CASES, ids=case_id)
def test_decoder_prefill_then_decode_matches_pytorch(case, tmp_path_factory):
    kind, layout, attention, cache = case
    layers = 3 if kind == "hierarchical" else 2
    spec = decoder_spec(kind, layout, attention, cache, n_layers=layers)
    model, out, manifest = exported(tmp_path_factory, ("dec", case_id(case)), spec)
    # an hourglass also exports decode_fine: a step of one token that completes no group
    assert set(manifest.graphs) == {"prefill", "decode"} | ({"decode_fine"} if kind == "hierarchical" else set())
    for g in manifest.graphs.values():
        onnx.checker.check_model(str(out / g.file), full_check=True)
    nodes, _ = _effx_nodes(out / "prefill.onnx")
    if kind == "hierarchical":  # hourglass levels are ordinary layers over shortened sequences: no custom op
        assert nodes == []
    elif kind == "linear":  # the cpu flavour: ONNX LinearAttention-27 (the export takes opset 27 for it)
        standard = [n for n in onnx.load(str(out / "prefill.onnx")).graph.node if n.op_type == "LinearAttention"]
        assert nodes == [] and len(standard) == layers and manifest.opsets[""] == 27
    elif kind != "full" or layout == "paged":
        assert len(nodes) == layers and len({n.op_type for n in nodes}) == 1
    batch, n = 2, 11
    ids = torch.randint(0, spec.model.vocab_size, (batch, n), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).numpy()
    block_table = None
    if layout == "paged":
        block_table = model.empty_cache(batch).reserve(n).block_table.numpy()
    for prompt in (5, 2):
        got = decode_in_ort(out, manifest, ids.numpy(), prompt, block_table)
        assert np.abs(got - ref).max() <= TOL, prompt
    assert runtimes_agree(out, manifest, ids[:, :8].numpy(), prompt=5) <= TOL  # prefill and decode graphs
    if kind == "hierarchical":  # the host protocol ran decode_fine exactly where no group completes
        used = []
        with OrtRunner(out, manifest, threads=1) as runner:
            decode_loop(lambda feed, graph: used.append(graph) or runner.infer(feed, graph), manifest, ids.numpy(), 5)
        k = manifest.kv_cache.params["first_ratio"]
        assert used == ["prefill"] + ["decode" if p % k == 0 else "decode_fine" for p in range(5, n)]
    # the decode graph also takes an empty cache (past length 0)
    decode = session(out / "decode.onnx")
    feed = {"input_ids": ids[:, :4].numpy(), "past_lengths": np.zeros(batch, np.int64)} | empty_cache_feed(manifest, batch)
    if layout == "paged":
        feed |= {"new_lengths": np.full(batch, 4, np.int64), "block_table": block_table}
    assert np.abs(decode.run(None, feed)[0] - ref[:, :4]).max() <= TOL


def test_manifest_describes_the_files(tmp_path_factory):
    spec = decoder_spec("local", "ring", {"window": 5}, n_layers=2)
    _, out, manifest = exported(tmp_path_factory, ("dec", "local-ring-window5"), spec)
    again = Manifest.read(out)
    assert again == manifest and again.stage == "onnx" and again.kv_cache.layout == "ring"
    assert set(again.files) == {"prefill.onnx", "decode.onnx"}
    for name, entry in again.files.items():
        assert sha256_file(out / name) == entry.sha256
    decode = onnx.load(str(out / "decode.onnx"))
    assert [i.name for i in decode.graph.input] == [t.name for t in again.graphs["decode"].inputs]
    assert {t.input for t in again.kv_cache.tensors} <= {i.name for i in decode.graph.input}
    assert again.kv_cache.tensors[0].shape == ["batch", 2, "ring_0", 16] and not again.kv_cache.grows
    assert again.kv_cache.layers[0].params["window"] == 5 and again.graphs["decode"].dims["ring_0"].min == 5
    # the prefill's whole sequences take the effx node (banded for long ones); the decode steps over the ring
    # take the standard ONNX Attention with the window as a mask
    assert again.custom_ops[0].op_type == "LocalAttention" and again.custom_ops[0].count == 2
    assert [n.op_type for n in decode.graph.node].count("Attention") == 2


def test_full_attention_below_opset_23_is_decomposed_with_q_prescaled(tmp_path):
    model = build_model(encoder_spec("full", n_layers=1))
    export_model(model, tmp_path / "o", opset=20)
    proto = onnx.load(str(tmp_path / "o" / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert "Attention" not in ops and "Softmax" in ops
    producers = {o: n for n in proto.graph.node for o in n.output}
    node = next(n for n in proto.graph.node if n.op_type == "Softmax")
    while node.op_type != "MatMul":  # walk back from the softmax through the mask (Where's scores input) to Q K^T
        node = producers[node.input[2] if node.op_type == "Where" else node.input[0]]
    assert any(producers[i].op_type == "Mul" for i in node.input if i in producers)  # Q * scale feeds Q K^T
    assert encoder_error(tmp_path / "o" / "model.onnx", model, 2, 12) <= TOL


def test_inline_variant_has_no_custom_domain(tmp_path):
    model = build_model(encoder_spec("linformer", {"k": 8}, n_layers=2))
    manifest = export_model(model, tmp_path / "inl", inline=True)
    proto = onnx.load(str(tmp_path / "inl" / "model.onnx"))
    assert not proto.functions and all(n.domain != "effx" for n in proto.graph.node)
    assert all(o.domain != "effx" for o in proto.opset_import) and manifest.custom_ops == []
    assert encoder_error(tmp_path / "inl" / "model.onnx", model, 2, 10) <= TOL


def test_same_spec_exports_byte_identical_files(tmp_path):
    spec = decoder_spec("linear", "state", n_layers=2)
    export_model(build_model(spec), tmp_path / "a")
    export_model(build_model(spec), tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    from effx.exporter import onnx_export

    calls = []
    real = onnx_export.save_model

    def failing(model, path):
        calls.append(path)
        if len(calls) == 2:  # after prefill.onnx was written
            raise RuntimeError("disk full (simulated)")
        return real(model, path)

    monkeypatch.setattr(onnx_export, "save_model", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(build_model(decoder_spec("full", "contiguous", n_layers=1)), tmp_path / "out")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_large_weights_go_to_external_data(tmp_path, monkeypatch):
    from effx.exporter import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 1024)  # pretend this tiny model is over the protobuf limit
    model = build_model(encoder_spec("local", {"window": 4}, n_layers=1))
    manifest = export_model(model, tmp_path / "ext")
    files = sorted(p.name for p in (tmp_path / "ext").iterdir() if p.name != ".effx-output.json")
    assert files == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert set(manifest.files) == {"model.onnx", "model.onnx.data"}
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < (tmp_path / "ext" / "model.onnx.data").stat().st_size
    assert encoder_error(tmp_path / "ext" / "model.onnx", model, 2, 8) <= TOL


@pytest.mark.parametrize("spec_args", [("linear", {"feature_map": "elu"}), ("local", {"window": 4})],
                         ids=lambda a: a[0] if isinstance(a, tuple) else str(a))
def test_trt_plugin_nodes_carry_aot_attributes_and_still_run(spec_args, tmp_path):
    kind, attention = spec_args
    model = build_model(encoder_spec(kind, attention, n_layers=1))
    export_model(model, tmp_path / "p", trt_plugins=True)
    proto = onnx.load(str(tmp_path / "p" / "model.onnx"))
    nodes = [n for n in proto.graph.node if n.domain == "effx"]
    assert nodes
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"effx" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
        if kind == "linear":
            assert len(node.input) == 5 and node.input[4] == "effx.omega_placeholder"
    assert encoder_error(tmp_path / "p" / "model.onnx", model, 2, 10, pad_last=2) <= TOL


def _sabotage_dense_branch(src, dst):
    """A copy of the graph whose LocalAttention dense branch outputs zeros."""
    proto = onnx.load(str(src))
    (fn,) = [f for f in proto.functions if f.name == "LocalAttention"]
    (branch,) = [a.g for n in fn.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch"]
    out = branch.output[0].name
    producer = next(n for n in branch.node if out in n.output)
    producer.output[list(producer.output).index(out)] = out + "_dense"
    branch.node.append(onnx.helper.make_node("Sub", [out + "_dense", out + "_dense"], [out]))  # dense -> 0
    onnx.save(proto, str(dst))


def test_local_attention_long_sequences_take_the_banded_form(tmp_path):
    """Past 2w + 128 tokens of a whole sequence the LocalAttention body runs its banded O(n w) branch; shown
    by sabotaging the dense branch: long sequences still agree with PyTorch, short ones no longer do."""
    model = build_model(encoder_spec("local", {"window": 4}, max_seq_len=200, n_layers=1))  # symmetric: 3w keys
    export_model(model, tmp_path / "onnx")
    path = tmp_path / "onnx" / "model.onnx"
    assert encoder_error(path, model, 2, 150, pad_last=9) <= TOL  # banded (150 > 2 * 4 + 128)
    assert encoder_error(path, model, 2, 40, pad_last=3) <= TOL  # dense
    _sabotage_dense_branch(path, tmp_path / "sabotaged.onnx")
    assert encoder_error(tmp_path / "sabotaged.onnx", model, 2, 150, pad_last=9) <= TOL
    assert encoder_error(tmp_path / "sabotaged.onnx", model, 2, 40) > 1e-2


def test_causal_local_prefill_takes_the_banded_form(tmp_path):
    model = build_model(decoder_spec("local", "contiguous", {"window": 5}, max_seq_len=160, n_layers=1))  # 2w keys
    export_model(model, tmp_path / "onnx")
    manifest = Manifest.read(tmp_path / "onnx")
    _sabotage_dense_branch(tmp_path / "onnx" / "prefill.onnx", tmp_path / "onnx" / "prefill.onnx")
    ids = torch.randint(0, 1000, (2, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).numpy()
    long_prompt = decode_in_ort(tmp_path / "onnx", manifest, ids.numpy(), prompt=145)  # banded prefill
    assert np.abs(long_prompt - ref).max() <= TOL
    short_prompt = decode_in_ort(tmp_path / "onnx", manifest, ids[:, :20].numpy(), prompt=12)  # dense: sabotaged
    assert np.abs(short_prompt[:, :12] - ref[:, :12]).max() > 1e-2
