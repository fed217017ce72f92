"""Small, shared queries on an ``onnx_ir`` graph used by passes and patterns.

Everything here reads the graph; nothing here changes it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir


def producer(value: ir.Value | None, op_type: str | Sequence[str] | None = None) -> ir.Node | None:
    """The node producing ``value`` if it is a default-domain node of ``op_type``."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if op_type is None:
        return node
    types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
    return node if node.op_type in types else None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant held by ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def scalar_const(value: ir.Value | None) -> float | None:
    """``value`` as a Python float if it is a constant with exactly one element."""
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def users(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def only_user(value: ir.Value, op_type: str | None = None) -> ir.Node | None:
    """The single consumer of ``value`` (of ``op_type``), if the value is no graph output."""
    found = users(value)
    if len(found) != 1 or value.is_graph_output():
        return None
    node = found[0]
    if op_type is not None and (node.op_type != op_type or node.domain not in ("", "ai.onnx")):
        return None
    return node


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def is_internal(nodes: Iterable[ir.Node], keep: Iterable[ir.Value]) -> str | None:
    """Why the nodes cannot be removed as one unit, or None when they can.

    Every output of every node must be used only inside ``nodes``, except the values in
    ``keep`` (the outputs the replacement takes over).
    """
    node_set = set(nodes)
    keep_set = set(keep)
    for node in node_set:
        for out in node.outputs:
            if out in keep_set:
                continue
            if out.is_graph_output():
                return f"intermediate value {out.name!r} is a graph output"
            for use in out.uses():
                if use.node not in node_set:
                    return f"intermediate value {out.name!r} is also used by {use.node.op_type} outside the match"
    return None


class Dim:
    """Symbolic dimension ``axis`` of ``value`` (resolved at run time)."""

    __slots__ = ("value", "axis")

    def __init__(self, value: ir.Value, axis: int):
        self.value, self.axis = value, axis

    def __eq__(self, other):
        return isinstance(other, Dim) and other.value is self.value and other.axis == self.axis

    def __hash__(self):
        return hash((id(self.value), self.axis))

    def __repr__(self):
        return f"{self.value.name}[{self.axis}]"


def shape_elements(value: ir.Value | None, depth: int = 0) -> list | None:
    """Evaluate a 1-D int64 shape tensor symbolically.

    Returns a list whose items are ints or :class:`Dim`, or None when the value is not
    built from constants and ``Shape`` slices by Slice/Concat/Squeeze/Unsqueeze/Gather.
    """
    if value is None or depth > 16:
        return None
    array = const_array(value)
    if array is not None:
        return [int(x) for x in array.reshape(-1)] if array.ndim <= 1 else None
    node = producer(value)
    if node is None:
        return None
    op = node.op_type
    if op == "Shape":
        source = node.inputs[0]
        r = rank(source)
        if r is None:
            return None
        start, end = attr(node, "start", 0), attr(node, "end", r)
        start, end = clamp_index(start, r), clamp_index(end, r)
        dims = static_dims(source)
        return dims[start:end]
    if op == "Concat":
        parts = [shape_elements(v, depth + 1) for v in node.inputs]
        if any(p is None for p in parts):
            return None
        return [x for p in parts for x in p]
    if op in ("Squeeze", "Unsqueeze", "Identity"):
        return shape_elements(node.inputs[0], depth + 1)
    if op == "Slice":
        data = shape_elements(node.inputs[0], depth + 1)
        starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if data is None or starts is None or ends is None:
            return None
        if (axes is not None and list(axes.reshape(-1)) not in ([0], [-1])) or (
            steps is not None and list(steps.reshape(-1)) != [1]
        ):
            return None
        n = len(data)
        s, e = clamp_index(int(starts.reshape(-1)[0]), n), clamp_index(int(ends.reshape(-1)[0]), n)
        return data[s:e]
    if op == "Gather":
        data = shape_elements(node.inputs[0], depth + 1)
        idx = const_array(node.inputs[1])
        if data is None or idx is None:
            return None
        return [data[int(i)] for i in idx.reshape(-1)]
    return None


def clamp_index(index: int, n: int) -> int:
    """A Slice or Shape bound (negative from the end) clamped into [0, n]."""
    if index < 0:
        index += n
    return max(0, min(index, n))


def static_dims(value: ir.Value) -> list:
    """``value``'s shape as ints, symbolic names (str) or :class:`Dim` for unnamed axes."""
    out = []
    for i, d in enumerate(value.shape):
        if isinstance(d, int):
            out.append(d)
        elif getattr(d, "value", None):
            out.append(str(d.value))
        else:
            out.append(Dim(value, i))
    return out


def same_shape(target: list, dims: list, allowzero: bool = False) -> bool:
    """Whether a Reshape to ``target`` of a tensor shaped ``dims`` keeps that shape.

    ``0`` copies the input dim (unless ``allowzero``); one ``-1`` is inferred, so it
    matches when every other position matches.
    """
    if len(target) != len(dims):
        return False
    wild = 0
    for t, d in zip(target, dims):
        if t == d or (t == 0 and not allowzero):
            continue
        if t == -1:
            wild += 1
            continue
        return False
    return wild <= 1


def bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> bool:
    """Let the users of ``node``'s output read ``replacement``; drop the node if unused."""
    out = node.outputs[0]
    if out.is_graph_output():
        # the replacement takes over the output's role and name, unless it has a role already
        if replacement.is_graph_input() or replacement.is_graph_output() or replacement.is_initializer():
            return False
        ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
        name = out.name
        graph.remove(node, safe=True)
        replacement.name = name
        return True
    ir.convenience.replace_all_uses_with(out, replacement)
    graph.remove(node, safe=True)
    return True
