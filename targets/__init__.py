"""effx.targets: target profiles, graph-level precision, and builds for ONNX Runtime and TensorRT."""

from effx.targets.profiles import PRECISIONS, TARGETS, TargetProfile, get_target

__all__ = ["PRECISIONS", "TARGETS", "TargetProfile", "get_target"]
