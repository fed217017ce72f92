"""kernelize.RMSNorm: x / sqrt(mean(x^2, last axis) + epsilon) * weight (Llama, T5).

ONNX Runtime: ``SimplifiedLayerNormalization`` (its CPU kernel for RMS normalization).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, const, function_inputs, swap_in


class RMSNorm(Operator):
    name = "RMSNorm"
    inputs = ("input", "weight")
    attributes = {"epsilon": float}

    def reference(self, x, weight, *, epsilon):
        x = np.asarray(x, np.float64)
        return (x / np.sqrt((x * x).mean(-1, keepdims=True) + epsilon) * weight).astype(np.float32)

    def body(self, tape, inputs, attrs):
        x, weight = inputs
        mean_sq = tape.op("ReduceMean", [tape.op("Mul", [x, x]), const(tape, [-1], np.int64)], {"keepdims": 1})
        rms = tape.op("Sqrt", [tape.op("Add", [mean_sq, const(tape, attrs["epsilon"])])])
        return [tape.op("Mul", [tape.op("Div", [x, rms]), weight])]

    def lower_ort(self, node, graph):
        x, weight = function_inputs(node, self)
        new = ir.Node("", "SimplifiedLayerNormalization", [x, weight], num_outputs=1,
                      attributes=[ir.AttrInt64("axis", -1), ir.AttrInt64("stash_type", 1),
                                  ir.AttrFloat32("epsilon", node.attributes["epsilon"].value)],
                      name=node.name)
        swap_in(graph, node, [new])
        return True
