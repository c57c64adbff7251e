"""`effx check` and target lowering: the TensorRT facts as data, the default exports clean for every TensorRT
target after lowering (a sample here; the whole kind x family x cache sweep under -m sweep), lowered graphs
computing what the exported ones compute, and planted problems reported with the node's name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from effx.cli import main
from effx.core.errors import CapabilityError
from effx.core.manifest import Manifest
from effx.exporter import export_model
from effx.models import build_model
from effx.targets.api import open_runner
from effx.targets.calib import calibration_feeds, token_batches
from effx.targets.compat import FACTS_FILE, check_folder, check_model, trt_facts
from effx.targets.lower import lower_for_tensorrt
from effx.targets.profiles import TARGETS
from tests.helpers import DECODER_CASES, ENCODER_CASES, case_id
from tests.targets.conftest import SMALL, small_spec

TRT_TARGETS = [name for name, p in TARGETS.items() if p.backend == "tensorrt" and not p.unsupported]


@pytest.fixture
def exports(trt_sample_exports):
    return trt_sample_exports


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["effx", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


# -- facts ---------------------------------------------------------------------------------------------------
def test_every_facts_row_cites_its_source_and_unverified_rows_name_the_nearest_verified():
    doc = json.loads(FACTS_FILE.read_text())
    rows = {r["version"]: r for r in doc["versions"]}
    assert {"8.5", "8.6", "10.0", "10.1", "10.3", "10.13", "10.15", "11.0"} <= set(rows)
    for v, row in rows.items():
        assert row["source"], v
        if row["verified"] and "base" not in row:
            assert "onnx/onnx-tensorrt branch release/" in row["source"] and "docs/operators.md" in row["source"]
        if not row["verified"]:
            assert row["source"].startswith("unverified") and "nearest verified" in row["source"], v
    assert all(f["source"] for f in doc["features"]) and all(p["source"] for p in doc["precision"])
    # what the tables say, spot-checked against onnx-tensorrt's docs/operators.md
    assert rows["8.5"]["max_opset"] == 17 and rows["10.1"]["max_opset"] == 20 and rows["10.15"]["max_opset"] == 24
    assert rows["10.1"]["ops"]["If"]["rules"] == [{"if_branch_rank": True}]
    assert {"const_input": "axes"} in rows["10.1"]["ops"]["ReduceMean"]["rules"]
    assert "Attention" not in rows["10.1"]["ops"] and not rows["10.1"]["ops"]["BitShift"]["supported"]


@pytest.mark.parametrize("asked,row", [("10.3.0.26", "10.3"), ("10.16", "10.15"), ("11.4.0.106", "11.0"),
                                       ("10.2", "10.1"), ("8.6.1", "8.6")])
def test_a_version_takes_the_greatest_row_not_newer_than_it(asked, row):
    facts = trt_facts(asked)
    assert facts.version == row
    assert facts.has("onnx_attention") == (tuple(map(int, asked.split(".")[:2])) >= (10, 14))
    assert facts.has("local_functions") == (int(asked.split(".")[0]) >= 9)
    assert ("Attention" in facts.ops) == facts.has("onnx_attention")


def test_strongly_typed_precision_rule_from_11():
    assert "strongly typed" in trt_facts("11.4").precision and "Q/DQ" in trt_facts("10.3").precision


# -- default exports, lowered, are clean everywhere --------------------------------------------------------
@pytest.mark.parametrize("target", TRT_TARGETS)
def test_sample_exports_check_clean_after_lowering(target, exports):
    for name, (_, folder) in exports.items():
        report = check_folder(folder, target, lowered=True)
        assert report.ok, (name, [f.line() for f in report.blocking[:5]])
        assert report.nodes_checked > 50


def test_as_exported_the_opset_23_graphs_do_not_suit_tensorrt_10_3(exports):
    report = check_folder(exports["enc-full"][1], "jetson-orin", lowered=False)
    kinds = {(f.kind, f.op) for f in report.blocking}
    assert ("op", "Attention") in kinds and any(k == "opset" for k, _ in kinds)
    # TensorRT >= 10.14 takes ONNX Attention as it is
    assert check_folder(exports["enc-full"][1], "h100", lowered=False).ok


@pytest.mark.parametrize("version", ["10.3", "11.4"])
def test_lowered_graphs_compute_what_the_exports_compute(version, exports):
    """ONNX Runtime runs both: Attention decomposed (Q pre-scaled), Clip/Equal rewritten, opset re-stamped."""
    for name, (manifest, folder) in exports.items():
        with open_runner(folder, manifest) as runner:
            feeds = calibration_feeds(manifest, token_batches(manifest, "random", 1, seq=9), runner)
        for graph, g in manifest.graphs.items():
            model = onnx.load(str(folder / g.file))
            lowered, notes = lower_for_tensorrt(model, trt_facts(version), graph)
            if version == "10.3":
                assert all(o.version <= 20 for o in lowered.opset_import if o.domain == "")
                assert not any(n.op_type == "Attention" for n in lowered.graph.node)
            a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            b = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
            for feed in feeds[graph]:
                for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
                    assert np.allclose(x, y, atol=1e-5, rtol=1e-5), (name, graph, notes)


def _attention_model(opset=25, **attrs):
    """A standalone Attention: Q (1, 4, 5, 8), K/V (1, 2, 7, 8) (grouped heads), a boolean mask."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4, 5, 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 7, 8])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 7, 8])
    m = helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 1, 5, 7])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 8])
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="planted_attention", **attrs)
    graph = helper.make_graph([node], "g", [q, k, v, m], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=11)


