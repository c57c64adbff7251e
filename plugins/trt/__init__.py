"""effx.plugins.trt: the TensorRT plugin definitions of the effx ops (Quickly-Deployable Plugins with AOT
implementations that embed Triton-compiled PTX) and the PTX they embed. Importing this package never
imports tensorrt or triton; `register_tensorrt_plugins()` does."""

from effx.plugins.trt.definitions import (
    PLUGIN_NAMESPACE,
    PLUGIN_SPECS,
    PLUGIN_VERSION,
    SHARED_MEMORY_LIMIT,
    PluginSpec,
    kernel_constexprs,
    kernel_signature,
    node_attributes,
    register_tensorrt_plugins,
    registered_plugins,
)
from effx.plugins.trt.ptx import DEFAULT_PTX_ISA, CompiledPTX, compile_ptx, ptx_isa_for

__all__ = ["DEFAULT_PTX_ISA", "PLUGIN_NAMESPACE", "PLUGIN_SPECS", "PLUGIN_VERSION", "SHARED_MEMORY_LIMIT",
           "CompiledPTX", "PluginSpec", "compile_ptx", "kernel_constexprs", "kernel_signature", "node_attributes",
           "ptx_isa_for", "register_tensorrt_plugins", "registered_plugins"]
