"""Relative-position biases that are Toeplitz: bias[h, i, j] = c[h, j - i + n - 1].

:func:`match_toeplitz` takes the additive bias an attention site adds to its scores (the
``bias`` input of the site from :class:`kernelize.patterns.attention.AttentionPattern`),
splits it into its summed terms and proves, from the graph or from constant values, that one
term is Toeplitz and the rest is a mask:

* ``t5``: ``Unsqueeze(Transpose(Gather(table, bucket(j - i)), [2, 0, 1]), 0)`` where the
  bucket index is an elementwise function of ``D = Unsqueeze(r, 0) - Unsqueeze(r, 1)``,
  ``r = Range(0, n, 1)``. The vector is that same function applied to the offsets
  ``-(n - 1) .. n - 1``, gathered from the table: new nodes, valid at any n (T5's buckets
  clamp at ``max_distance``, so no length is out of range). The bucket function is also
  evaluated (like a constant fold, with ONNX Runtime) on every offset |d| <= ``FAR_RANGE``:
  where it stops changing beyond some w, ``info["far_from"] = w`` (91 for T5's 32
  bidirectional buckets), which lets ``RPEAttention`` use its far-field form.
* ``alibi``: a per-key bias sliced from a constant ``[H, 1, L]`` table (MPT) whose rows are
  linear in the key position, ``a[h, j] = m_h j + b_h``. Softmax ignores a constant per query
  row, so it equals the Toeplitz ``c[h, d] = m_h d``; the vector is ``m_h * Range(-(n-1), n)``,
  valid at any n (ALiBi extrapolates); the model itself stops at its table length L
  (``info["table_length"]``).
* ``alibi`` (BLOOM, after :func:`kernelize.passes.canonicalize.batched_head_attention`):
  ``Unsqueeze(m_h * p[b, j], 2)`` with key positions ``p = (CumSum(M) - 1) * M`` from the
  attention mask M. Assumed (not provable from the graph): each row of M is one contiguous
  run of ones (left, right or no padding), so ``p = j - pads_before`` on real keys, a
  constant per row that softmax cancels; the mask term must be computed from M (checked), so
  the keys where M is 0 are dropped. Recorded in ``info["assumes"]``.
* ``constant``: a constant ``[H, n, n]`` (or ``[1, H, n, n]``, ``[n, n]``) whose values are
  Toeplitz (checked); valid only at that n (``info["length"]``).

The remaining terms are the mask. A causal one (a comparison of the key index with the query
index from one ``Range``, or torch's ``Trilu`` form) sets ``causal``, and its last query row,
which sees every key, is taken as the key-padding mask ``[B, 1, 1, n]``; a mask that is
already ``[.., 1, n]`` is kept; any other mask is refused (not key padding).
A bias whose terms are not of these forms returns the reason (the site stays exact).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import onnx_ir as ir

from kernelize.graph import attr, const_array, producer, rank, scalar_const

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Abs", "Neg", "Cast", "Greater", "Less", "GreaterOrEqual",
               "LessOrEqual", "Equal", "Where", "Min", "Max", "Log", "Floor", "Ceil", "Not", "And", "Or",
               "Clip", "Pow", "Sqrt", "Exp", "Expand", "Shape", "Identity"}
COMPARISONS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
BIG = 2 ** 62
FAR_RANGE = 1 << 20  # offsets on which a T5 bucket function is checked constant beyond some w
_COUNTER = itertools.count()


@dataclasses.dataclass
class Toeplitz:
    """A proven Toeplitz relative-position bias: ``nodes`` (new, not yet in the graph) compute
    ``rel_bias`` ([H, 2n - 1] float32 at the runtime n); ``mask`` is the remaining additive
    key-padding mask ([B or 1, 1, 1, n]) or None; ``causal`` whether the mask was causal."""

    nodes: list[ir.Node]
    rel_bias: ir.Value
    mask: ir.Value | None
    causal: bool
    source: str  # "alibi" | "t5" | "constant"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Builder:
    """New nodes with unique output names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes = prefix, []

    def op(self, op_type: str, inputs, attributes=None, name: str | None = None) -> ir.Value:
        attrs = [ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items()]
        node = ir.Node("", op_type, list(inputs), attributes=attrs, num_outputs=1)
        node.outputs[0].name = f"{self.prefix}_{name or op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array, dtype) -> ir.Value:
        return self.op("Constant", [], {"value": ir.tensor(np.asarray(array, dtype=dtype))}, "const")

    def offsets(self, n_scalar: ir.Value) -> ir.Value:
        """Range(-(n - 1), n) as int64 [2n - 1] (``n_scalar``: int64 scalar)."""
        one = self.const(1, np.int64)
        start = self.op("Sub", [one, n_scalar])
        return self.op("Range", [start, n_scalar, one], name="offsets")


