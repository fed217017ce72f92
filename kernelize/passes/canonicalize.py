"""Make the many export spellings of one computation converge before matching.

One pass over the graph applies local rules (each keeps results equal up to float
rounding); constant folding comes from onnxscript's optimizer.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir
from onnxscript import optimizer

from kernelize.graph import attr, bypass, clamp_index, const_array, only_user, producer, rank, same_shape, scalar_const, \
    shape_elements, static_dims
from kernelize.ops.base import add_initializer
from kernelize.passes.merged_heads import batched_head_attention, merged_heads_output, merged_heads_softmax, \
    split_merged_heads, transpose_merged_heads

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
        if bypass(graph, node, constant):
            folded += 1
    return folded


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
        return bypass(graph, node, parts[0])
    concat = ir.Node("", "Concat", parts, attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
    concat.outputs[0].shape, concat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, [concat])
    return bypass(graph, node, concat.outputs[0])


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
    bypass(graph, node, sliced.outputs[0])
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
    return bypass(graph, node, data)


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
    return bypass(graph, node, new.outputs[0])


def noop_reshape(graph: ir.Graph, node: ir.Node) -> bool:
    """Reshape whose target equals the input's shape (proven symbolically)."""
    if node.op_type != "Reshape" or node.inputs[0].shape is None:
        return False
    target = shape_elements(node.inputs[1])
    dims = static_dims(node.inputs[0])
    if target is not None and same_shape(target, dims, bool(attr(node, "allowzero", 0))):
        return bypass(graph, node, node.inputs[0])
    return False


def noop_cast(graph: ir.Graph, node: ir.Node) -> bool:
    """Cast to the dtype the input already has, and Identity."""
    if node.op_type == "Identity":
        return bypass(graph, node, node.inputs[0])
    if node.op_type != "Cast" or node.inputs[0].type is None:
        return False
    if attr(node, "to") == node.inputs[0].dtype.value:
        return bypass(graph, node, node.inputs[0])
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
    return bypass(graph, node, key_t.outputs[0])


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
        return bypass(graph, node, inner.inputs[0])
    composed = ir.Node("", "Transpose", [inner.inputs[0]], attributes=[ir.AttrInt64s("perm", perm)], num_outputs=1)
    graph.insert_before(node, [composed])
    composed.outputs[0].shape, composed.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    return bypass(graph, node, composed.outputs[0])


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
    return bypass(graph, node, key_t.outputs[0])


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
    return bypass(graph, node, new[-1].outputs[0])


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
    if not bypass(graph, outer, gelu.outputs[0]):
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
    return bypass(graph, node, mul.outputs[0])


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


RULES = [shape_from_inputs, gemm_to_matmul, softmax_nan_guard, reshape_transpose_reshape, noop_reshape, noop_cast,
         split_key_transpose, compose_transposes, split_heads_then_transpose, split_merged_heads, transpose_merged_heads,
         flattened_matmul, batched_head_attention, merged_heads_softmax, merged_heads_output, tanh_gelu, div_to_mul,
         constant_last]
