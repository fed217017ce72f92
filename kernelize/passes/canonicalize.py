"""Make the many export spellings of one computation converge before matching.

One pass over the graph applies local rules (each keeps results equal up to float
rounding); constant folding comes from onnxscript's optimizer.
"""

from __future__ import annotations

import collections
import logging
import math

import numpy as np
import onnx_ir as ir
from onnxscript import optimizer

from kernelize.graph import attr, clamp_index, const_array, only_user, producer, rank, same_shape, scalar_const, \
    shape_elements, static_dims
from kernelize.ops.base import add_initializer

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "And", "Or", "Equal", "Sum"}


def canonicalize(model: ir.Model) -> dict[str, int]:
    """Rewrite ``model`` in place; return how often each rule fired."""
    # Constant folding only: onnxscript's default rewrite rules re-scan the graph per match,
    # which grows quadratically with depth; the rules below cover what matching needs.
    # its notes (e.g. "Skipping constant folding for op LayerNormalization with multiple
    # outputs") are not the user's business and would break one-line errors
    logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)
    optimizer.fold_constants(model)
    counts: dict[str, int] = {}
    graph = model.graph
    folded = fold_static_shapes(graph)
    if folded:
        counts["fold_static_shapes"] = folded
        optimizer.fold_constants(model)  # what the now-constant shape values computed
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for node in list(graph):
        if node.graph is None:  # removed by an earlier rule
            continue
        for rule in RULES:
            if rule(graph, node):
                counts[rule.__name__] = counts.get(rule.__name__, 0) + 1
                break
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return counts


SHAPE_OPS = {"Shape", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Identity"}


def fold_static_shapes(graph: ir.Graph) -> int:
    """Shape arithmetic whose every element is a static dim -> a constant.

    The legacy exporter computes sizes at run time (``Gather(Shape(x), -1)`` for the head size
    DeBERTa divides by) even where the dim is static; constant folding needs the whole shape
    static, so a partly dynamic tensor's static dims stay hidden from the matchers otherwise.
    """
    folded = 0
    for node in list(graph):
        out = node.outputs[0] if node.op_type in SHAPE_OPS and len(node.outputs) == 1 else None
        if out is None or out.const_value is not None or out.dtype != ir.DataType.INT64 or rank(out) not in (0, 1):
            continue
        elements = shape_elements(out)
        if elements is None or not all(isinstance(e, int) for e in elements) or (rank(out) == 0 and len(elements) != 1):
            continue
        array = np.array(elements, np.int64).reshape(() if rank(out) == 0 else (-1,))
        constant = ir.Value(name=f"{out.name}_static", shape=ir.Shape(array.shape), type=out.type,
                            const_value=ir.tensor(array))
        add_initializer(graph, constant)
        if _bypass(graph, node, constant):
            folded += 1
    return folded


def _bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> bool:
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


def shape_from_inputs(graph: ir.Graph, node: ir.Node) -> bool:
    """Shape(x)[a:b] of a computed x, each dim static or one of a graph input's named dims ->
    those constants and Shape(input) slices: sizes stop being extra users of x (the legacy
    exporter's ``probs.view(-1, probs.size(-2), probs.size(-1))``), so x's one real user shows."""
    if node.op_type == "Gather":
        return _gathered_dim_from_inputs(graph, node)
    if node.op_type == "Slice":
        return _sliced_shape(graph, node)
    if node.op_type != "Shape" or node.inputs[0].is_graph_input() or rank(node.inputs[0]) is None:
        return False
    source = node.inputs[0]
    r = rank(source)
    start, end = (clamp_index(attr(node, k, d), r) for k, d in (("start", 0), ("end", r)))
    source_of = _input_dims(graph)
    pieces: list = []  # (input, start, end, factor) slices of an input's shape, or lists of ints
    for d in static_dims(source)[start:end]:
        if isinstance(d, int):
            if pieces and isinstance(pieces[-1], list):
                pieces[-1].append(d)
            else:
                pieces.append([d])
            continue
        found = source_of(d)
        if found is None:
            return False
        value, axis, factor = found
        last = pieces[-1] if pieces else None
        if isinstance(last, tuple) and last[0] is value and last[2] == axis and last[3] == factor == 1:
            pieces[-1] = (value, last[1], axis + 1, 1)
        else:
            pieces.append((value, axis, axis + 1, factor))
    if not pieces:
        return False
    parts = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, list):
            constant = ir.Value(name=f"{node.outputs[0].name}_dims_{i}",
                                const_value=ir.tensor(np.array(piece, np.int64)))
            parts.append(add_initializer(graph, constant))
            continue
        value, lo, hi, factor = piece
        new = [ir.Node("", "Shape", [value], attributes=[ir.AttrInt64("start", lo), ir.AttrInt64("end", hi)],
                       num_outputs=1)]
        if factor != 1:
            scale = ir.Value(name=f"{node.outputs[0].name}_factor_{i}", const_value=ir.tensor(np.array([factor])))
            new.append(ir.Node("", "Mul", [new[0].outputs[0], add_initializer(graph, scale)], num_outputs=1))
        for n in new:
            n.outputs[0].shape, n.outputs[0].type = ir.Shape([hi - lo]), node.outputs[0].type
        graph.insert_before(node, new)
        parts.append(new[-1].outputs[0])
    if len(parts) == 1 and parts[0].producer() is not None:
        return _bypass(graph, node, parts[0])
    concat = ir.Node("", "Concat", parts, attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
    concat.outputs[0].shape, concat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, [concat])
    return _bypass(graph, node, concat.outputs[0])