def _terms(bias: ir.Value) -> list[ir.Value]:
    """The summands of ``bias`` through Add nodes."""
    node = producer(bias, "Add")
    if node is None:
        return [bias]
    return _terms(node.inputs[0]) + _terms(node.inputs[1])


def _ancestors(value: ir.Value, limit: int = 400) -> list[ir.Node]:
    seen, stack, order = set(), [value], []
    while stack and len(order) < limit:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(i for i in node.inputs if i is not None)
    return order


def _topological(value: ir.Value, stop: ir.Node) -> list[ir.Node]:
    """The nodes computing ``value`` after ``stop``, producers before users (DFS post-order)."""
    order, seen = [], set()

    def visit(node):
        if node is None or node in seen or node is stop:
            return
        seen.add(node)
        for i in node.inputs:
            if i is not None:
                visit(i.producer())
        order.append(node)

    visit(value.producer())
    return order


# -- T5: Gather(table, bucket(j - i)) ------------------------------------------------------------
def _range_from_zero(value: ir.Value) -> ir.Node | None:
    node = producer(value, "Range")
    if node is None or scalar_const(node.inputs[0]) != 0 or scalar_const(node.inputs[2]) != 1:
        return None
    return node


def _unsqueezed_axis(value: ir.Value):
    """(Range node, axis) for Unsqueeze(Range(0, n, 1), [axis])."""
    node = producer(value, "Unsqueeze")
    if node is None:
        return None
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else attr(node, "axes")
    r = _range_from_zero(node.inputs[0])
    if r is None or axes is None or np.size(axes) != 1:
        return None
    return r, int(np.reshape(axes, ()))


def _relative_index(value: ir.Value):
    """(Range node, sign) if value = Unsqueeze(r, 0) - Unsqueeze(r, 1) (sign +1: j - i) or the
    reverse (sign -1)."""
    sub = producer(value, "Sub")
    if sub is None:
        return None
    a, b = _unsqueezed_axis(sub.inputs[0]), _unsqueezed_axis(sub.inputs[1])
    if a is None or b is None or a[0] is not b[0]:
        return None
    if (a[1], b[1]) in ((0, 1), (-2 + 2, -1 + 2)):
        return a[0], 1
    if (a[1], b[1]) == (1, 0):
        return a[0], -1
    return None


def _t5(term: ir.Value, build: _Builder):
    unsqueeze = producer(term, "Unsqueeze")
    transpose = producer(unsqueeze.inputs[0], "Transpose") if unsqueeze is not None else None
    gather = producer(transpose.inputs[0], "Gather") if transpose is not None else None
    if gather is None or list(attr(transpose, "perm", [])) != [2, 0, 1] or attr(gather, "axis", 0) != 0:
        return None
    table = const_array(gather.inputs[0])
    if table is None or table.ndim != 2:
        return "the relative-position table is not a constant [buckets, heads]"
    index = gather.inputs[1]
    # the bucket index: elementwise in D = j - i, nothing else that varies
    relative, inside = None, []
    for node in _ancestors(index):
        found = _relative_index(node.outputs[0])
        if found is not None:
            relative = (node, *found)
            continue
    if relative is None:
        return "the bucket index is not computed from j - i of one Range"
    d_node, r_node, sign = relative
    depends = {d_node.outputs[0]}
    order = []
    for node in _topological(index, stop=d_node):
        if any(i in depends for i in node.inputs if i is not None):
            if node.op_type not in ELEMENTWISE:
                return f"the bucket index uses {node.op_type}, not an elementwise function of j - i"
            order.append(node)
            depends.update(node.outputs)
    if index not in depends:
        return "the bucket index does not depend on j - i"
    for node in order:
        for i in node.inputs:
            if i is not None and i not in depends and const_array(i) is None:
                return f"the bucket index also depends on {i.name} (not only on j - i)"
    # the same function on the offsets vector
    n_scalar = r_node.inputs[1]
    offsets = build.offsets(n_scalar)
    if sign < 0:
        offsets = build.op("Neg", [offsets])
    mapping = {d_node.outputs[0]: offsets}
    for node in order:
        inputs = [mapping.get(i, i) for i in node.inputs]
        attrs = {k: a.value for k, a in node.attributes.items()}
        mapping[node.outputs[0]] = build.op(node.op_type, inputs, attrs, name="bucket")
    gathered = build.op("Gather", [gather.inputs[0], mapping[index]], {"axis": 0})  # [2n - 1, H]
    rel = build.op("Transpose", [gathered], {"perm": [1, 0]}, name="rel_bias")
    rel = build.op("Cast", [rel], {"to": 1}, name="rel_bias")
    info = {"buckets": int(table.shape[0]), "heads": int(table.shape[1]), "lengths": "any (buckets clamp)"}
    far_from = _constant_beyond(order, d_node.outputs[0], index, sign)
    if far_from is not None:
        info.update(far_from=far_from, far_checked=FAR_RANGE)
    return rel, info


