"""kernelize.LinearAttention: kernelized attention, linear in the sequence length.

``Y = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1) + eps)`` on head-split tensors
``[batch, heads, seq, head_size]``, where phi is a feature map of
:mod:`kernelize.ops.feature_maps` (``elu``, ``relu``, ``favor``, ``hedgehog``) or
``cosformer`` (cosFormer, Qin et al. 2022: ReLU features re-weighted by
``cos(pi i / (2 M))`` and ``sin(pi i / (2 M))`` of the position ``i``, so that
``phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) cos(pi (i - j) / (2 M))``; M is the key
length (the longer of query and key length when they differ, so every angle stays below
pi/2)). Queries and keys are multiplied by ``sqrt(scale)`` before the map (the feature
maps' scaling convention).

Attributes: ``feature_map``; ``scale``; ``causal`` (1: query i sees keys j <= i; needs
equal query and key lengths); ``exact_below`` (when the query length is below it, exact
softmax attention runs instead, as ``kernelize.Attention`` with the causal mask added).

Inputs: ``bias?`` is the model's additive mask, rank 4, broadcastable to
``[batch, heads, seq_q, seq_k]``. Linear attention never forms query-key pairs, so only its
key-padding part is used: a key is dropped (its features zeroed) where the bias is
``<= -1e4`` for every query row; other bias values are ignored (the exact branch adds the
whole bias). ``feature_weight?`` / ``feature_bias?``: the map's parameters (favor: weight
``[H or 1, D, M]``; hedgehog: weight ``[H, D, M/2]`` and bias ``[H, 1, M/2]``).

Cost: the non-causal form contracts ``phi(K)^T [V 1]`` first (``[M, Dv+1]`` per head), so no
``S x S`` tensor exists. The causal form is chunked: positions are split into chunks of
``L = min(64, S)`` (S padded to a multiple of L), each chunk takes the masked quadratic
form inside it (``L x L``) plus ``phi(Q_c)`` times the exclusive prefix sum over earlier
chunks of the per-chunk states ``phi(K_c)^T [V_c 1]``; no per-position ``[M, Dv]`` state
is materialized. In the ONNX body the normalizer rides along as the extra ones column of
``[V 1]``; the TVM lowering carries it separately (see
``kernelize/backends/tvm/lower/linear_attention.py``).
"""

from __future__ import annotations

import math

import numpy as np

from kernelize.ops import feature_maps
from kernelize.ops.attention import emit_sdpa, exact_attention
from kernelize.ops.base import Operator, const, emit_length_dispatch

FEATURE_MAPS = feature_maps.FEATURE_MAPS + ("cosformer",)
EPSILON = 1e-6  # added to the normalizer: relu / cosformer features can make it zero
CHUNK = 64  # causal chunk length L
MASKED = -1e4  # a bias at or below this drops the key
CAUSAL_BIAS = -1e9  # the exact branch's causal mask


def check_map(kind: str) -> None:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")


# -- NumPy -------------------------------------------------------------------------------------
def cosformer_angles(positions: int, span: int) -> np.ndarray:
    """``pi i / (2 span)`` for ``i < positions`` (float64)."""
    return np.arange(positions, dtype=np.float64) * (math.pi / 2.0) / span


def reference_features(kind, query, key, weight=None, bias=None):
    """phi(Q), phi(K) (float64) of already scaled queries and keys."""
    check_map(kind)
    if kind != "cosformer":
        return (feature_maps.reference(kind, query, "query", weight, bias),
                feature_maps.reference(kind, key, "key", weight, bias))
    span = max(query.shape[-2], key.shape[-2])
    result = []
    for x in (query, key):
        angle = cosformer_angles(x.shape[-2], span)[:, None]
        relu = np.maximum(x, 0.0)
        result.append(np.concatenate([relu * np.cos(angle), relu * np.sin(angle)], axis=-1))
    return tuple(result)