def _input_dims(graph: ir.Graph):
    """A lookup: a symbolic dim -> (graph input, axis, integer factor) it is, or None.

    Symbolic shape inference names dims after the inputs' (``batch``) and writes products with
    a constant as ``4*batch`` (BLOOM's heads merged into the batch axis)."""
    named = {}
    for value in graph.inputs:
        for axis, d in enumerate(static_dims(value) if rank(value) is not None else []):
            if isinstance(d, str):
                named.setdefault(d, (value, axis))

    def source_of(d):
        if not isinstance(d, str):
            return None
        if d in named:
            return (*named[d], 1)
        factors = d.replace(" ", "").split("*")
        numbers = [f for f in factors if f.isdigit()]
        names = [f for f in factors if not f.isdigit()]
        if len(names) == 1 and names[0] in named and len(numbers) == len(factors) - 1:
            return (*named[names[0]], int(np.prod([int(n) for n in numbers])))
        return None
    return source_of


def _sliced_shape(graph: ir.Graph, node: ir.Node) -> bool:
    """Slice(Shape(x), [a], [b]) along axis 0, step 1 -> Shape(x, start=a, end=b) (the same
    clamping), then taken from the inputs' dims where it can be."""
    shape = producer(node.inputs[0], "Shape")
    bounds = [const_array(v) if v is not None else None for v in node.inputs[1:]]
    if (shape is None or len(bounds) < 2 or any(b is None or b.size != 1 for b in bounds)
            or "start" in shape.attributes or "end" in shape.attributes):
        return False
    start, end, *rest = (int(b.reshape(-1)[0]) for b in bounds)
    if rest[:1] not in ([], [0]) or rest[1:] not in ([], [1]):  # axis 0, step 1
        return False
    sliced = ir.Node("", "Shape", [shape.inputs[0]], attributes=[ir.AttrInt64("start", start),
                                                                  ir.AttrInt64("end", min(end, 2 ** 62))],
                     num_outputs=1)
    sliced.outputs[0].shape, sliced.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, [sliced])
    _bypass(graph, node, sliced.outputs[0])
    shape_from_inputs(graph, sliced)
    _drop_if_unused(graph, shape)
    return True


def _drop_if_unused(graph: ir.Graph, node: ir.Node) -> None:
    """Remove a node nothing reads any more, now: its inputs' use counts are what later rules see."""
    if not any(v.uses() or v.is_graph_output() for v in node.outputs):
        graph.remove(node, safe=True)


def _gathered_dim_from_inputs(graph: ir.Graph, node: ir.Node) -> bool:
    """Gather(Shape(x), i) of one named dim of x -> Gather(Shape(input), k) [* factor] of it."""
    shape, index = producer(node.inputs[0], "Shape"), const_array(node.inputs[1])
    if shape is None or index is None or index.ndim != 0 or shape.inputs[0].is_graph_input():
        return False
    source = shape.inputs[0]
    r = rank(source)
    if r is None or attr(shape, "start", 0) != 0 or attr(shape, "end", r) not in (r, None):
        return False
    found = _input_dims(graph)(static_dims(source)[int(index) % r]) if -r <= int(index) < r else None
    if found is None:
        return False
    value, axis, factor = found
    new_shape = ir.Node("", "Shape", [value], num_outputs=1)
    new_shape.outputs[0].shape, new_shape.outputs[0].type = ir.Shape([rank(value)]), shape.outputs[0].type
    position = add_initializer(graph, ir.Value(name=f"{node.outputs[0].name}_axis",
                                               const_value=ir.tensor(np.array(axis, np.int64))))
    graph.insert_before(node, [new_shape])
    node.replace_input_with(0, new_shape.outputs[0])
    node.replace_input_with(1, position)
    _drop_if_unused(graph, shape)
    if factor == 1:
        return True
    scale = add_initializer(graph, ir.Value(name=f"{node.outputs[0].name}_factor",
                                            const_value=ir.tensor(np.array(factor, np.int64))))
    out = node.outputs[0]
    users = [(use.node, use.idx) for use in out.uses()]
    mul = ir.Node("", "Mul", [out, scale], num_outputs=1)
    mul.outputs[0].shape, mul.outputs[0].type = out.shape, out.type
    graph.insert_after(node, [mul])
    for user, idx in users:
        user.replace_input_with(idx, mul.outputs[0])
    if out.is_graph_output():
        ir.convenience.replace_all_uses_with(out, mul.outputs[0], replace_graph_outputs=True)
    return True


def gemm_to_matmul(graph: ir.Graph, node: ir.Node) -> bool:
    """Gemm(A, B, C) with constant B, alpha = beta = 1, no transA -> MatMul + Add."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return False
    if attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0 or attr(node, "transA", 0):
        return False
    weight = const_array(node.inputs[1])
    if weight is None:
        return False
    if attr(node, "transB", 0):
        name = f"{node.inputs[1].name}_t"
        b = graph.initializers.get(name)  # the same weight may feed several Gemms
        if b is None:
            b = add_initializer(graph, ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(weight.T))))
    else:
        b = node.inputs[1]
    matmul = ir.Node("", "MatMul", [node.inputs[0], b], num_outputs=1)
    new = [matmul]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        new.append(ir.Node("", "Add", [matmul.outputs[0], node.inputs[2]], num_outputs=1))
    out = node.outputs[0]
    graph.insert_before(node, new)
    result = new[-1].outputs[0]
    ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
    name = out.name
    graph.remove(node, safe=True)
    result.name, result.shape, result.type = name, out.shape, out.type
    return True


def softmax_nan_guard(graph: ir.Graph, node: ir.Node) -> bool:
    """Where(IsNaN(s), 0, s) after a Softmax -> s (rows that are all -inf excepted)."""
    if node.op_type != "Where":
        return False
    cond, fill, data = node.inputs
    isnan = producer(cond, "IsNaN")
    if isnan is None or isnan.inputs[0] is not data or producer(data, "Softmax") is None:
        return False
    fill_value = const_array(fill)
    if fill_value is None or fill_value.size != 1 or float(fill_value.reshape(())) != 0.0:
        return False
    return _bypass(graph, node, data)


def reshape_transpose_reshape(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape(Transpose(Reshape(x, [-1, a, b]), [0, 2, 1]), [..lead, b, a]) -> Transpose(x).

    The dynamo export spells K^T of a ``[B, H, S, D]`` tensor this way; the shapes are
    proven equal symbolically, not assumed.
    """
    if node.op_type != "Reshape":
        return False
    transpose = producer(node.inputs[0], "Transpose")
    if transpose is None or list(attr(transpose, "perm", [])) != [0, 2, 1]:
        return False
    inner = producer(transpose.inputs[0], "Reshape")
    if inner is None or len(transpose.inputs[0].uses()) != 1 or len(node.inputs[0].uses()) != 1:
        return False
    x = inner.inputs[0]
    r = rank(x)
    if r is None or r < 3:
        return False
    dims = static_dims(x)
    first, last = shape_elements(inner.inputs[1]), shape_elements(node.inputs[1])
    if first is None or last is None or len(first) != 3 or len(last) != r:
        return False
    if not (first[1:] == dims[-2:] and first[0] in (-1, *([dims[0]] if r == 3 else []))):
        return False
    if not same_shape(last, dims[:-2] + [dims[-1], dims[-2]], allowzero=True):
        return False
    perm = list(range(r - 2)) + [r - 1, r - 2]
    new = ir.Node("", "Transpose", [x], attributes=[ir.AttrInt64s("perm", perm)], num_outputs=1)
    graph.insert_before(node, [new])
    out = node.outputs[0]
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    return _bypass(graph, node, new.outputs[0])