def _constant_beyond(order: list[ir.Node], d_value: ir.Value, index: ir.Value, sign: int) -> int | None:
    """The smallest w with the bucket index constant on d <= -w and on d >= w (d = j - i), found by
    evaluating the bucket function on every offset |d| <= ``FAR_RANGE`` (T5's buckets clamp at
    ``max_distance``); None where it still changes in the outer half of that range."""
    import onnxruntime as ort

    source = ir.Value(name="d", type=d_value.type, shape=ir.Shape([2 * FAR_RANGE + 1]))
    build = _Builder("far")
    mapping = {d_value: source}
    for node in order:
        inputs = []
        for value in node.inputs:
            if value in mapping or value is None:
                inputs.append(mapping.get(value))
            else:  # a constant of the bucket function
                inputs.append(build.const(const_array(value), const_array(value).dtype))
        attrs = {k: a.value for k, a in node.attributes.items()}
        mapping[node.outputs[0]] = build.op(node.op_type, inputs, attrs)
    output = mapping[index]
    output.type = None  # inferred by ONNX Runtime
    graph = ir.Graph([source], [output], nodes=build.nodes, opset_imports={"": 20}, name="buckets")
    try:
        session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        dtype = np.dtype(d_value.dtype.numpy())
        buckets = session.run(None, {"d": (sign * np.arange(-FAR_RANGE, FAR_RANGE + 1)).astype(dtype)})[0]
    except Exception:  # noqa: BLE001 - the bucket function does not evaluate alone: no promise
        return None
    left, right = buckets[:FAR_RANGE][::-1], buckets[FAR_RANGE + 1:]  # d = -1, -2, ... and d = 1, 2, ...
    changes = [np.flatnonzero(side != side[-1]) for side in (left, right)]
    w = 1 + max(int(c[-1]) + 1 if c.size else 0 for c in changes)
    return w if w <= FAR_RANGE // 2 else None


# -- ALiBi: a per-key bias linear in the key position ------------------------------------------
def _alibi(term: ir.Value, build: _Builder):
    value, slices, axes_sliced = term, 0, set()
    while (node := producer(value, "Slice")) is not None:
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None:
            return None
        axes_sliced.update(int(a) for a in np.ravel(axes))
        value, slices = node.inputs[0], slices + 1
    table = const_array(value)
    if table is None or table.ndim < 2 or table.shape[-2] != 1 or table.shape[-1] < 2 or term.shape is None:
        return None
    if any(a % table.ndim != table.ndim - 1 and table.shape[a] != 1 for a in axes_sliced):
        return "the per-key bias table is sliced along another axis than the key axis"
    rows = table.reshape(-1, table.shape[-1]).astype(np.float64)
    steps = np.diff(rows, axis=-1)
    slopes = steps[:, :1]
    if not np.allclose(steps, slopes, rtol=1e-4, atol=1e-6 * max(1.0, float(np.max(np.abs(rows))))):
        return "the per-key bias is not linear in the key position (not ALiBi)"
    if rows.shape[0] != int(np.prod(table.shape[:-2])):
        return None
    n_scalar = build.op("Squeeze", [build.op("Shape", [term], {"start": -1}), build.const([0], np.int64)])
    offsets = build.op("Cast", [build.offsets(n_scalar)], {"to": 1})
    rel = build.op("Mul", [build.const(slopes.astype(np.float32), np.float32),
                           build.op("Unsqueeze", [offsets, build.const([0], np.int64)])], name="rel_bias")
    return rel, {"heads": int(rows.shape[0]), "slopes": [float(s) for s in slopes[:, 0]],
                 "table_length": int(table.shape[-1]), "sliced": bool(slices)}


