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