def noop_reshape(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape whose target equals the input's shape (proven symbolically)."""
    if node.op_type != "Reshape" or node.inputs[0].shape is None:
        return False
    target = shape_elements(node.inputs[1])
    dims = static_dims(node.inputs[0])
    if target is not None and same_shape(target, dims, bool(attr(node, "allowzero", 0))):
        return _bypass(graph, node, node.inputs[0])
    return False


def noop_cast(graph: ir.Graph, node: ir.Node) -> bool:
    """Cast to the dtype the input already has, and Identity."""
    if node.op_type == "Identity":
        return _bypass(graph, node, node.inputs[0])
    if node.op_type != "Cast" or node.inputs[0].type is None:
        return False
    if attr(node, "to") == node.inputs[0].dtype.value:
        return _bypass(graph, node, node.inputs[0])
    return False


def split_key_transpose(graph: ir.Graph, node: ir.Node) -> bool:
    """Transpose(x, [0, 2, 3, 1]) of a ``[B, S, H, D]`` tensor into a MatMul -> head split
    Transpose(x, [0, 2, 1, 3]) then K^T Transpose([0, 1, 3, 2]) (eager attention's K^T)."""
    if node.op_type != "Transpose" or list(attr(node, "perm", [])) != [0, 2, 3, 1]:
        return False
    if not any(u.op_type == "MatMul" for u in [use.node for use in node.outputs[0].uses()]):
        return False
    split = ir.Node("", "Transpose", [node.inputs[0]], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])],
                    num_outputs=1)
    key_t = ir.Node("", "Transpose", [split.outputs[0]], attributes=[ir.AttrInt64s("perm", [0, 1, 3, 2])],
                    num_outputs=1)
    graph.insert_before(node, [split, key_t])
    out = node.outputs[0]
    key_t.outputs[0].shape, key_t.outputs[0].type = out.shape, out.type
    if node.inputs[0].shape is not None:
        d = node.inputs[0].shape
        split.outputs[0].shape = ir.Shape([d[0], d[2], d[1], d[3]])
        split.outputs[0].type = out.type
    return _bypass(graph, node, key_t.outputs[0])


def compose_transposes(graph: ir.Graph, node: ir.Node) -> bool:
    """Transpose(Transpose(x, p), q) -> Transpose(x, p[q]); the identity -> x (torch's packed
    in_proj spells K^T as two 3-D Transposes in a row)."""
    if node.op_type != "Transpose":
        return False
    inner = node.inputs[0].producer()
    if inner is None or inner.op_type != "Transpose":
        return False
    p, q = attr(inner, "perm", None), attr(node, "perm", None)
    if p is None or q is None or len(p) != len(q):
        return False
    perm = [int(p[i]) for i in q]
    if perm == list(range(len(perm))):
        return _bypass(graph, node, inner.inputs[0])
    composed = ir.Node("", "Transpose", [inner.inputs[0]], attributes=[ir.AttrInt64s("perm", perm)], num_outputs=1)
    graph.insert_before(node, [composed])
    composed.outputs[0].shape, composed.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    return _bypass(graph, node, composed.outputs[0])


