"""Attention computed with the heads merged into the batch axis, proven back to 4-D.

BLOOM (baddbmm/bmm), DeBERTa, the legacy exporter's bmm and torch's functional multi-head
attention (WavLM) compute attention on ``[B*H, n, d]`` tensors. The rules here make the
``[B, H, n, d]`` form explicit, each proving its reshapes symbolically (see below); they
run among the canonicalization rules of :mod:`kernelize.passes.canonicalize`.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from kernelize.graph import attr, bypass, clamp_index, const_array, producer, rank, scalar_const, shape_elements, \
    static_dims
from kernelize.ops.base import add_initializer


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
    return bypass(graph, node, new[-1].outputs[0])


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
    return bypass(graph, node, merged)


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
    return bypass(graph, node, merged)


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
    return bypass(graph, node, merge.outputs[0])


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
    return bypass(graph, node, merged)
