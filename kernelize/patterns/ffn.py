"""Feed-forward: Linear -> GELU (erf or tanh) or ReLU -> Linear, and gated SwiGLU."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.graph import attr, const_array, is_internal, only_user, producer
from kernelize.patterns.site import Pattern, Site


def _linear_in(value: ir.Value, nodes: list):
    """value = x W (+ b) with constant W (2-D) and b (1-D) -> (x, W, b or None)."""
    add = producer(value, "Add")
    b = const_array(add.inputs[1]) if add is not None else None
    if add is not None and b is not None and b.ndim == 1:
        value, bias = add.inputs[0], add.inputs[1]
        nodes.append(add)
    else:
        bias = None
    matmul = producer(value, "MatMul")
    w = const_array(matmul.inputs[1]) if matmul is not None else None
    if w is None or w.ndim != 2 or len(value.uses()) != 1:
        return None
    nodes.append(matmul)
    return matmul.inputs[0], matmul.inputs[1], bias


def _linear_out(value: ir.Value, nodes: list):
    """The single use of value is x W (+ b) -> (W, b or None, output value)."""
    matmul = only_user(value, "MatMul")
    if matmul is None or matmul.inputs[0] is not value:
        return None
    w = const_array(matmul.inputs[1])
    if w is None or w.ndim != 2:
        return None
    nodes.append(matmul)
    add = only_user(matmul.outputs[0], "Add")
    b = const_array(add.inputs[1]) if add is not None else None
    if b is None or b.ndim != 1:
        return matmul.inputs[1], None, matmul.outputs[0]
    nodes.append(add)
    return matmul.inputs[1], add.inputs[1], add.outputs[0]


def _zeros_like_columns(weight: ir.Value, name: str) -> ir.Value:
    """A zero bias for a Linear without one (the operator always takes a bias)."""
    width = const_array(weight).shape[1]
    return ir.Value(name=name, const_value=ir.tensor(np.zeros(width, np.float32)))


class FeedForwardPattern(Pattern):
    name = "feed_forward"
    kind = "ffn"
    roots = ("Gelu", "Relu")

    def match(self, node, model):
        if node.op_type == "Gelu":
            activation = "gelu_tanh" if attr(node, "approximate", "none") == "tanh" else "gelu"
        else:
            activation = "relu"
        nodes = [node]
        first = _linear_in(node.inputs[0], nodes)
        if first is None:
            return "activation input is not a Linear (MatMul + bias) with constant weights"
        second = _linear_out(node.outputs[0], nodes)
        if second is None:
            return "activation output is not used by exactly one Linear with constant weights"
        x, w1, b1 = first
        w2, b2, out = second
        b1 = b1 or _zeros_like_columns(w1, f"{node.outputs[0].name}_b1")
        b2 = b2 or _zeros_like_columns(w2, f"{out.name}_b2")
        why = is_internal(nodes, keep=[out])
        if why:
            return why
        width = const_array(w1).shape[1]
        return Site(self.kind, self.name, "FeedForward", nodes, [x, w1, b1, w2, b2], [out],
                    {"activation": activation}, {"activation": activation, "inner": width})


class SwiGLUPattern(Pattern):
    """down( silu(x Wg) * (x Wu) ), silu spelled x * Sigmoid(x)."""

    name = "swiglu"
    kind = "ffn"
    roots = ("Sigmoid",)

    def match(self, node, model):
        g = node.inputs[0]
        gate = producer(g, "MatMul")
        silu = only_user(node.outputs[0], "Mul")
        if gate is None or silu is None or g not in silu.inputs:
            return None
        x, w_gate = gate.inputs
        mul = only_user(silu.outputs[0], "Mul")
        if mul is None:
            return "SiLU output is not multiplied by an up projection"
        u = mul.inputs[1] if mul.inputs[0] is silu.outputs[0] else mul.inputs[0]
        up = producer(u, "MatMul")
        if up is None or up.inputs[0] is not x:
            return "up projection does not read the same input as the gate"
        down = only_user(mul.outputs[0], "MatMul")
        if down is None or down.inputs[0] is not mul.outputs[0]:
            return "gated product is not used by one down projection"
        if any(const_array(w) is None for w in (w_gate, up.inputs[1], down.inputs[1])):
            return "projection weights are not constant"
        nodes = [gate, node, silu, up, mul, down]
        why = is_internal(nodes, keep=[down.outputs[0]])
        if why:
            return why
        return Site(self.kind, self.name, "GatedFeedForward", nodes, [x, w_gate, up.inputs[1], down.inputs[1]],
                    [down.outputs[0]], {}, {"activation": "silu",
                                            "inner": const_array(w_gate).shape[1]})