# -- ALiBi on positions from cumsum(attention_mask) (BLOOM) ------------------------------------
def _key_positions(value: ir.Value):
    """value = Cast/Unsqueeze(p) with p = (CumSum(M, last axis) - 1) [* M] of a rank-2 M, and
    the key axis kept last -> M, else None or a reason."""
    while (node := producer(value, ("Cast", "Unsqueeze"))) is not None:
        if node.op_type == "Unsqueeze":
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            r = rank(node.outputs[0])
            if axes is None or r is None or any(int(a) % r == r - 1 for a in np.ravel(axes)):
                return "the positions are unsqueezed onto the key axis"
        value = node.inputs[0]
    scaled = producer(value, "Mul")
    mask = None
    if scaled is not None:
        for i in (0, 1):
            if producer(scaled.inputs[i], "Sub") is not None:
                value, mask = scaled.inputs[i], scaled.inputs[1 - i]
                break
        else:
            return None
    sub = producer(value, "Sub")
    cumsum = producer(sub.inputs[0], "CumSum") if sub is not None else None
    if cumsum is None or scalar_const(sub.inputs[1]) != 1:
        return None
    source = cumsum.inputs[0]
    if rank(source) != 2 or scalar_const(cumsum.inputs[1]) not in (1, -1):
        return "the positions are a cumulative sum over another axis than the key axis"
    if attr(cumsum, "exclusive", 0) or attr(cumsum, "reverse", 0):
        return "the positions are an exclusive or reversed cumulative sum"
    if mask is not None and mask is not source:
        return "the cumulative positions are multiplied by another tensor than the one summed"
    return source