def split_heads_then_transpose(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape(Transpose(t, [a, c, b]), [X, Y, p, q]) splitting only the leading axis, with
    b < c -> Transpose(Reshape(Transpose(t, [a, b, c]), [X, Y, q, p]), [0, 1, 3, 2]).

    torch's packed in_proj with static shapes spells K^T on merged heads as one 3-D
    Transpose([1, 2, 0]) of [n, B*H, d]; splitting B*H and swapping the last two axes commute,
    so this is K split into heads (the spelling of Q and V) and the K^T Transpose."""
    if node.op_type != "Reshape":
        return False
    transpose = producer(node.inputs[0], "Transpose")
    perm = [int(i) for i in attr(transpose, "perm", [])] if transpose is not None else []
    if len(perm) != 3 or perm[1] < perm[2] or len(node.inputs[0].uses()) != 1 or rank(node.outputs[0]) != 4:
        return False
    merged, out = static_dims(node.inputs[0]), static_dims(node.outputs[0])
    if not all(isinstance(d, int) for d in merged + out) or out[0] * out[1] != merged[0] or out[2:] != merged[1:]:
        return False
    split = ir.Node("", "Transpose", [transpose.inputs[0]],
                    attributes=[ir.AttrInt64s("perm", [perm[0], perm[2], perm[1]])], num_outputs=1)
    shape = ir.Value(name=f"{node.outputs[0].name}_heads_shape",
                     const_value=ir.tensor(np.array([out[0], out[1], out[3], out[2]], np.int64)))
    heads = ir.Node("", "Reshape", [split.outputs[0], add_initializer(graph, shape)], num_outputs=1)
    key_t = ir.Node("", "Transpose", [heads.outputs[0]], attributes=[ir.AttrInt64s("perm", [0, 1, 3, 2])],
                    num_outputs=1)
    dtype = node.outputs[0].type
    shapes = ([merged[0], merged[2], merged[1]], [out[0], out[1], out[3], out[2]], out)
    for n, dims in zip((split, heads, key_t), shapes):
        n.outputs[0].shape, n.outputs[0].type = ir.Shape(dims), dtype
    graph.insert_before(node, [split, heads, key_t])
    return _bypass(graph, node, key_t.outputs[0])


def flattened_matmul(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape(MatMul(Reshape(x, [-1, K]), W) [+ b], [*lead(x), N]) -> MatMul(x, W) [+ b].

    GPT-2's Conv1D (and Gemm exports) flatten the tokens around a 2-D product; a MatMul
    broadcasts over leading axes, so the reshapes cancel when the last one restores x's
    leading dims (proven symbolically).
    """
    if node.op_type != "Reshape" or len(node.inputs[0].uses()) != 1 or node.inputs[0].is_graph_output():
        return False
    bias = producer(node.inputs[0], "Add")  # an optional bias between product and reshape
    bias_value = const_array(bias.inputs[1]) if bias is not None else None
    if bias is not None and (bias_value is None or bias_value.ndim != 1):
        return False
    product = bias.inputs[0] if bias is not None else node.inputs[0]
    matmul = producer(product, "MatMul")
    if matmul is None or len(product.uses()) != 1:
        return False
    weight = const_array(matmul.inputs[1])
    flatten = producer(matmul.inputs[0], "Reshape")
    if weight is None or weight.ndim != 2 or flatten is None:
        return False
    x = flatten.inputs[0]
    if rank(x) is None or rank(x) < 3:
        return False
    dims = static_dims(x)
    first, last = shape_elements(flatten.inputs[1]), shape_elements(node.inputs[1])
    if first is None or last is None or len(first) != 2 or first[0] != -1:
        return False
    # the flatten keeps dims[:keep] as tokens and merges the rest into K (one or more axes)
    keep, width = len(dims) - 1, dims[-1]
    while width != first[1] and keep > 1 and isinstance(width, int) and isinstance(dims[keep - 1], int):
        keep -= 1
        width *= dims[keep]
    if width != first[1] or keep < 2:
        return False
    if not same_shape(last, dims[:keep] + [weight.shape[1]], allowzero=bool(attr(node, "allowzero", 0))):
        return False
    new = []
    if keep < len(dims) - 1:  # merge the trailing axes first: Reshape(x, [0, .., 0, -1])
        merge_shape = ir.Value(name=f"{node.outputs[0].name}_merge_shape",
                               const_value=ir.tensor(np.array([0] * keep + [-1], np.int64)))
        add_initializer(graph, merge_shape)
        new.append(ir.Node("", "Reshape", [x, merge_shape], num_outputs=1))
        x = new[-1].outputs[0]
        x.shape, x.type = ir.Shape([*list(flatten.inputs[0].shape)[:keep], first[1]]), flatten.inputs[0].type
    new.append(ir.Node("", "MatMul", [x, matmul.inputs[1]], num_outputs=1))
    if bias is not None:
        new.append(ir.Node("", "Add", [new[-1].outputs[0], bias.inputs[1]], num_outputs=1))
    graph.insert_before(node, new)
    out = node.outputs[0]
    for n in new:
        if n.op_type != "Reshape":
            n.outputs[0].shape, n.outputs[0].type = out.shape, out.type
    return _bypass(graph, node, new[-1].outputs[0])


def tanh_gelu(graph: ir.Graph, node: ir.Node) -> bool:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -> Gelu(x, approximate="tanh")."""
    if node.op_type != "Tanh":
        return False
    inner = producer(node.inputs[0], "Mul")
    if inner is None or not _close(scalar_const(inner.inputs[1]), math.sqrt(2.0 / math.pi)):
        return False
    poly = producer(inner.inputs[0], "Add")
    if poly is None:
        return False
    for i in (0, 1):
        x, cube_term = poly.inputs[i], poly.inputs[1 - i]
        scaled = producer(cube_term, "Mul")
        cube = producer(scaled.inputs[0], "Pow") if scaled is not None else None
        if (cube is not None and cube.inputs[0] is x and _close(scalar_const(cube.inputs[1]), 3.0)
                and _close(scalar_const(scaled.inputs[1]), 0.044715)):
            break
    else:
        return False
    plus_one = only_user(node.outputs[0], "Add")
    if plus_one is None or not _close(scalar_const(plus_one.inputs[1]), 1.0):
        return False
    outer = only_user(plus_one.outputs[0], "Mul")
    if outer is None:
        return False
    half = producer(outer.inputs[0], "Mul")
    if half is None or half.inputs[0] is not x or not _close(scalar_const(half.inputs[1]), 0.5):
        return False
    chain = [cube, scaled, poly, inner, node, plus_one, half]
    if any(len(n.outputs[0].uses()) != 1 or n.outputs[0].is_graph_output() for n in chain):
        return False
    gelu = ir.Node("", "Gelu", [x], attributes=[ir.AttrString("approximate", "tanh")], num_outputs=1)
    graph.insert_before(outer, [gelu])
    out = outer.outputs[0]
    gelu.outputs[0].shape, gelu.outputs[0].type = out.shape, out.type
    if not _bypass(graph, outer, gelu.outputs[0]):
        graph.remove(gelu)
        return False
    graph.remove(list(reversed(chain)), safe=True)
    return True


def _close(value: float | None, target: float) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=1e-4)


def div_to_mul(graph: ir.Graph, node: ir.Node) -> bool:
    """Div(x, c) with a scalar constant c -> Mul(x, 1/c): one spelling for scale factors."""
    if node.op_type != "Div":
        return False
    c = const_array(node.inputs[1])
    if c is None or c.size != 1 or c.dtype.kind != "f" or c.reshape(()) == 0:
        return False
    inv = ir.Value(name=f"{node.name or node.outputs[0].name}_reciprocal",
                   const_value=ir.tensor(np.asarray(1.0, c.dtype).reshape(c.shape) / c))
    add_initializer(graph, inv)
    mul = ir.Node("", "Mul", [node.inputs[0], inv], num_outputs=1)
    graph.insert_before(node, [mul])
    out = node.outputs[0]
    mul.outputs[0].shape, mul.outputs[0].type = out.shape, out.type
    return _bypass(graph, node, mul.outputs[0])


def constant_last(graph: ir.Graph, node: ir.Node) -> bool:
    """Commutative op with a constant first operand: put the constant second."""
    if node.op_type not in COMMUTATIVE or len(node.inputs) != 2 or node.domain not in ("", "ai.onnx"):
        return False
    a, b = node.inputs
    if const_array(a) is not None and const_array(b) is None:
        node.replace_input_with(0, b)
        node.replace_input_with(1, a)
        return True
    return False


# -- batched-head attention: [B * H, n, d] MatMuls -> [B, H, n, d] -----------------------------
# BLOOM (baddbmm/bmm) merges batch and heads into one axis around each attention product:
#   Reshape(MatMul(Reshape(A, [B*H, a, b]), Reshape(C, [B*H, b, c])) [* s] [+ t], [B, H, a, c])
# Merging the two leading axes, multiplying per merged batch and splitting them again is the
# 4-D batched MatMul(A, C) itself (row-major reshapes only regroup the leading axes). Every
# target shape is evaluated symbolically (products of dims included) and compared with A's and
# C's own dims; anything not proven leaves the graph as it is.


def _product(factors: list) -> tuple:
    """A product of dims as (integer coefficient, multiset of symbolic factors)."""
    coefficient, symbols = 1, collections.Counter()
    for f in factors:
        if isinstance(f, int):
            coefficient *= f
        else:
            symbols[f] += 1
    return coefficient, frozenset(symbols.items())


def _shape_products(value: ir.Value | None, depth: int = 0) -> list | None:
    """A 1-D int64 shape tensor as a list of :func:`_product` items, or None.

    Extends :func:`kernelize.graph.shape_elements` with ``Mul`` of one-element shape values
    (the exporter's ``batch * heads``) and Reshape of one-element values.
    """
    node = producer(value)
    if node is not None and depth < 16:
        if node.op_type == "Concat":
            parts = [_shape_products(v, depth + 1) for v in node.inputs]
            return None if any(p is None for p in parts) else [x for p in parts for x in p]
        if node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
            inner = _shape_products(node.inputs[0], depth + 1)
            return inner if inner is not None and len(inner) == 1 else None
        if node.op_type == "Slice" and len(node.inputs) >= 3:
            data = _shape_products(node.inputs[0], depth + 1)
            bounds = [const_array(v) if v is not None else None for v in node.inputs[1:]]
            if data is None or any(b is None or b.size != 1 for b in bounds):
                return None
            start, end, *rest = (int(b.reshape(-1)[0]) for b in bounds)
            if rest[:1] not in ([], [0], [-1]) or rest[1:] not in ([], [1]):
                return None
            return data[clamp_index(start, len(data)):clamp_index(end, len(data))]
        if node.op_type == "Gather" and const_array(node.inputs[1]) is not None:
            data, index = _shape_products(node.inputs[0], depth + 1), const_array(node.inputs[1])
            if data is None or not all(-len(data) <= int(i) < len(data) for i in index.reshape(-1)):
                return None
            return [data[int(i)] for i in index.reshape(-1)]
        if node.op_type == "Div":  # exact division of a coefficient (BLOOM's batch = (B*H) // H)
            a, b = (_shape_products(v, depth + 1) for v in node.inputs)
            if a is None or b is None or len(a) != 1 or len(b) != 1 or b[0][1] or b[0][0] <= 0 or a[0][0] < 0 \
                    or a[0][0] % b[0][0]:
                return None
            return [(a[0][0] // b[0][0], a[0][1])]
        if node.op_type == "Mul":
            a, b = (_shape_products(v, depth + 1) for v in node.inputs)
            if a is None or b is None or len(a) != 1 or len(b) != 1 or a[0][0] < 0 or b[0][0] < 0:
                return None
            return [(a[0][0] * b[0][0], frozenset((collections.Counter(dict(a[0][1]))
                                                   + collections.Counter(dict(b[0][1]))).items()))]
    elements = shape_elements(value)
    return None if elements is None else [_product([e]) for e in elements]


def _inferred_product(d):
    """An inferred dim as a :func:`_product`: ints, names, and ``c*name`` as symbolic shape
    inference writes a multiple; None for anything else (an unnamed dim)."""
    if isinstance(d, int):
        return _product([d])
    if not isinstance(d, str):
        return None
    factors = d.replace(" ", "").split("*")
    if len(factors) == 2 and factors[0].isdigit() and not factors[1].isdigit():
        return _product([int(factors[0]), factors[1]])
    return _product([d])


def _reshapes_to(reshape: ir.Node, wanted: list) -> bool:
    """Whether ``reshape``'s target is proven to be ``wanted`` (a list of factor lists);
    one -1 is accepted (inferred from the others), a 0 is not (it would copy a dim). A target
    computed by arithmetic this does not follow (a convolution stack's output length) is
    taken as symbolic shape inference gave the output, when every dim of it is named."""
    if attr(reshape, "allowzero", 0) not in (0, 1):
        return False
    target = _shape_products(reshape.inputs[1])
    if target is None and rank(reshape.outputs[0]) is not None:
        target = [_inferred_product(d) for d in static_dims(reshape.outputs[0])]
        target = None if None in target else target
    if target is None or len(target) != len(wanted):
        return False
    wild = 0
    for t, w in zip(target, wanted):
        if t == _product([-1]):
            wild += 1
        elif t != _product(w):
            return False
    return wild <= 1


def _merged_heads(value: ir.Value):
    """value = Reshape(x, [X*Y, p, q]) of a rank-4 x shaped [X, Y, p, q] -> x, else None."""
    reshape = producer(value, "Reshape")
    if reshape is None or rank(value) != 3:
        return None
    x = reshape.inputs[0]
    if rank(x) != 4:
        return None
    d = static_dims(x)
    return x if _reshapes_to(reshape, [[d[0], d[1]], [d[2]], [d[3]]]) else None


def _lift_bias(term: ir.Value, lead: list, new: list, a: ir.Value, merged) -> ir.Value | None:
    """A term added to [X*Y, p, q] scores, as a term added to [X, Y, p, q] scores, or None.

    ``a`` is the [X, Y, ...] left operand of the product, ``merged`` the product's leading dim.
    """
    r = rank(term)
    if r is None:
        return None
    dims = static_dims(term)
    if r < 3 or dims[0] == 1:  # it broadcasts over the merged axis: the same over X and Y
        return term
    reshape = producer(term, "Reshape")
    source = reshape.inputs[0] if reshape is not None else None
    if source is None or rank(source) not in (3, 4) or static_dims(source)[:2] != lead:
        return _split_merged(term, a, new) if r == 3 and dims[0] == merged else None
    s = static_dims(source)
    if rank(source) == 4 and _reshapes_to(reshape, [lead, [s[2]], [s[3]]]):
        return source  # Reshape([X, Y, p, q] -> [X*Y, p, q]) undone
    if rank(source) == 3 and _reshapes_to(reshape, [lead, [1], [s[2]]]):  # BLOOM's ALiBi [B, H, n]
        for user in source.uses():  # every layer adds the same term: lift it once
            done = user.node
            if (done.op_type == "Unsqueeze" and done.inputs[0] is source and len(done.inputs) > 1
                    and const_array(done.inputs[1]) is not None and const_array(done.inputs[1]).tolist() == [2]):
                return done.outputs[0]
        axes = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.array([2], np.int64)))],
                       num_outputs=1)
        axes.outputs[0].name = f"{term.name}_head_axis"
        new += [axes, ir.Node("", "Unsqueeze", [source, axes.outputs[0]], num_outputs=1)]
        lifted = new[-1].outputs[0]
        lifted.name = f"{term.name}_4d"
        lifted.shape, lifted.type = ir.Shape([*list(source.shape)[:2], 1, source.shape[2]]), source.type
        return lifted
    return None


def _split_merged(term: ir.Value, a: ir.Value, new: list) -> ir.Value:
    """A [X*Y, p, q] term computed in the merged layout (DeBERTa's relative-position scores)
    reshaped to [X, Y, p, q]; the row-major merge makes X*Y split back into a's X and Y."""
    lead, rest = static_dims(a)[:2], static_dims(term)[1:]
    if all(isinstance(d, int) for d in lead + rest):
        new.append(ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.array(lead + rest,
                                                                                                 np.int64)))],
                           num_outputs=1))
        shape = new[-1].outputs[0]
    else:
        parts = [ir.Node("", "Shape", [a], attributes=[ir.AttrInt64("start", 0), ir.AttrInt64("end", 2)],
                         num_outputs=1),
                 ir.Node("", "Shape", [term], attributes=[ir.AttrInt64("start", 1), ir.AttrInt64("end", 3)],
                         num_outputs=1)]
        concat = ir.Node("", "Concat", [p.outputs[0] for p in parts], attributes=[ir.AttrInt64("axis", 0)],
                         num_outputs=1)
        new += [*parts, concat]
        for n, size in zip((*parts, concat), (2, 2, 4)):
            n.outputs[0].shape, n.outputs[0].type = ir.Shape([size]), ir.TensorType(ir.DataType.INT64)
        shape = concat.outputs[0]
    new.append(ir.Node("", "Reshape", [term, shape], num_outputs=1))
    lifted = new[-1].outputs[0]
    lifted.name = f"{term.name}_4d"
    lifted.shape, lifted.type = ir.Shape([*list(a.shape)[:2], *list(term.shape)[1:]]), term.type
    return lifted


