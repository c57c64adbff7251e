"""effx.exporter: torch -> ONNX with effx custom nodes (plus standard-ONNX function bodies) and a manifest."""

from effx.exporter.export import DEFAULT_OPSET, export_model

__all__ = ["DEFAULT_OPSET", "export_model"]
