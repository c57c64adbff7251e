"""effx's TensorRT plugins through the real `tensorrt.plugin` (11.4) sources, over a stub TensorRT core.

What this covers (tests/plugins/aot_worker.py part 2): the registration decorators' validators accept
effx's describe/autotune/aot_impl signatures and reject the known mistakes; the creator built from the
registration turns ONNX-typed fields (as onnx-tensorrt's loadFields makes them) into typed attributes; the
AOT plugin class asks for output types and shapes, type/format combinations and tactics, and gets from
effx's aot_impl a kernel name, PTX and symbolic launch parameters, which are evaluated here for concrete
sizes. Not covered: TensorRT's C++ side (engine build, PTX load, the launch itself).
"""

from __future__ import annotations

import pytest

from effx.plugins import OPS
from effx.plugins.trt import PLUGIN_SPECS

FIELD_TYPES = {int: "INT64", float: "FLOAT64", bool: "INT8", str: "CHAR"}  # tensorrt.plugin._utils


@pytest.fixture(scope="module")
def qdp(aot_report):
    if aot_report.get("wheel") is None:
        pytest.skip("no tensorrt-cu13-bindings wheel on this machine (set EFFX_TRT_BINDINGS to a wheel or an "
                    "unpacked copy; tests never download)")
    if "qdp_error" in aot_report:
        pytest.fail(aot_report["qdp_error"])
    return aot_report["qdp"]


def plugin(qdp, case):
    facts = qdp["plugins"][case]
    assert "error" not in facts, facts.get("error")
    return facts


def cdiv(a, b):
    return -(-a // b)


def test_all_plugins_register_once_in_the_effx_namespace(qdp):
    assert qdp["registered"] == [s.plugin_id for s in PLUGIN_SPECS.values()]
    assert qdp["registered_again"] == qdp["registered"]
    assert {"register", "autotune", "aot_impl", "KernelLaunchParams"} <= set(qdp["public_api"])


def test_the_real_validators_reject_known_mistakes(qdp):
    r = qdp["rejections"]
    assert "reserved namespace" in r["reserved_namespace"]
    assert "not a supported serializable type" in r["list_attribute"]
    assert "No return annotation" in r["aot_without_return_annotation"]
    assert "does not match the expected input arg schema: (x, a, b, outputs, tactic)" in r["aot_attributes_out_of_order"]


@pytest.mark.parametrize("name", list(PLUGIN_SPECS))
def test_creator_fields_and_parsed_attributes(qdp, name):
    facts = plugin(qdp, name)
    assert facts["creator_fields"] == [[a, FIELD_TYPES[t]] for a, t in OPS[name].attributes.items()]
    assert facts["plugin_class"] == "_TemplateAOTPlugin"  # aot=1 -> STRICT_AOT honoured
    # ONNX INT/FLOAT/STRING fields come back as the annotated python types, in registration order
    assert [[a, t.__name__] for a, t in OPS[name].attributes.items()] == [[a, v[0]] for a, v in facts["attrs"].items()]


@pytest.mark.parametrize("name", list(PLUGIN_SPECS))
def test_types_tactics_and_outputs(qdp, name):
    spec = PLUGIN_SPECS[name]
    facts = plugin(qdp, name)
    assert facts["output_types"] == ["HALF"] * len(spec.outputs)
    for combo in facts["type_combinations"]:
        ints = [combo[i] for i, n in enumerate(spec.inputs) if n in spec.int_inputs]
        floats = [c for i, c in enumerate(combo) if i >= len(spec.inputs) or spec.inputs[i] not in spec.int_inputs]
        assert set(ints) <= {"INT64"} and len(set(floats)) == 1
    assert sorted(c[0] for c in facts["type_combinations"]) == ["BF16", "FLOAT", "HALF"]
    assert facts["tactics"] == list(spec.tactics)


def expected_launch(name, env, tactic):
    """Grid and int32 extras each plugin must ask for, from the worker's example shapes (B=2, H=8, H_kv=2)."""
    b, h, h_kv = 2, 8, 2
    block_m = 16 if tactic == 2 else 64
    if name == "LocalAttention":
        return [cdiv(env["NQ"] * 4, block_m), b * h_kv, 1], [h, h_kv, env["NQ"], env["NK"], 16]
    if name == "BlockSparseAttention":
        return [cdiv(env["N"] * 4, block_m), b * h_kv, 1], [h, h_kv, env["N"], env["N"], 16, 2, 1, 4]
    if name == "PagedAttention":
        return [cdiv(env["S"] * 4, block_m), b * h_kv, 1], [h, h_kv, env["S"], 16, env["MB"], 0]
    if name == "LinformerAttention":
        return [cdiv(env["N"] * 4, 64), b * h_kv, 1], [h, h_kv, env["N"], 128, 1]
    if name in ("NormalizedLinearAttention", "NormalizedLinearAttentionState"):
        return [64 // 16, b * h_kv, 1], [h, h_kv, env["N"]]
    return [64 // 16, b * h_kv, 1], [h, h_kv, 1]  # decode


@pytest.mark.parametrize("case", [*PLUGIN_SPECS, "NormalizedLinearAttentionState/decode"])
def test_aot_launch_parameters_and_ptx(qdp, case):
    name = case.split("/")[0]
    spec = PLUGIN_SPECS[name]
    facts = plugin(qdp, case)
    envs = {"LocalAttention": [{"NQ": 100, "NK": 300}, {"NQ": 1, "NK": 4096}],
            "BlockSparseAttention": [{"N": 257}, {"N": 16}],
            "PagedAttention": [{"S": 1, "NB": 64, "MB": 32}, {"S": 7, "NB": 9, "MB": 3}],
            "LinformerAttention": [{"N": 1000}, {"N": 64}], "NormalizedLinearAttention": [{"N": 333}],
            "NormalizedLinearAttentionState": [{"N": 50}], "NormalizedLinearAttentionState/decode": [{}]}[case]
    decode = case.endswith("decode")
    for launch in facts["launches"]:
        assert launch["kernel"] == spec.kernels[1 if decode else 0]
        for env, grid, extras in zip(envs, launch["grid"], launch["extra_args"], strict=True):
            want_grid, want_extras = expected_launch(case if decode else name, env, launch["tactic"])
            assert grid == want_grid, (env, launch)
            assert extras == want_extras, (env, launch)
        assert launch["extra_arg_types"] == [["INT", "INT32"]] * len(spec.extra_args)
        assert launch["block"][0] in (128, 256) and launch["block"][1:] == [1, 1]
        n_in, n_extra, n_out = len(spec.inputs), len(spec.extra_args), len(spec.outputs)
        assert launch["ptx_params"] == [".u64"] * n_in + [".u32"] * n_extra + [".u64"] * n_out
        assert launch["ptx_target"] == f"sm_{qdp['arch']}"
        assert launch["shared_mem"] <= 48 * 1024


def test_output_shapes_follow_the_inputs(qdp):
    local = plugin(qdp, "LocalAttention")
    assert local["output_shapes"] == [[[2, 8, 100, 64]], [[2, 8, 1, 64]]]
    state = plugin(qdp, "NormalizedLinearAttentionState")
    assert state["output_shapes"] == [[[2, 8, 50, 64], [2, 2, 64, 64], [2, 2, 64]]]