def _reaches_product(value: ir.Value, depth: int = 0) -> bool:
    """Whether ``value`` is a rank-3 MatMul, possibly scaled by constants and with terms added."""
    step = producer(value)
    if step is None or depth > 8 or rank(value) != 3:
        return False
    if step.op_type == "MatMul":
        return True
    if step.op_type == "Mul" and scalar_const(step.inputs[1]) is not None:
        return _reaches_product(step.inputs[0], depth + 1)
    return step.op_type == "Add" and any(_reaches_product(v, depth + 1) for v in step.inputs)


def _scaled(value: ir.Value):
    """value = Mul(x, scalar constant) used once -> (x, the constant's value), else (value, None)."""
    mul = producer(value, "Mul")
    if mul is None or scalar_const(mul.inputs[1]) is None or len(value.uses()) != 1 or value.is_graph_output():
        return value, None
    return mul.inputs[0], mul.inputs[1]


def _lift_product(value: ir.Value, check_start: bool = True):
    """``value`` = MatMul(merge(A), merge(C) or Transpose(merge(K), [0, 2, 1])) [* s | + t]...
    on [X*Y, ...] tensors -> (new nodes computing it on [X, Y, ...], A, columns), else None.

    ``merge(x)`` is Reshape([X, Y, p, q] -> [X*Y, p, q]); ``s`` a scalar constant (also on an
    operand); ``t`` a term that broadcasts over the merged axis or is lifted to 4-D. The inner
    dimension of the product is the original MatMul's own (checked by it)."""
    chain, first = [], True
    while True:  # walk back over scalar scales and added terms to the product
        step = producer(value)
        if step is None or ((check_start or not first) and (len(value.uses()) != 1 or value.is_graph_output())):
            return None
        first = False
        if step.op_type == "MatMul":
            break
        if step.op_type == "Mul" and scalar_const(step.inputs[1]) is not None:
            chain.append((step, 0))
        elif step.op_type == "Add" and _reaches_product(step.inputs[0]):
            chain.append((step, 0))
        elif step.op_type == "Add" and _reaches_product(step.inputs[1]):
            chain.append((step, 1))
        else:
            return None
        value = step.inputs[chain[-1][1]]
    matmul = step
    (left, left_scale), (right, right_scale) = (_scaled(v) for v in matmul.inputs)
    if left_scale is not None or right_scale is not None:  # scalar factors on an operand (DeBERTa's K / sqrt(3d))
        chain.append((matmul, left_scale, right_scale))
    a = _merged_heads(left)
    transpose = producer(right, "Transpose")
    if transpose is not None and list(attr(transpose, "perm", [])) == [0, 2, 1]:
        c, transposed = _merged_heads(transpose.inputs[0]), True
    else:
        c, transposed = _merged_heads(right), False
    if a is None or c is None:
        return None
    da, dc = static_dims(a), static_dims(c)
    lead = da[:2]
    if dc[:2] != lead:
        return None
    columns = dc[2] if transposed else dc[3]
    new: list[ir.Node] = []
    if transposed:
        new.append(ir.Node("", "Transpose", [c], attributes=[ir.AttrInt64s("perm", [0, 1, 3, 2])], num_outputs=1))
        k, c = c, new[-1].outputs[0]
        c.shape, c.type = ir.Shape([k.shape[0], k.shape[1], k.shape[3], k.shape[2]]), k.type
    out_shape = ir.Shape([*list(a.shape)[:3], list(c.shape)[3]])
    new.append(ir.Node("", "MatMul", [a, c], num_outputs=1))
    merged = static_dims(matmul.outputs[0])[0]
    for step, *sides in reversed(chain):
        previous = new[-1].outputs[0]
        if step.op_type == "MatMul":  # the operands' scales, moved onto the product
            for factor in (f for f in sides if f is not None):
                new.append(ir.Node("", "Mul", [new[-1].outputs[0], factor], num_outputs=1))
        elif step.op_type == "Mul":
            new.append(ir.Node("", "Mul", [previous, step.inputs[1]], num_outputs=1))
        else:
            term = _lift_bias(step.inputs[1 - sides[0]], lead, new, a, merged)
            if term is None:
                return None
            new.append(ir.Node("", "Add", [previous, term], num_outputs=1))
    for n in new:
        if n.op_type in ("MatMul", "Mul", "Add"):
            n.outputs[0].shape, n.outputs[0].type = out_shape, matmul.outputs[0].type
    return new, a, columns


