"""Attention: softmax(Q K^T * scale + mask) V, and the whole multi-head block around it.

Anchored at the Softmax. Walking back from it collects the mask (additive, or boolean
through Where), every scalar scale factor (on Q, on K^T, or on the scores), the Q·K^T
MatMul and the K^T Transpose, whose permutation is checked. When Q, K and V each come from
a projection and head split, and the output goes through the head merge, the site covers
the whole block (``kernelize.MultiHeadAttention``); otherwise it is the core
(``kernelize.Attention``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from kernelize.graph import attr, const_array, is_internal, only_user, producer, rank, scalar_const, \
    shape_elements, static_dims, same_shape
from kernelize.patterns.site import Pattern, Site


class AttentionPattern(Pattern):
    name = "attention"
    kind = "attention"
    roots = ("Softmax",)

    def match(self, softmax: ir.Node, model: ir.Model):
        core = self.core(softmax, model)
        if isinstance(core, str) or core is None:
            return core
        q, k, v, bias = core.inputs
        if core.info.get("key_layout") == "[batch, seq, heads, head_size]":
            core.info["projections"] = "not fused: K^T is taken from the [batch, seq, heads, head_size] layout"
            return core
        block = _multi_head_block(q, k, v, core.outputs[0])
        if not isinstance(block, str):
            inputs, out, block_nodes, heads = block
            block = is_internal(core.nodes + block_nodes, keep=[out]) or block
        if isinstance(block, str):  # only the core: Q, K, V already split into heads
            core.info["projections"] = f"not fused: {block}"
            return core
        info = {**core.info, "projections": "fused", "heads": heads}
        return Site(self.kind, "multi_head_attention", "MultiHeadAttention", core.nodes + block_nodes,
                    inputs + [bias], [out], {"num_heads": heads, "scale": core.attrs["scale"]}, info,
                    core.extra_nodes)

    def core(self, softmax: ir.Node, model: ir.Model):
        """The attention core alone (``kernelize.Attention`` on head-split Q, K, V), or the
        reason it does not match; the approximate rewrites replace this part."""
        scores = softmax.inputs[0]
        r = rank(scores)
        if r is None:
            return "softmax input has unknown rank"
        if attr(softmax, "axis", -1) not in (-1, r - 1):
            return f"softmax over axis {attr(softmax, 'axis')} is not the last axis"
        probs = softmax.outputs[0]
        pv = only_user(probs, "MatMul")
        if pv is None or pv.inputs[0] is not probs:
            return "softmax output is not used by exactly one MatMul(probs, V)"
        nodes = [softmax, pv]
        scale, biases, extra = 1.0, [], []
        mask_kind = "none"
        while True:
            node = producer(scores)
            if node is None or len(scores.uses()) != 1 or scores.is_graph_output():
                break
            if node.op_type == "Mul" and scalar_const(node.inputs[1]) is not None:
                scale *= scalar_const(node.inputs[1])
                nodes.append(node)
                scores = node.inputs[0]
            elif node.op_type == "Add":  # several additive terms (T5: position bias, then the mask)
                side = _scores_operand(node)
                if side is None:
                    break
                biases.append(node.inputs[1 - side])
                scores = node.inputs[side]
                mask_kind = "additive" if mask_kind == "none" else mask_kind
                nodes.append(node)
            elif node.op_type == "Where":
                cond, a, b = node.inputs
                fill_a, fill_b = scalar_const(a), scalar_const(b)
                if fill_b is not None and fill_a is None:
                    keep, fill, scores = True, fill_b, a
                elif fill_a is not None and fill_b is None:
                    keep, fill, scores = False, fill_a, b
                else:
                    break
                if biases and fill > -1e4:
                    # where(c, s, f) + t is s + t + where(c, 0, f) only when f masks (GPT-Neo
                    # adds the padding mask after its causal Where)
                    break
                zero = ir.Value(name=f"{node.outputs[0].name}_zero", const_value=ir.tensor(np.float32(0.0)))
                fill_v = ir.Value(name=f"{node.outputs[0].name}_fill", const_value=ir.tensor(np.float32(fill)))
                where = ir.Node("", "Where", [cond, zero, fill_v] if keep else [cond, fill_v, zero], num_outputs=1)
                where.outputs[0].name = f"{node.outputs[0].name}_bias"
                extra.append(where)
                biases.append(where.outputs[0])
                mask_kind = "boolean"
                nodes.append(node)
            else:
                break
        bias = biases[0] if biases else None
        for i, term in enumerate(biases[1:]):  # the terms summed in the order the model added them
            total = ir.Node("", "Add", [term, bias], num_outputs=1)
            total.outputs[0].name = f"{softmax.outputs[0].name}_bias_{i}"
            extra.append(total)
            bias = total.outputs[0]
        qk = producer(scores, "MatMul")
        if qk is None:
            return "no Q·K^T MatMul feeds the softmax"
        nodes.append(qk)
        q, key_t = qk.inputs
        q, q_scale, q_nodes = _strip_scale(q)
        key_t, k_scale, k_nodes = _strip_scale(key_t)
        nodes += q_nodes + k_nodes
        scale *= q_scale * k_scale
        transpose = producer(key_t, "Transpose")
        if transpose is None:
            return "K^T is not produced by a Transpose"
        perm = list(attr(transpose, "perm", []))
        key_layout = "[batch, heads, seq, head_size]"
        k, v = transpose.inputs[0], pv.inputs[1]
        if perm == [0, 2, 3, 1] and rank(k) == 4:  # K^T straight from [B, S, H, D] (MPT, T5)
            head_major = ir.Node("", "Transpose", [k], attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])],
                                 num_outputs=1)
            dims = list(k.shape)
            k = head_major.outputs[0]
            k.name = f"{transpose.outputs[0].name}_key"
            k.shape, k.type = ir.Shape([dims[0], dims[2], dims[1], dims[3]]), transpose.outputs[0].type
            extra.append(head_major)
            key_layout = "[batch, seq, heads, head_size]"
        elif perm != [0, 1, 3, 2]:
            return f"K^T Transpose has perm {perm}, expected [0, 1, 3, 2]"
        nodes.append(transpose)
        for name, value in (("Q", q), ("K", k), ("V", v)):
            if rank(value) != 4:
                return f"{name} has rank {rank(value)}, expected 4 ([batch, heads, seq, head_size])"
        why = is_internal(nodes, keep=[pv.outputs[0]])
        if why:
            return why
        if mask_kind == "additive" and _is_causal(bias):
            mask_kind = "causal"
        heads, head_size = q.shape[1], q.shape[3]
        info = {"heads": heads if isinstance(heads, int) else None,
                "head_size": head_size if isinstance(head_size, int) else None,
                "scale": scale, "mask": mask_kind}
        if key_layout != "[batch, heads, seq, head_size]":
            info["key_layout"] = key_layout
        if len(biases) > 1:
            info["bias_terms"] = len(biases)
        if isinstance(head_size, int):
            info["scale_is_default"] = math.isclose(scale, head_size ** -0.5, rel_tol=1e-6)
        return Site(self.kind, "attention", "Attention", nodes, [q, k, v, bias], [pv.outputs[0]],
                    {"scale": scale}, info, extra)


def _is_causal(bias: ir.Value) -> bool:
    """bias = Where(Equal(Trilu(ones, lower), 0), -big, 0): torch's is_causal mask, or that
    mask folded into a constant (static lengths)."""
    constant = const_array(bias)
    if constant is not None:
        square = constant.reshape(constant.shape[-2:]) if constant.ndim >= 2 and constant.size == np.prod(
            constant.shape[-2:]) else None
        if square is None or square.shape[0] != square.shape[1] or square.shape[0] < 2:
            return False
        upper = np.triu(np.ones(square.shape, bool), 1)
        return bool(np.all(square[~upper] == 0) and np.all(square[upper] <= -1e4))
    where = producer(bias, "Where")
    if where is None:
        return False
    cond, masked, kept = where.inputs
    fill, zero = scalar_const(masked), scalar_const(kept)
    equal = producer(cond, "Equal")
    if fill is None or zero != 0.0 or fill > -1e4 or equal is None or scalar_const(equal.inputs[1]) != 0.0:
        return False
    trilu = producer(equal.inputs[0], "Trilu")
    if trilu is None or attr(trilu, "upper", 1) != 0 or (len(trilu.inputs) > 1 and trilu.inputs[1] is not None
                                                          and scalar_const(trilu.inputs[1]) != 0):
        return False
    source = trilu.inputs[0]
    expand = producer(source, "Expand")
    ones = scalar_const(expand.inputs[0]) if expand is not None else None
    return ones is not None and ones != 0


def _scores_operand(add: ir.Node) -> int | None:
    """Which operand of the mask Add carries the Q·K^T scores: the (scaled) MatMul itself, or,
    when the model adds several terms one after another (BLOOM: ALiBi, then the mask), an Add
    chain or a masking Where that reaches it; a direct MatMul operand is preferred."""
    for i in (0, 1):
        value, _, _ = _strip_scale(add.inputs[i])
        if producer(value, "MatMul") is not None:
            return i
    for i in (0, 1):
        inner = producer(add.inputs[i])
        if inner is None or len(add.inputs[i].uses()) != 1:
            continue
        if inner.op_type == "Add" and _scores_operand(inner) is not None:
            return i
        if inner.op_type == "Where" and _masked_scores(inner):
            return i
    return None


def _masked_scores(where: ir.Node) -> bool:
    """Where(c, scores, fill) or Where(c, fill, scores) with a masking fill (GPT-Neo's causal
    Where, then the padding mask added)."""
    _, a, b = where.inputs
    fills = [scalar_const(a), scalar_const(b)]
    if sum(f is not None for f in fills) != 1 or min(f for f in fills if f is not None) > -1e4:
        return False
    scores, _, _ = _strip_scale(b if fills[0] is not None else a)
    node = producer(scores)
    return node is not None and (node.op_type == "MatMul" or (node.op_type == "Add" and _scores_operand(node) is not None))


def _strip_scale(value: ir.Value):
    """Follow Mul-by-scalar-constant producers back; return (source, factor, nodes)."""
    factor, nodes = 1.0, []
    while True:
        node = producer(value, "Mul")
        c = scalar_const(node.inputs[1]) if node is not None else None
        if c is None or len(value.uses()) != 1 or value.is_graph_output():
            return value, factor, nodes
        factor *= c
        nodes.append(node)
        value = node.inputs[0]


def _head_split(value: ir.Value):
    """Transpose([0,2,1,3])(Reshape(x W + b, [B, S, H, D])) -> (x, W, b, H, nodes) or reason."""
    transpose = producer(value, "Transpose")
    if transpose is None or list(attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        return "no head-split Transpose([0, 2, 1, 3])"
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return "no head-split Reshape"
    projection = _projection(reshape.inputs[0])
    if isinstance(projection, str):
        return projection
    x, weight_value, bias_value, proj_nodes = projection
    weight = const_array(weight_value)
    if rank(x) != 3:
        return "projection input is not [batch, seq, hidden]"
    target = shape_elements(reshape.inputs[1])
    if target is None or len(target) != 4:
        return "head split shape is not [batch, seq, heads, head_size]"
    if isinstance(target[2], int) and target[2] > 0:
        heads = target[2]
    elif target[2] == -1 and isinstance(target[3], int) and target[3] > 0 and weight.shape[1] % target[3] == 0:
        heads = weight.shape[1] // target[3]
    else:
        return "head count of the split is not a constant"
    if weight.shape[1] % heads:
        return "projection width is not divisible by the head count"
    expected = static_dims(x)[:2] + [heads, weight.shape[1] // heads]
    if not same_shape(target, expected, allowzero=bool(attr(reshape, "allowzero", 0))):
        return f"head split reshapes to {target}, not [batch, seq, heads, head_size]"
    return x, weight_value, bias_value, heads, [transpose, reshape, *proj_nodes]


def _projection(value: ir.Value):
    """value = x W + b, or one chunk of a packed QKV projection split along the last axis
    (GPT-2): -> (x, W, b, nodes); W and b are sliced into new constants for a chunk."""
    split = producer(value, "Split")
    if split is not None:
        index = list(split.outputs).index(value)
        packed = _projection(split.inputs[0])
        if isinstance(packed, str):
            return packed
        x, w_value, b_value, nodes = packed
        w, b = const_array(w_value), const_array(b_value)
        sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        parts = len(split.outputs)
        r = rank(value)
        if attr(split, "axis", 0) not in (-1, (r or 0) - 1) or (sizes is None and w.shape[1] % parts):
            return "packed projection is not split evenly along the last axis"
        bounds = np.cumsum([0, *(sizes if sizes is not None else [w.shape[1] // parts] * parts)])
        lo, hi = int(bounds[index]), int(bounds[index + 1])
        name = f"{value.name}_proj"
        w_chunk = ir.Value(name=f"{name}_weight", const_value=ir.tensor(np.ascontiguousarray(w[:, lo:hi])))
        b_chunk = ir.Value(name=f"{name}_bias", const_value=ir.tensor(np.ascontiguousarray(b[lo:hi])))
        return x, w_chunk, b_chunk, [split, *nodes]
    add = producer(value, "Add")
    bias = const_array(add.inputs[1]) if add is not None else None
    if add is not None and bias is not None and bias.ndim == 1:
        value, bias_value, nodes = add.inputs[0], add.inputs[1], [add]
    else:
        bias_value, nodes = None, []
    matmul = producer(value, "MatMul")
    weight = const_array(matmul.inputs[1]) if matmul is not None else None
    if weight is None or weight.ndim != 2:
        return "projection weight is not a constant matrix"
    if bias_value is None:
        bias_value = ir.Value(name=f"{value.name}_zero_bias",
                              const_value=ir.tensor(np.zeros(weight.shape[1], np.float32)))
    return matmul.inputs[0], matmul.inputs[1], bias_value, [*nodes, matmul]


def _multi_head_block(q, k, v, out):
    splits = [_head_split(t) for t in (q, k, v)]
    for name, s in zip("QKV", splits):
        if isinstance(s, str):
            return f"{name}: {s}"
    heads = {s[3] for s in splits}
    if len(heads) != 1:
        return "Q, K and V are split into different head counts"
    merge_t = only_user(out, "Transpose")
    if merge_t is None or list(attr(merge_t, "perm", [])) != [0, 2, 1, 3]:
        return "output has no head-merge Transpose([0, 2, 1, 3])"
    merge_r = only_user(merge_t.outputs[0], "Reshape")
    if merge_r is None:
        return "output has no head-merge Reshape"
    target = shape_elements(merge_r.inputs[1])
    xq = splits[0][0]
    width = const_array(splits[2][1]).shape[1]
    if target is None or not same_shape(target, static_dims(xq)[:2] + [width],
                                        allowzero=bool(attr(merge_r, "allowzero", 0))):
        return "head merge does not reshape to [batch, seq, heads * head_size]"
    nodes = [merge_t, merge_r]
    inputs = [s[0] for s in splits]  # schema order: inputs, then (weight, bias) of Q, K, V
    for s in splits:
        inputs += [s[1], s[2]]
        nodes += s[4]
    return inputs, merge_r.outputs[0], nodes, heads.pop()
