"""Exported backends: ONNX export (onnx_export, specs), onnxruntime sessions (ort), TensorRT engines (tensorrt),
the stand-in modules the pipelines call (modules) and the on-disk artifact store (store)."""

from .store import reset_stats, stats

__all__ = ["reset_stats", "stats"]
