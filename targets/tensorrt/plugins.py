"""Loading the effx TensorRT plugins (defined in effx.plugins.trt) before a network is parsed or an engine
is deserialised."""

from __future__ import annotations

from effx.plugins.trt import register_tensorrt_plugins


def register_plugins() -> list[str]:
    """Register the effx plugins with TensorRT; the ONNX parser then prefers them over the function bodies."""
    return register_tensorrt_plugins()