def key_keep(bias: np.ndarray) -> np.ndarray:
    """1.0 for the keys the bias keeps for some query row, 0.0 for dropped keys:
    ``[..., seq_k, 1]`` from a rank-4 bias."""
    keep = np.max(np.asarray(bias, np.float64), axis=-2, keepdims=True) > MASKED
    return np.swapaxes(keep.astype(np.float64), -1, -2)


class LinearAttention(Operator):
    name = "LinearAttention"
    inputs = ("query", "key", "value", "bias?", "feature_weight?", "feature_bias?")
    attributes = {"feature_map": str, "causal": int, "scale": float, "exact_below": int}

    def reference(self, query, key, value, bias=None, feature_weight=None, feature_bias=None, *,
                  feature_map, scale, causal=0, exact_below=0):
        """The plain quadratic form of the same function (float64): the scores
        ``phi(q_i) . phi(k_j)`` (lower triangle when causal), normalized per row."""
        q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
        if causal and q.shape[-2] != k.shape[-2]:
            raise ValueError("causal linear attention needs equal query and key lengths")
        if q.shape[-2] < exact_below:
            return exact_attention(q, k, v, bias, scale=scale, causal=bool(causal),
                                   causal_bias=CAUSAL_BIAS).astype(np.float32)
        root = math.sqrt(scale)
        phi_q, phi_k = reference_features(feature_map, q * root, k * root, feature_weight, feature_bias)
        if bias is not None:
            phi_k = phi_k * key_keep(bias)
        scores = phi_q @ np.swapaxes(phi_k, -1, -2)
        if causal:
            scores = np.tril(scores)
        out = (scores @ v) / (np.sum(scores, axis=-1, keepdims=True) + EPSILON)
        return out.astype(np.float32)

    # -- ONNX ---------------------------------------------------------------------------------
    def body(self, tape, inputs, attrs):
        query, key, value, bias, weight, feature_bias = inputs
        kind, scale, causal = attrs["feature_map"], float(attrs["scale"]), int(attrs.get("causal", 0))
        check_map(kind)

        def exact(t):
            mask = bias
            if causal:
                mask = _emit_causal_bias(t, query, key) if mask is None else t.op(
                    "Add", [mask, _emit_causal_bias(t, query, key)])
            return emit_sdpa(t, query, key, value, mask, scale)

        def approximate(t):
            return _emit_linear(t, kind, query, key, value, bias, weight, feature_bias, scale, causal)

        return [emit_length_dispatch(tape, query, int(attrs.get("exact_below", 0)), exact, approximate)]


# -- ONNX helpers -----------------------------------------------------------------------------
def _emit_causal_bias(tape, query, key):
    """``[Sq, Sk]`` with CAUSAL_BIAS above the diagonal, 0 elsewhere."""
    shape = tape.op("Concat", [tape.op("Shape", [query], {"start": -2, "end": -1}),
                               tape.op("Shape", [key], {"start": -2, "end": -1})], {"axis": 0})
    ones = tape.op("ConstantOfShape", [shape], {"value": _tensor1(1.0)})
    upper = tape.op("Trilu", [ones, const(tape, 1, np.int64)], {"upper": 1})
    return tape.op("Mul", [upper, const(tape, CAUSAL_BIAS)])


def _tensor1(value: float):
    import onnx_ir as ir

    return ir.tensor(np.array([value], np.float32))


def _emit_features(tape, kind, query, key, weight, bias):
    if kind != "cosformer":
        return (feature_maps.emit_onnx(tape, kind, query, "query", weight, bias),
                feature_maps.emit_onnx(tape, kind, key, "key", weight, bias))
    lengths = [tape.op("Shape", [x], {"start": -2, "end": -1}) for x in (query, key)]
    span = tape.op("Cast", [tape.op("Max", lengths)], {"to": 1})
    step = tape.op("Div", [const(tape, math.pi / 2.0), span])  # [1]
    result = []
    for x, length in zip((query, key), lengths):
        count = tape.op("Squeeze", [length, const(tape, [0], np.int64)])
        positions = tape.op("Cast", [tape.op("Range", [const(tape, 0, np.int64), count, const(tape, 1, np.int64)])],
                            {"to": 1})
        angle = tape.op("Unsqueeze", [tape.op("Mul", [positions, step]), const(tape, [-1], np.int64)])  # [S, 1]
        relu = tape.op("Relu", [x])
        result.append(tape.op("Concat", [tape.op("Mul", [relu, tape.op("Cos", [angle])]),
                                         tape.op("Mul", [relu, tape.op("Sin", [angle])])], {"axis": -1}))
    return tuple(result)


