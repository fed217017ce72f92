"""Frontends: bring a user's model into the one IR (an ``onnx_ir.Model``)."""
