"""Backends: run, time and save the optimized IR (ONNX Runtime now; TVM to come)."""

BACKENDS = ("ort",)
