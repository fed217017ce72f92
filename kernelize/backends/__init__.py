"""Backends: run, time and save the optimized IR: ONNX Runtime (ort) or Apache TVM (tvm)."""

BACKENDS = ("ort", "tvm")
