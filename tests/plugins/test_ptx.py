"""Ahead-of-time PTX for sm_87 (Jetson Orin) and sm_90 (H100), compiled on this machine without a GPU.

The facts come from tests/plugins/aot_worker.py (a subprocess: see conftest). They are what a TensorRT
AOT plugin embeds, so the PTX must have exactly the entry and argument list the plugin launch passes.
"""

from __future__ import annotations

import pytest

from effx.plugins.trt import PLUGIN_SPECS, SHARED_MEMORY_LIMIT
from effx.plugins.trt.ptx import DEFAULT_PTX_ISA

ARCH_TARGET = {87: "sm_87", 90: "sm_90a"}  # Triton writes the arch-specific sm_90a for compute capability 9.0


@pytest.fixture(scope="module")
def ptx(aot_report):
    if "ptx_error" in aot_report:
        pytest.fail(aot_report["ptx_error"])
    return aot_report["ptx"]


def test_every_plugin_kernel_compiled_for_both_archs(ptx):
    compiled = {(r["kernel"], r["arch"]) for r in ptx}
    wanted = {(k, a) for s in PLUGIN_SPECS.values() for k in s.kernels for a in ARCH_TARGET}
    assert wanted <= compiled


def test_ptx_entry_target_and_isa(ptx):
    for r in ptx:
        assert r["entries"] == [r["kernel"]] == [r["name"]], r  # one entry, named as the plugin returns it
        assert r["target"] == ARCH_TARGET[r["arch"]], r
        assert r["version"] == f"{DEFAULT_PTX_ISA // 10}.{DEFAULT_PTX_ISA % 10}", r  # pinned, not ptxas's newest


def test_ptx_arguments_are_inputs_int32_extras_outputs(ptx):
    for r in ptx:
        kinds = ["ptr" if ".u64" in p else p.split()[0] for p in r["params"]]
        want = ["ptr"] * r["n_inputs"] + [".u32"] * r["n_extras"] + ["ptr"] * r["n_outputs"]
        assert kinds == want, r  # Triton's hidden scratch pointers are gone, nothing else is


def test_launch_shape_and_shared_memory(ptx):
    for r in ptx:
        assert r["reqntid"] == r["num_warps"] * 32, r  # the plugin launches block_x = num_warps * 32
        assert r["shared"] <= SHARED_MEMORY_LIMIT, r


def test_wide_fp32_tiles_were_shrunk_to_fit(ptx):
    """fp32 with head dim 128 does not fit 48 KB at the preferred tile; the fallback candidate was taken."""
    wide = [r for r in ptx if r["float_type"] == "fp32" and r["head_dim"] == 128]
    assert wide and all(r["constexprs"]["BLOCK_N"] == 16 for r in wide)


def test_torch_path_kernels_compile_for_the_gpu(aot_report):
    """The split-K, combine, dense and projection kernels run only under torch on CUDA: compiling them here
    (sm_90) is the only check this machine can make that they lower at all."""
    if "torch_path_error" in aot_report:
        pytest.fail(aot_report["torch_path_error"])
    compiled = aot_report["torch_path"]
    assert {r["kernel"] for r in compiled} == {"softmax_split_kernel", "softmax_combine_kernel",
                                               "dense_attention_kernel", "linformer_project_kernel"}
    for r in compiled:
        assert r["entries"] == [r["kernel"]] and r["target"] == "sm_90a"
        assert len(r["params"]) == r["n_args"], r


def test_linear_kernels_with_precomputed_features_compile_for_orin():
    """feature_map 'identity' (Hedgehog's features, m = 24 wide, values 16): the prefill and decode entries compile
    ahead of time for sm_87 within the shared-memory limit (a subprocess: this one may run Triton interpreted)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json\n"
        "from effx.plugins.trt import PLUGIN_SPECS\n"
        "from effx.plugins.trt.definitions import compile_fitting, kernel_constexprs, kernel_signature\n"
        "spec = PLUGIN_SPECS['NormalizedLinearAttentionState']\n"
        "io = {n: 'fp32' for n in spec.inputs + spec.outputs}\n"
        "out = []\n"
        "for dims in ({'head_dim': 16, 'm': 24}, {'head_dim': 16, 'm': 24, 'n': 1}):\n"
        "    kernel, cands = kernel_constexprs(spec, {'feature_map': 'identity', 'eps': 1e-6}, 'fp32', dims, 0)\n"
        "    name, tiles, c = compile_fitting(spec, kernel, cands, kernel_signature(spec, io), 87)\n"
        "    out.append([name, tiles.constexprs['QK_DIM'], tiles.constexprs['HEAD_DIM'], c.shared, c.name])\n"
        "print('RESULT', json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    got = json.loads(lines[0][7:])
    assert [g[0] for g in got] == ["linear_attention_state_kernel", "linear_attention_decode_kernel"]
    assert all(g[1] == 24 and g[2] == 16 and g[3] <= SHARED_MEMORY_LIMIT and g[4] == g[0] for g in got), got