@pytest.mark.parametrize("attrs", [{}, {"is_causal": 1}, {"scale": 0.3, "softcap": 2.0},
                                   {"is_causal": 1, "left_window_size": 2}, {"left_window_size": 1, "right_window_size": 1}],
                         ids=["plain", "causal", "scale-softcap", "causal-window", "two-sided-window"])
def test_attention_decomposition_matches_onnx_attention(attrs):
    model = _attention_model(**attrs)
    lowered, notes = lower_for_tensorrt(model, trt_facts("10.3"), "g")
    assert "MatMul/Softmax" in notes[0] and not any(n.op_type == "Attention" for n in lowered.graph.node)
    mul = next(n for n in lowered.graph.node if n.name.endswith("/q_scaled"))
    assert mul.input[0] == "q"  # Q is scaled before the first MatMul (TensorRT's MHA fusion needs it there)
    rng = np.random.default_rng(0)
    feed = {"q": rng.standard_normal((1, 4, 5, 8), np.float32), "k": rng.standard_normal((1, 2, 7, 8), np.float32),
            "v": rng.standard_normal((1, 2, 7, 8), np.float32), "m": rng.random((1, 1, 5, 7)) > 0.2}
    feed["m"][..., 0] = True  # every row keeps a key
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(got - want).max() < 1e-5


def test_attention_kept_for_tensorrt_10_14_loses_default_attributes_and_windows_are_lowered():
    plain = _attention_model(opset=23, softcap=0.0, qk_matmul_output_mode=0)
    kept, notes = lower_for_tensorrt(plain, trt_facts("11.4"), "g")
    node = next(n for n in kept.graph.node if n.op_type == "Attention")
    assert not {a.name for a in node.attribute} & {"softcap", "qk_matmul_output_mode"} and not notes
    windowed, notes = lower_for_tensorrt(_attention_model(opset=25, left_window_size=2), trt_facts("11.4"), "g")
    assert not any(n.op_type == "Attention" for n in windowed.graph.node) and notes  # opset 25 > 11.4's 24


def test_attention_with_present_outputs_is_refused_with_one_line():
    model = _attention_model(opset=23)
    node = model.graph.node[0]
    node.output.extend(["present_key", "present_value"])
    with pytest.raises(CapabilityError, match="planted_attention.*export with --opset 20") as info:
        lower_for_tensorrt(model, trt_facts("10.3"), "g")
    assert "\n" not in str(info.value)


# -- planted problems ------------------------------------------------------------------------------------------
def _one_node(op, inputs, outputs, opset=20, **attrs):
    node = helper.make_node(op, [i.name for i in inputs], [o.name for o in outputs], name=f"planted_{op.lower()}", **attrs)
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _findings(model, version="10.3"):
    found, _ = check_model(model, "model", trt_facts(version))
    return [f for f in found if f.blocking]


def test_planted_unsupported_op_is_reported_with_its_node():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    (f,) = _findings(_one_node("Det", [x], [y]))
    assert (f.node, f.op, f.kind) == ("planted_det", "Det", "op") and "operator table" in f.message