def _alibi_cumsum(term: ir.Value, build: _Builder):
    """BLOOM's ALiBi: ``Unsqueeze(slopes[h] * p[b, j], 2)`` with ``p = (cumsum(M) - 1) * M``.

    Where each row of the 0/1 attention mask M is one contiguous run of ones (left, right or
    no padding), ``p[b, j] = j - o_b`` on every real key, ``o_b`` the row's number of leading
    pads, so the term is ``m_h (j - i)`` plus ``m_h (i - o_b)``, a constant per query row that
    softmax cancels, on every key the mask keeps; a padded key is dropped by the mask (checked
    in :func:`match_toeplitz`: the mask term must be computed from M). That the mask has no holes
    is an assumption on the inputs, not provable from the graph (``info["assumes"]``).
    """
    value = term
    unsqueeze = producer(value, "Unsqueeze")
    if unsqueeze is not None and rank(unsqueeze.inputs[0]) == 3 and rank(term) == 4:
        axes = const_array(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        if axes is None or [int(a) % 4 for a in np.ravel(axes)] != [2]:
            return None
        value = unsqueeze.inputs[0]  # [B, H, n] -> [B, H, 1, n]
    r = rank(value)
    scaled = producer(value, "Mul")
    if scaled is None or r not in (3, 4) or (r == 4 and value.shape[2] != 1):
        return None
    for i in (0, 1):
        slopes = const_array(scaled.inputs[i])
        if slopes is not None:
            positions = scaled.inputs[1 - i]
            break
    else:
        return None
    head_axis = r - 2 if r == 3 else r - 3
    if slopes.ndim > r:
        return None
    aligned = slopes.reshape((1,) * (r - slopes.ndim) + slopes.shape)
    if any(size != 1 for axis, size in enumerate(aligned.shape) if axis != head_axis):
        return "the ALiBi slopes vary along another axis than the heads"
    if rank(positions) != r or positions.shape[head_axis] != 1:
        return None
    mask = _key_positions(positions)
    if mask is None or isinstance(mask, str):
        return mask
    slope_vector = aligned.reshape(-1, 1).astype(np.float32)
    n_scalar = build.op("Squeeze", [build.op("Shape", [term], {"start": -1}), build.const([0], np.int64)])
    offsets = build.op("Cast", [build.offsets(n_scalar)], {"to": 1})
    rel = build.op("Mul", [build.const(slope_vector, np.float32),
                           build.op("Unsqueeze", [offsets, build.const([0], np.int64)])], name="rel_bias")
    return rel, {"heads": int(slope_vector.shape[0]), "slopes": [float(x) for x in slope_vector[:, 0]],
                 "positions": f"cumsum({mask.name}) - 1", "positions_from": mask,
                 "lengths": "any (ALiBi extrapolates)",
                 "assumes": f"each row of {mask.name} is one contiguous run of ones (left, right or no padding)"}


# -- a constant Toeplitz matrix -------------------------------------------------------------------
def _constant(term: ir.Value, build: _Builder):
    array = const_array(term)
    if array is None or array.ndim < 2 or array.shape[-1] != array.shape[-2] or array.shape[-1] < 2:
        return None
    n = array.shape[-1]
    if array.ndim == 4 and array.shape[0] != 1 or array.ndim > 4:
        return "the constant bias differs between batch rows"
    heads = array.reshape(-1, n, n).astype(np.float64)
    vector = np.concatenate([heads[:, n - 1::-1, 0], heads[:, 0, 1:]], axis=1)  # d = -(n-1) .. n-1
    index = np.arange(n)[None, :] - np.arange(n)[:, None] + n - 1
    if not np.allclose(heads, vector[:, index], rtol=1e-6, atol=1e-6):
        return "the constant bias is not Toeplitz (it depends on more than j - i)"
    rel = build.const(vector.astype(np.float32), np.float32)
    return rel, {"heads": int(heads.shape[0]), "length": n}


# -- the mask ------------------------------------------------------------------------------------
def _is_causal(mask: ir.Value) -> bool:
    """The mask compares the key index with the query index (both from one Range), or is
    torch's Trilu causal mask."""
    from kernelize.patterns.attention import _is_causal as trilu_causal

    for node in _ancestors(mask):
        if node.op_type == "Trilu" and trilu_causal(mask):
            return True
        if node.op_type in COMPARISONS:
            a, b = (_index_axis(v) for v in node.inputs[:2])
            if a is not None and b is not None and a[0] is b[0] and a[1] != b[1]:
                return True
    return False


def _index_axis(value: ir.Value):
    """(Range node, axis) for a Range(0, n, 1) unsqueezed onto some axes (query or key index)."""
    axis_seen = None
    while (node := producer(value, "Unsqueeze")) is not None:
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            return None
        axis_seen = tuple(int(a) for a in np.ravel(axes)) if axis_seen is None else axis_seen
        value = node.inputs[0]
    r = _range_from_zero(value)
    return (r, axis_seen) if r is not None and axis_seen is not None else None


def match_toeplitz(bias: ir.Value, model: ir.Model) -> Toeplitz | str:
    """Prove ``bias`` = Toeplitz relative-position term + mask; see the module docstring."""
    if bias is None:
        return "the site adds no bias"
    build = _Builder(f"{bias.name or 'bias'}_rpe{next(_COUNTER)}")  # unique: layers may share one bias
    found, masks = [], []
    for term in _terms(bias):
        for source, matcher in (("t5", _t5), ("alibi", _alibi), ("alibi", _alibi_cumsum), ("constant", _constant)):
            result = matcher(term, build)
            if isinstance(result, str):
                return result
            if result is not None:
                found.append((source, *result))
                break
        else:
            masks.append(term)
    if not found:
        return "no term of the bias is a relative-position bias (ALiBi, T5 buckets or a Toeplitz constant)"
    if len(found) > 1:
        return f"{len(found)} relative-position terms in one bias"
    source, rel, info = found[0]
    mask, causal = None, False
    if masks:
        mask = masks[0]
        for extra in masks[1:]:
            mask = build.op("Add", [mask, extra], name="mask")
        causal = _is_causal(mask)
        rows = mask.shape[-2] if mask.shape is not None and len(mask.shape) >= 2 else None
        if causal:  # the last query row sees every key: it is the key-padding part
            mask = build.op("Slice", [mask, build.const([-1], np.int64), build.const([BIG], np.int64),
                                      build.const([-2], np.int64)], name="key_padding")
        elif rows != 1:
            return "the mask varies over query rows and is not causal (not a key-padding mask)"
    positions_from = info.pop("positions_from", None)
    if positions_from is not None and not any(
            positions_from in node.inputs for term in masks for node in _ancestors(term, 4000)):
        return (f"the ALiBi positions come from cumsum({positions_from.name}), but no mask drops the keys "
                f"where {positions_from.name} is 0")
    info = {**info, "mask": "none" if mask is None else ("causal + key padding" if causal else "key padding")}
    return Toeplitz(build.nodes, rel, mask, causal, source, info)
