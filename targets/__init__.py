"""effx.targets: target profiles, graph-level precision, and builds for ONNX Runtime and TensorRT."""

if __name__ != "effx.targets":  # imported as a top-level name (a checkout's root on sys.path)
    raise ImportError(f"{__name__}: import effx.targets (the folder targets/ is mapped into the effx package)")

from effx.targets.profiles import PRECISIONS, TARGETS, TargetProfile, get_target

__all__ = ["PRECISIONS", "TARGETS", "TargetProfile", "get_target"]