def batched_head_attention(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape(product on merged heads, [X, Y, a, c]) -> the product on [X, Y, ...] (see
    :func:`_lift_product`; BLOOM's baddbmm, DeBERTa's bmm)."""
    if node.op_type != "Reshape" or rank(node.inputs[0]) != 3 or rank(node.outputs[0]) != 4:
        return False
    lifted = _lift_product(node.inputs[0])
    if lifted is None:
        return False
    new, a, columns = lifted
    da = static_dims(a)
    if not _reshapes_to(node, [[da[0]], [da[1]], [da[2]], [columns]]):
        return False
    graph.insert_before(node, new)
    return _bypass(graph, node, new[-1].outputs[0])


def _merge_back(graph: ir.Graph, value4: ir.Value, like: ir.Value, new: list) -> ir.Value:
    """Reshape([X, Y, p, q] -> [X*Y, p, q]) of ``value4``, shaped as ``like``."""
    tail = ir.Node("", "Shape", [value4], attributes=[ir.AttrInt64("start", 2)], num_outputs=1)
    minus_one = add_initializer(graph, ir.Value(name=f"{like.name}_merged_lead",
                                                const_value=ir.tensor(np.array([-1], np.int64))))
    shape = ir.Node("", "Concat", [minus_one, tail.outputs[0]], attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
    merge = ir.Node("", "Reshape", [value4, shape.outputs[0]], num_outputs=1)
    for n, dims in ((tail, [2]), (shape, [3])):
        n.outputs[0].shape, n.outputs[0].type = ir.Shape(dims), ir.TensorType(ir.DataType.INT64)
    merge.outputs[0].shape, merge.outputs[0].type = like.shape, like.type
    new += [tail, shape, merge]
    return merge.outputs[0]


def merged_heads_softmax(graph: ir.Graph, node: ir.Node) -> bool:
    """Softmax(product on merged heads [X*Y, n, m]) -> merge(Softmax(the product on
    [X, Y, n, m])): torch's functional multi-head attention (WavLM) never leaves the merged
    layout; the 4-D softmax is what the attention pattern takes."""
    if node.op_type != "Softmax" or rank(node.inputs[0]) != 3 or attr(node, "axis", -1) not in (-1, 2):
        return False
    lifted = _lift_product(node.inputs[0])
    if lifted is None:
        return False
    new, _, _ = lifted
    softmax = ir.Node("", "Softmax", [new[-1].outputs[0]], attributes=[ir.AttrInt64("axis", -1)], num_outputs=1)
    softmax.outputs[0].shape, softmax.outputs[0].type = new[-1].outputs[0].shape, node.outputs[0].type
    new.append(softmax)
    merged = _merge_back(graph, softmax.outputs[0], node.outputs[0], new)
    graph.insert_before(node, new)
    return _bypass(graph, node, merged)


def merged_heads_output(graph: ir.Graph, node: ir.Node) -> bool:
    """MatMul(merge(P), merge(V)) with P a softmax -> merge(MatMul(P, V)): the probabilities'
    product with V on [X, Y, n, d], merged back for the model's own head merge."""
    if node.op_type != "MatMul" or rank(node.outputs[0]) != 3:
        return False
    p = _merged_heads(node.inputs[0])
    users = [u.node for u in node.outputs[0].uses()]
    if p is None or producer(p, "Softmax") is None or (len(users) == 1 and users[0].op_type == "Reshape"
                                                       and rank(users[0].outputs[0]) == 4):
        return False  # not the attention output, or batched_head_attention's case
    lifted = _lift_product(node.outputs[0], check_start=False)
    if lifted is None:
        return False
    new, _, _ = lifted
    merged = _merge_back(graph, new[-1].outputs[0], node.outputs[0], new)
    graph.insert_before(node, new)
    return _bypass(graph, node, merged)


def split_merged_heads(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape(x [n, B, E] -> [n, B*H, d]) read by a Transpose -> Reshape(Reshape(x, [n, B, H, d]),
    [n, B*H, d]): the same values, with the 4-D [n, B, H, d] tensor made explicit for
    :func:`transpose_merged_heads` (torch's functional multi-head attention)."""
    if node.op_type != "Reshape" or rank(node.inputs[0]) != 3 or rank(node.outputs[0]) != 3:
        return False
    users = [u.node for u in node.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "Transpose" or [int(i) for i in attr(users[0], "perm", [])] not in (
            [1, 0, 2], [1, 2, 0]):
        return False
    x = node.inputs[0]
    dims, target = static_dims(x), _shape_products(node.inputs[1])
    if target is None:  # a length computed by the convolution stack's arithmetic: as inferred
        target = [_inferred_product(d) for d in static_dims(node.outputs[0])]
    if None in target or len(target) != 3 or not isinstance(dims[2], int) or target[0] != _product([dims[0]]):
        return False
    head_size, (coefficient, symbols) = target[2], target[1]
    lead = _product([dims[1]])
    if head_size[1] or head_size[0] <= 0 or dims[2] % head_size[0] or symbols != lead[1] or lead[0] <= 0 \
            or coefficient % lead[0]:
        return False
    heads, d = coefficient // lead[0], head_size[0]
    if heads * d != dims[2] or heads < 2:
        return False
    split_shape = add_initializer(graph, ir.Value(name=f"{node.outputs[0].name}_heads",
                                                  const_value=ir.tensor(np.array([0, 0, heads, d], np.int64))))
    split = ir.Node("", "Reshape", [x, split_shape], num_outputs=1)  # 0 copies n and B
    split.outputs[0].shape, split.outputs[0].type = ir.Shape([x.shape[0], x.shape[1], heads, d]), x.type
    merge = ir.Node("", "Reshape", [split.outputs[0], node.inputs[1]], num_outputs=1)
    merge.outputs[0].shape, merge.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, [split, merge])
    return _bypass(graph, node, merge.outputs[0])


def transpose_merged_heads(graph: ir.Graph, node: ir.Node) -> bool:
    """Transpose(Reshape(x [n, B, H, d] -> [n, B*H, d]), [1, 0, 2] or [1, 2, 0]) ->
    merge(Transpose(x, [1, 2, 0, 3])) [then its K^T Transpose([0, 1, 3, 2])]: heads split
    into [B, H, n, d] before the merged layout is taken again."""
    if node.op_type != "Transpose":
        return False
    perm = [int(i) for i in attr(node, "perm", [])]
    reshape = producer(node.inputs[0], "Reshape")
    if perm not in ([1, 0, 2], [1, 2, 0]) or reshape is None or len(node.inputs[0].uses()) != 1:
        return False
    x = reshape.inputs[0]
    if rank(x) != 4 or rank(node.inputs[0]) != 3:
        return False
    dx = static_dims(x)
    if not _reshapes_to(reshape, [[dx[0]], [dx[1], dx[2]], [dx[3]]]):
        return False
    new = [ir.Node("", "Transpose", [x], attributes=[ir.AttrInt64s("perm", [1, 2, 0, 3])], num_outputs=1)]
    s = list(x.shape)
    new[0].outputs[0].shape, new[0].outputs[0].type = ir.Shape([s[1], s[2], s[0], s[3]]), x.type
    if perm == [1, 2, 0]:
        new.append(ir.Node("", "Transpose", [new[0].outputs[0]], attributes=[ir.AttrInt64s("perm", [0, 1, 3, 2])],
                           num_outputs=1))
        new[1].outputs[0].shape, new[1].outputs[0].type = ir.Shape([s[1], s[2], s[3], s[0]]), x.type
    merged = _merge_back(graph, new[-1].outputs[0], node.outputs[0], new)
    graph.insert_before(node, new)
    return _bypass(graph, node, merged)


RULES = [shape_from_inputs, gemm_to_matmul, softmax_nan_guard, reshape_transpose_reshape, noop_reshape, noop_cast,
         split_key_transpose, compose_transposes, split_heads_then_transpose, split_merged_heads, transpose_merged_heads,
         flattened_matmul, batched_head_attention, merged_heads_softmax, merged_heads_output, tanh_gelu, div_to_mul,
         constant_last]