def test_planted_too_new_opset_is_reported_with_its_node():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    found = _findings(_one_node("Reshape", [x, s], [y], opset=23))
    assert {(f.node, f.kind) for f in found} == {("(graph)", "opset"), ("planted_reshape", "opset")}
    assert any("Reshape-23 is newer than TensorRT 10.3's opset 20" in f.message for f in found)
    assert not _findings(_one_node("Reshape", [x, s], [y], opset=23), "10.15")


def test_planted_unsupported_dtype_is_reported_with_its_node():
    a = helper.make_tensor_value_info("a", TensorProto.INT32, [2, 2])
    b = helper.make_tensor_value_info("b", TensorProto.INT32, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])
    (f,) = _findings(_one_node("MatMul", [a, b], [y]))
    assert (f.node, f.op, f.kind) == ("planted_matmul", "MatMul", "dtype") and "INT32" in f.message


def test_restrictions_computed_axes_and_if_branches_of_different_rank():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    (f,) = _findings(_one_node("ReduceMean", [x, axes], [y]))
    assert f.kind == "restriction" and f.node == "planted_reducemean" and "'axes'" in f.message
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="then_id")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Det", ["x"], ["e"], name="inside_else")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [])])
    node = helper.make_node("If", ["c"], ["y"], name="planted_if", then_branch=then, else_branch=other)
    model = helper.make_model(helper.make_graph([node], "g", [c, x], [y]),
                              opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    found = {(f.node, f.kind): f for f in _findings(model)}
    assert ("planted_if", "restriction") in found and "rank" in found[("planted_if", "restriction")].message
    assert ("inside_else", "op") in found and "If:planted_if.else_branch" in found[("inside_else", "op")].graph


def test_unmarked_effx_nodes_are_checked_through_their_function_bodies(exports):
    manifest, folder = exports["dec-local-ring"]
    model = onnx.load(str(folder / manifest.graphs["prefill"].file))
    # a body node no TensorRT takes, planted into the effx function (inlined per call: names get __1, __2)
    fn = next(f for f in model.functions if f.name == "LocalAttention")
    fn.node.append(helper.make_node("Det", [fn.input[0]], ["planted_out"], name="planted_det"))
    found = _findings(model)
    assert any(f.node.startswith("LocalAttention/planted_det") and f.op == "Det" for f in found), [f.line() for f in found]


# -- the command -------------------------------------------------------------------------------------------
def test_effx_check_cli_exit_codes_and_lines(exports, tmp_path, capsys, monkeypatch):
    folder = exports["enc-full"][1]
    code, out, _ = run_cli(["check", str(folder), "-t", "jetson-orin"], capsys, monkeypatch)
    assert code == 0 and "clean" in out and "lowered: model: 1 ONNX Attention" in out
    code, out, _ = run_cli(["check", str(folder), "-t", "jetson-orin", "--as-exported", "--json"], capsys, monkeypatch)
    report = json.loads(out)
    assert code == 1 and not report["ok"] and any(f["op"] == "Attention" and f["node"] for f in report["findings"])
    for args, needle in ((["check", str(tmp_path), "-t", "h100"], "no manifest.json"),
                         (["check", str(folder), "-t", "cpu"], "ONNX Runtime"),
                         (["check", str(folder), "-t", "jetson-xavier"], "TensorRT 8.5")):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


# -- the whole sweep (python -m pytest -m sweep) -----------------------------------------------------------
SWEEP = [("encoder", k, None, a, {}) for k, a in ENCODER_CASES] + [("decoder", *c) for c in DECODER_CASES]


@pytest.mark.sweep
@pytest.mark.parametrize("case", SWEEP, ids=[case_id(c) for c in SWEEP])
def test_every_default_export_checks_clean_for_every_tensorrt_target(case, tmp_path):
    family, kind, layout, attention, cache = case
    layers = max(SMALL["n_layers"], len(attention.get("factors", [])))
    export_model(build_model(small_spec(family, kind, layout, attention, cache, n_layers=layers)), tmp_path / "onnx")
    Manifest.read(tmp_path / "onnx")
    for target in TRT_TARGETS:
        report = check_folder(tmp_path / "onnx", target, lowered=True)
        assert report.ok, (target, [f.line() for f in report.blocking[:5]])


def test_facts_file_is_packaged_next_to_the_module():
    assert FACTS_FILE.parent.name == "facts" and Path(FACTS_FILE).is_file()
