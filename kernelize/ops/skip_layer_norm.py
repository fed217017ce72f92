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
        if gamma.shape is None or len(gamma.shape) != 1:
            return False
        if x.shape is not None and skip.shape is not None and _broadcasts_over_batch(x.shape, skip.shape):
            x, skip = skip, x  # the kernel takes the full-shaped tensor first
        if x.shape is None or skip.shape is None or not (
                skip.shape == x.shape or _broadcasts_over_batch(skip.shape, x.shape)):
            return False  # ONNX Runtime's kernel wants skip shaped like input or [1, S, H]
        bias, add = None, None
        for first, second in ((x, skip), (skip, x)):  # x + skip is symmetric: fold either bias
            add = producer(first, "Add")
            b = const_array(add.inputs[1]) if add is not None else None
            if (b is not None and b.ndim == 1 and b.shape == tuple(gamma.shape) and len(first.uses()) == 1
                    and not first.is_graph_output() and add.inputs[0].shape in (None, first.shape)):
                x, skip, bias = add.inputs[0], second, add.inputs[1]
                break
        inputs = [x, skip, gamma, beta, bias]
        while inputs[-1] is None:
            inputs.pop()
        new = ir.Node("com.microsoft", "SkipLayerNormalization", inputs, num_outputs=4,
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


def _broadcasts_over_batch(small: ir.Shape, full: ir.Shape) -> bool:
    """``small`` is [1, S, H] and ``full`` is [B, S, H] with B not statically 1."""
    return len(small) == len(full) == 3 and small[0] == 1 and full[0] != 1 and \
        list(small)[1:] == list(full)[1:]
