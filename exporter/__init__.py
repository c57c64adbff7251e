"""effx.exporter: torch -> ONNX with effx custom nodes (plus standard-ONNX function bodies) and a manifest."""

if __name__ != "effx.exporter":  # imported as a top-level name (a checkout's root on sys.path)
    raise ImportError(f"{__name__}: import effx.exporter (the folder exporter/ is mapped into the effx package)")

from effx.exporter.export import DEFAULT_OPSET, check_opset, export_model

__all__ = ["DEFAULT_OPSET", "check_opset", "export_model"]
