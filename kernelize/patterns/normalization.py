"""Normalization: LayerNorm (decomposed or the standard op), RMSNorm, residual + norm.

Phase 0 turns a decomposed LayerNorm into the standard ``LayerNormalization`` and a
decomposed RMSNorm into ``kernelize.RMSNorm``; phase 1 folds the residual Add in front of a
LayerNormalization into ``kernelize.SkipLayerNorm``.
"""

from __future__ import annotations

import onnx_ir as ir

from kernelize.graph import attr, const_array, is_internal, only_user, producer, rank, scalar_const
from kernelize.patterns.site import Pattern, Site


def _mean_over_last_axis(node: ir.Node) -> bool:
    """ReduceMean over exactly the last axis, keeping dims (opset 18+: axes as input)."""
    r = rank(node.inputs[0])
    if r is None or not attr(node, "keepdims", 1):
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        arr = const_array(node.inputs[1])
        axes = None if arr is None else [int(a) for a in arr.reshape(-1)]
    return axes is not None and len(axes) == 1 and axes[0] in (-1, r - 1)


def _is_square(node: ir.Node | None, x: ir.Value) -> bool:
    if node is None:
        return False
    if node.op_type == "Pow":
        return node.inputs[0] is x and scalar_const(node.inputs[1]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is x and node.inputs[1] is x


def _normalized(mean_node_out: ir.Value, numerator: ir.Value, nodes: list):
    """Find y = numerator / sqrt(mean + eps) among the users; -> (y value, eps)."""
    add = only_user(mean_node_out, "Add")
    if add is not None and scalar_const(add.inputs[1]) is not None:
        sqrt, eps = only_user(add.outputs[0], "Sqrt"), scalar_const(add.inputs[1])
        nodes.append(add)
    else:  # no epsilon (I-BERT's float path divides by sqrt(var) itself)
        sqrt, eps = only_user(mean_node_out, "Sqrt"), 0.0
    if sqrt is None:
        return None
    nodes.append(sqrt)
    div = only_user(sqrt.outputs[0], "Div")
    if div is not None and div.inputs[0] is numerator:
        nodes.append(div)
        return div.outputs[0], eps
    recip = only_user(sqrt.outputs[0], "Reciprocal")
    if recip is None and div is not None and div.inputs[1] is sqrt.outputs[0] and scalar_const(div.inputs[0]) == 1.0:
        recip = div  # 1 / sqrt(...) as a Div (the legacy exporter's rsqrt)
    if recip is not None:
        mul = only_user(recip.outputs[0], "Mul")
        if mul is not None and numerator in mul.inputs:
            nodes += [recip, mul]
            return mul.outputs[0], eps
    return None


def _affine(y: ir.Value, nodes: list):
    """Optional Mul(y, gamma) then Add(., beta) with constant 1-D parameters."""
    gamma = beta = None
    out = y
    mul = only_user(out, "Mul")
    if mul is not None and mul.inputs[0] is out and const_array(mul.inputs[1]) is not None:
        gamma, out = mul.inputs[1], mul.outputs[0]
        nodes.append(mul)
        add = only_user(out, "Add")
        if add is not None and add.inputs[0] is out and const_array(add.inputs[1]) is not None:
            beta, out = add.inputs[1], add.outputs[0]
            nodes.append(add)
    return gamma, beta, out


class DecomposedLayerNorm(Pattern):
    """mean -> x - mean -> mean(square) -> + eps -> sqrt -> divide -> * gamma + beta."""

    name = "layer_norm_decomposed"
    kind = "normalization"
    roots = ("ReduceMean",)
    phase = 0

    def match(self, node, model):
        x = node.inputs[0]
        if not _mean_over_last_axis(node):
            return None
        sub = only_user(node.outputs[0], "Sub")
        if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not node.outputs[0]:
            return None
        centered = sub.outputs[0]
        square = next((u.node for u in centered.uses() if _is_square(u.node, centered)), None)
        if square is None:
            return "centered value is not squared (Pow 2 or Mul)"
        var = only_user(square.outputs[0], "ReduceMean")
        if var is None or not _mean_over_last_axis(var):
            return "variance is not a ReduceMean over the last axis"
        nodes = [node, sub, square, var]
        found = _normalized(var.outputs[0], centered, nodes)
        if found is None:
            return "no (x - mean) / sqrt(var + eps)"
        y, eps = found
        gamma, beta, out = _affine(y, nodes)
        if gamma is None:
            return "no constant scale after the normalization"
        why = is_internal(nodes, keep=[out])
        if why:
            return why
        return Site(self.kind, self.name, "onnx::LayerNormalization", nodes, [x, gamma, beta], [out],
                    {"axis": -1, "epsilon": eps, "stash_type": 1}, {"epsilon": eps, "decomposed": True})


class DecomposedRMSNorm(Pattern):
    """x * 1/sqrt(mean(x^2) + eps) * weight (Llama, T5; casts removed by canonicalize)."""

    name = "rms_norm"
    kind = "normalization"
    roots = ("ReduceMean",)
    phase = 0

    def match(self, node, model):
        square = producer(node.inputs[0], ("Pow", "Mul"))
        if square is None or not _mean_over_last_axis(node):
            return None
        x = square.inputs[0]
        if not _is_square(square, x):
            return None
        nodes = [square, node]
        found = _normalized(node.outputs[0], x, nodes)
        if found is None:
            return "no x / sqrt(mean(x^2) + eps)"
        y, eps = found
        mul = only_user(y, "Mul")
        weight = None
        if mul is not None:
            w = mul.inputs[1] if mul.inputs[0] is y else mul.inputs[0]
            if const_array(w) is not None:
                weight = w
                nodes.append(mul)
        if weight is None:
            return "RMSNorm without a constant weight"
        out = nodes[-1].outputs[0]
        why = is_internal(nodes, keep=[out])
        if why:
            return why
        return Site(self.kind, self.name, "RMSNorm", nodes, [x, weight], [out],
                    {"epsilon": eps}, {"epsilon": eps})


class SkipLayerNormPattern(Pattern):
    """Add(a, b) -> LayerNormalization(last axis): the residual add joins the norm."""

    name = "skip_layer_norm"
    kind = "normalization"
    roots = ("LayerNormalization",)

    def match(self, node, model):
        r = rank(node.inputs[0])
        if r is None or attr(node, "axis", -1) not in (-1, r - 1):
            return "LayerNormalization not over the last axis"
        eps = attr(node, "epsilon", 1e-5)
        gamma = node.inputs[1]
        beta = node.inputs[2] if len(node.inputs) > 2 else None
        add = producer(node.inputs[0], "Add")
        info = {"epsilon": eps}
        if add is None or any(const_array(v) is not None for v in add.inputs):
            return Site(self.kind, "layer_norm", "onnx::LayerNormalization", [], [], [node.outputs[0]], {},
                        {**info, "residual": False, "note": "already the fused standard op"})
        # The operand that ends in a constant bias Add is "input" (its bias can fold).
        first = 0
        for i in (0, 1):
            p = producer(add.inputs[i], "Add")
            if p is not None and const_array(p.inputs[1]) is not None:
                first = i
                break
        x, skip = add.inputs[first], add.inputs[1 - first]
        return Site(self.kind, self.name, "SkipLayerNorm", [add, node], [x, skip, gamma, beta],
                    [node.outputs[0], add.outputs[0]], {"epsilon": eps}, {**info, "residual": True})