def _emit_linear(tape, kind, query, key, value, bias, weight, feature_bias, scale, causal):
    root = const(tape, math.sqrt(scale))
    phi_q, phi_k = _emit_features(tape, kind, tape.op("Mul", [query, root]), tape.op("Mul", [key, root]),
                                  weight, feature_bias)
    if bias is not None:
        peak = tape.op("ReduceMax", [bias, const(tape, [-2], np.int64)], {"keepdims": 1})
        keep = tape.op("Cast", [tape.op("Greater", [peak, const(tape, MASKED)])], {"to": 1})
        phi_k = tape.op("Mul", [phi_k, tape.op("Transpose", [keep], {"perm": [0, 1, 3, 2]})])
    # [V 1]: the normalizer is the last column of the product
    lead = tape.op("Shape", [value], {"end": -1})
    ones = tape.op("ConstantOfShape", [tape.op("Concat", [lead, const(tape, [1], np.int64)], {"axis": 0})],
                   {"value": _tensor1(1.0)})
    value_one = tape.op("Concat", [value, ones], {"axis": -1})
    if causal:
        out = _emit_causal_chunks(tape, phi_q, phi_k, value_one)
    else:
        state = tape.op("MatMul", [tape.op("Transpose", [phi_k], {"perm": [0, 1, 3, 2]}), value_one])
        out = tape.op("MatMul", [phi_q, state])
    last = [const(tape, [-1], np.int64)]
    numerator = tape.op("Slice", [out, const(tape, [0], np.int64), *last, *last])
    normalizer = tape.op("Slice", [out, *last, const(tape, [2**62], np.int64), *last])
    return tape.op("Div", [numerator, tape.op("Add", [normalizer, const(tape, EPSILON)])])


def _emit_causal_chunks(tape, phi_q, phi_k, value_one):
    """Chunked causal form of ``tril(phi_q phi_k^T) value_one`` ([B, H, S, Dv+1])."""
    i64 = lambda a: const(tape, a, np.int64)  # noqa: E731
    length = tape.op("Shape", [phi_q], {"start": -2, "end": -1})  # [1]
    chunk = tape.op("Min", [length, i64([CHUNK])])
    pad = tape.op("Mod", [tape.op("Sub", [chunk, tape.op("Mod", [length, chunk])]), chunk])
    pads = tape.op("Concat", [i64([0]), pad], {"axis": 0})

    def chunked(x):
        padded = tape.op("Pad", [x, pads, const(tape, 0.0), i64([-2])])
        shape = tape.op("Concat", [i64([0, 0, -1]), chunk, tape.op("Shape", [x], {"start": -1})], {"axis": 0})
        return tape.op("Reshape", [padded, shape])  # [B, H, C, L, width]

    q5, k5, v5 = chunked(phi_q), chunked(phi_k), chunked(value_one)
    k5_t = tape.op("Transpose", [k5], {"perm": [0, 1, 2, 4, 3]})
    inside = tape.op("Trilu", [tape.op("MatMul", [q5, k5_t])], {"upper": 0})  # [B, H, C, L, L]
    states = tape.op("MatMul", [k5_t, v5])  # [B, H, C, M, Dv+1]
    earlier = tape.op("CumSum", [states, i64(2)], {"exclusive": 1})
    total = tape.op("Add", [tape.op("MatMul", [inside, v5]), tape.op("MatMul", [q5, earlier])])
    flat = tape.op("Reshape", [total, tape.op("Concat", [i64([0, 0, -1]), tape.op("Shape", [value_one], {"start": -1})],
                                              {"axis": 0})])
    return tape.op("Slice", [flat, i64([0]), length, i64([2])])
