"""kernelize.SkipLayerNorm: LayerNorm(x + skip) over the last axis (residual + norm).

Outputs the normalized value and, second, the sum ``x + skip`` (for the next residual).
ONNX Runtime: ``com.microsoft.SkipLayerNormalization``; a bias added to ``x`` just
before (the output projection's) is folded into the kernel's bias input.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.graph import const_array, producer
from kernelize.ops.base import Operator, function_inputs


def layer_norm(x: np.ndarray, gamma, beta, epsilon: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon) * gamma
    return y + beta if beta is not None else y


class SkipLayerNorm(Operator):
    name = "SkipLayerNorm"
    inputs = ("input", "skip", "gamma", "beta?")
    outputs = ("Y", "sum")
    attributes = {"epsilon": float}

    def reference(self, x, skip, gamma, beta=None, *, epsilon):
        total = np.asarray(x, np.float64) + skip
        return layer_norm(total, gamma, beta, epsilon).astype(np.float32), total.astype(np.float32)

    def body(self, tape, inputs, attrs):
        x, skip, gamma, beta = inputs
        total = tape.op("Add", [x, skip])
        args = [total, gamma] + ([beta] if beta is not None else [])
        y = tape.op("LayerNormalization", args, {"axis": -1, "epsilon": attrs["epsilon"], "stash_type": 1})
        return [y, total]

    def lower_ort(self, node, graph):
        x, skip, gamma, beta = function_inputs(node, self)
        if gamma.shape is None or len(gamma.shape) != 1 or x.shape is None or x.shape != skip.shape:
            return False  # ONNX Runtime's kernel wants equal shapes; the body broadcasts
        bias = None
        add = producer(x, "Add")
        if add is not None and len(x.uses()) == 1 and not x.is_graph_output():
            for i in (0, 1):
                b = const_array(add.inputs[i])
                if b is not None and b.ndim == 1 and b.shape == tuple(gamma.shape):
                    bias, x = add.inputs[i], add.inputs[1 - i]
                    break
        inputs = [x, skip, gamma, beta, bias]
        while inputs[-1] is None:
            inputs.pop()
        new = ir.Node("com.microsoft", "SkipLayerNormalization",
                      [v if v is not None else None for v in inputs], num_outputs=4,
                      attributes=[ir.AttrFloat32("epsilon", node.attributes["epsilon"].value)],
                      name=node.name)
        pairs = [(old, new.outputs[i], old.name) for old, i in zip(node.outputs, (0, 3))]
        graph.insert_before(node, [new])
        for old, repl, _ in pairs:
            ir.convenience.replace_all_uses_with(old, repl, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        for old, repl, name in pairs:
            repl.name, repl.shape, repl.type = name, old.shape, old.type
        if bias is not None and not add.outputs[0].uses():
            graph.remove(add, safe=True)
        return True
