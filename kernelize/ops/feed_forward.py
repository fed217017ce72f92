"""kernelize.FeedForward: act(x W1 + b1) W2 + b2, with act = GELU (erf or tanh) or ReLU.

ONNX Runtime: the first bias and the GELU fuse into ``com.microsoft.BiasGelu`` (erf) or
``com.microsoft.FastGelu`` (tanh form, same formula).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, function_inputs, swap_in

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "gelu":
        from math import erf

        return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if activation == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"unknown activation {activation!r}")


class FeedForward(Operator):
    name = "FeedForward"
    inputs = ("input", "w1", "b1", "w2", "b2")
    attributes = {"activation": str}

    def reference(self, x, w1, b1, w2, b2, *, activation):
        h = activate(np.asarray(x, np.float64) @ w1 + b1, activation)
        return (h @ w2 + b2).astype(np.float32)

    def body(self, tape, inputs, attrs):
        x, w1, b1, w2, b2 = inputs
        h = tape.op("Add", [tape.op("MatMul", [x, w1]), b1])
        act = attrs["activation"]
        if act == "relu":
            h = tape.op("Relu", [h])
        else:
            h = tape.op("Gelu", [h], {"approximate": "tanh" if act == "gelu_tanh" else "none"})
        return [tape.op("Add", [tape.op("MatMul", [h, w2]), b2])]

    def lower_ort(self, node, graph):
        x, w1, b1, w2, b2 = function_inputs(node, self)
        act = node.attributes["activation"].value
        up = ir.Node("", "MatMul", [x, w1], num_outputs=1)
        if act == "relu":
            add = ir.Node("", "Add", [up.outputs[0], b1], num_outputs=1)
            mid = [up, add, ir.Node("", "Relu", [add.outputs[0]], num_outputs=1)]
        else:
            kernel = "FastGelu" if act == "gelu_tanh" else "BiasGelu"
            mid = [up, ir.Node("com.microsoft", kernel, [up.outputs[0], b1], num_outputs=1)]
        down = ir.Node("", "MatMul", [mid[-1].outputs[0], w2], num_outputs=1)
        out = ir.Node("", "Add", [down.outputs[0], b2], num_outputs=1)
        swap_in(graph, node, [*mid, down, out])
        return True
