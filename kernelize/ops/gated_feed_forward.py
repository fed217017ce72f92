"""kernelize.GatedFeedForward: (silu(x Wg) * (x Wu)) Wd, the SwiGLU feed-forward (Llama)."""

from __future__ import annotations

import numpy as np

from kernelize.ops.base import Operator


class GatedFeedForward(Operator):
    name = "GatedFeedForward"
    inputs = ("input", "w_gate", "w_up", "w_down")
    attributes = {}

    def reference(self, x, w_gate, w_up, w_down):
        x = np.asarray(x, np.float64)
        g = x @ w_gate
        return ((g / (1.0 + np.exp(-g))) * (x @ w_up) @ w_down).astype(np.float32)

    def body(self, tape, inputs, attrs):
        x, w_gate, w_up, w_down = inputs
        g = tape.op("MatMul", [x, w_gate])
        h = tape.op("Mul", [tape.op("Mul", [g, tape.op("Sigmoid", [g])]), tape.op("MatMul", [x, w_up])])
        return [tape.op("MatMul", [h, w_down])]
