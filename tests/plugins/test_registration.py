"""How the kernels hang off the op specs: CUDA registration, lazy imports, and the plugin descriptions."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch

import effx.core.lazy
import effx.plugins
from effx.core.errors import MissingDependencyError
from effx.plugins import OPS
from effx.plugins.kernels import CUDA_IMPLS, attention, cuda_impl, linear, linformer, with_kernels
from effx.plugins.local import local_attention_reference
from effx.plugins.trt import PLUGIN_NAMESPACE, PLUGIN_SPECS, node_attributes

FAMILIES = {"attention": attention, "linformer": linformer, "linear": linear}


def test_every_op_has_a_cuda_kernel_and_a_plugin():
    assert set(with_kernels()) == set(PLUGIN_SPECS) == set(OPS)


@pytest.mark.parametrize("op_name", sorted(with_kernels()))
def test_cuda_kernel_registered_on_the_torch_op(op_name):
    spec = OPS[op_name]
    assert op_name in CUDA_IMPLS
    assert torch._C._dispatch_has_kernel_for_dispatch_key(spec.torch_op._qualname, "CUDA")


def test_cuda_impl_runs_the_kernel_and_takes_keywords(kernel_device):
    """The registered CUDA implementation, called here on CPU tensors, goes to the kernel (interpreter)."""
    q = torch.randn(1, 2, 17, 8, device=kernel_device)
    k = torch.randn(1, 1, 17, 8, device=kernel_device)
    v = torch.randn(1, 1, 17, 8, device=kernel_device)
    pos = torch.arange(17, device=kernel_device)[None]
    impl = CUDA_IMPLS["LocalAttention"]
    out = impl(q, k, v, pos, pos, window=4, causal=True, scale=0.5)
    assert (out - local_attention_reference(q, k, v, pos, pos, 4, True, 0.5)).abs().max() <= 1e-4


def test_cuda_impl_falls_back_to_the_reference_for_what_kernels_do_not_take():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)[None]
    impl = cuda_impl("LocalAttention")
    with pytest.warns(UserWarning, match="float64"):
        out = impl(q, q[:, :1], q[:, :1], pos, pos, 2, True, 0.5)
    assert torch.equal(out, local_attention_reference(q, q[:, :1], q[:, :1], pos, pos, 2, True, 0.5))
    wide = torch.randn(1, 1, 3, 300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        impl(wide, wide, wide, pos[:, :3], pos[:, :3], 2, True, 0.5)
    assert any("head dim" in str(w.message) for w in caught)


IMPORT_CHECK = r"""
import sys
import effx.plugins
from effx.plugins import OPS
import effx.plugins.kernels.attention, effx.plugins.kernels.linear, effx.plugins.kernels.linformer
import effx.plugins.trt
from effx.plugins.kernels import CUDA_IMPLS
print("KERNELS", sorted(CUDA_IMPLS))
print("HEAVY", [m for m in ("triton", "tensorrt") if m in sys.modules])
"""


def test_imports_never_pull_triton_or_tensorrt():
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout
    assert "KERNELS ['BlockSparseAttention', 'LinformerAttention', 'LocalAttention', 'NormalizedLinearAttention', " \
        "'NormalizedLinearAttentionState', 'PagedAttention']" in proc.stdout


def test_without_triton_ops_keep_the_reference_and_kernels_say_which_extra():
    code = (
        "import sys, importlib.util\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] == 'triton' else _find(n, *a)\n"
        "sys.modules['triton'] = None  # import triton -> ImportError\n"
        "import torch, effx.plugins\n"
        "from effx.plugins import OPS\n"
        "from effx.plugins.kernels import CUDA_IMPLS\n"
        "print('KERNELS', sorted(CUDA_IMPLS))\n"
        "from effx.plugins.kernels import attention\n"
        "x = torch.randn(1, 1, 4, 8); p = torch.arange(4)[None]\n"
        "try:\n"
        "    attention.local_attention(x, x, x, p, p, 2, True, 0.5)\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KERNELS []" in proc.stdout
    assert "ERR MissingDependencyError" in proc.stdout and "effx[triton]" in proc.stdout


# -- plugin descriptions ------------------------------------------------------------------------------------
def runtime_arguments(fn) -> list[str]:
    """A kernel entry's runtime arguments (the compile-time ones are annotated tl.constexpr)."""
    return [p.name for p in inspect.signature(fn).parameters.values() if "constexpr" not in str(p.annotation)]


@pytest.mark.parametrize("name", sorted(PLUGIN_SPECS))
def test_plugin_spec_matches_its_op_and_its_kernels(name):
    spec = PLUGIN_SPECS[name]
    op = OPS[name]
    assert spec.namespace == PLUGIN_NAMESPACE == "effx"
    assert spec.plugin_id == f"effx::{name}" and "." not in name
    assert spec.inputs == tuple(i.rstrip("?") for i in op.inputs)
    assert spec.attributes == tuple(op.attributes.items())  # registration order = ONNX attribute order
    assert set(spec.materialise) == {i.rstrip("?") for i in op.inputs if i.endswith("?")}
    assert set(spec.int_inputs) <= set(spec.inputs)
    module = FAMILIES[spec.kernel_family]
    for kernel in spec.kernels:
        # TensorRT launches (input pointers, int32 extras, output pointers): the entry must take exactly that
        assert runtime_arguments(getattr(module, kernel)) == list(spec.kernel_arguments()), kernel


def test_node_attributes_select_the_aot_plugin():
    assert node_attributes() == {"plugin_namespace": "effx", "plugin_version": "1", "aot": 1}
    assert all(s.node_attributes() == node_attributes() for s in PLUGIN_SPECS.values())


def test_register_without_tensorrt_names_the_extra():
    if effx.core.lazy.has_module("tensorrt"):
        pytest.skip("TensorRT is installed here")
    from effx.plugins.trt import register_tensorrt_plugins

    with pytest.raises(MissingDependencyError, match=r"effx\[tensorrt\]"):
        register_tensorrt_plugins()
