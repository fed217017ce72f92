"""TVM lowering of kernelize.LinearAttention (kernelize/ops/linear_attention.py): Relax ops
(legalized to TIR kernels and scheduled by the CPU rules), the same contraction order and
chunking as the ONNX body, with shapes static."""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from kernelize.backends.tvm.lower.feature_maps import features
from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import f32, length_dispatch, sdpa, static_shape
from kernelize.ops.linear_attention import CAUSAL_BIAS, CHUNK, EPSILON, MASKED, check_map, cosformer_angles


@lowering("LinearAttention")
def linear_attention(bb, inputs, attrs):
    query, key, value, bias, weight, feature_bias = inputs
    kind, scale, causal = attrs["feature_map"], float(attrs["scale"]), int(attrs.get("causal", 0))
    check_map(kind)
    return length_dispatch(
        query, int(attrs.get("exact_below", 0)),
        lambda: _exact(bb, query, key, value, bias, scale, causal),
        lambda: _linear(bb, kind, query, key, value, bias, weight, feature_bias, scale, causal))


def _exact(bb, query, key, value, bias, scale, causal):
    if causal:
        sq, sk = static_shape(query)[-2], static_shape(key)[-2]
        mask = f32(np.triu(np.full((sq, sk), CAUSAL_BIAS), 1))
        bias = mask if bias is None else bb.emit(relax.op.add(bias, mask))
    key_t = bb.emit(relax.op.permute_dims(key, [0, 1, 3, 2]))
    return sdpa(bb, query, key_t, value, bias, scale)


def _features(bb, kind, query, key, weight, bias):
    if kind != "cosformer":
        return (features(bb, kind, query, "query", weight, bias),
                features(bb, kind, key, "key", weight, bias))
    span = max(static_shape(query)[-2], static_shape(key)[-2])
    result = []
    for x in (query, key):
        angle = cosformer_angles(static_shape(x)[-2], span)[:, None]
        relu = bb.emit(relax.op.nn.relu(x))
        result.append(bb.emit(relax.op.concat([bb.emit(relax.op.multiply(relu, f32(np.cos(angle)))),
                                               bb.emit(relax.op.multiply(relu, f32(np.sin(angle))))], axis=-1)))
    return tuple(result)


def _linear(bb, kind, query, key, value, bias, weight, feature_bias, scale, causal):
    """Numerator and normalizer are carried separately here (not as a ``[V 1]`` column as in
    the ONNX body): products of width Dv + 1 would miss the CPU matmul schedule's
    vectorization (about 5x slower at S = 1024)."""
    op = relax.op
    root = f32(math.sqrt(scale))
    phi_q, phi_k = _features(bb, kind, bb.emit(op.multiply(query, root)), bb.emit(op.multiply(key, root)),
                             weight, feature_bias)
    if bias is not None:
        peak = bb.emit(op.max(bias, axis=[-2], keepdims=True))
        keep = bb.emit(op.astype(bb.emit(op.greater(peak, f32(MASKED))), "float32"))
        phi_k = bb.emit(op.multiply(phi_k, bb.emit(op.permute_dims(keep, [0, 1, 3, 2]))))
    if causal:
        numerator, normalizer = _causal_chunks(bb, phi_q, phi_k, value)
    else:
        state = bb.emit(op.matmul(bb.emit(op.permute_dims(phi_k, [0, 1, 3, 2])), value))  # [B, H, M, Dv]
        key_sum = bb.emit(op.sum(phi_k, axis=[-2], keepdims=True))  # [B, H, 1, M]
        numerator = bb.emit(op.matmul(phi_q, state))
        normalizer = bb.emit(op.sum(bb.emit(op.multiply(phi_q, key_sum)), axis=[-1], keepdims=True))
    return bb.emit(op.divide(numerator, bb.emit(op.add(normalizer, f32(EPSILON)))))


def _causal_chunks(bb, phi_q, phi_k, value):
    """The chunked causal form with static shapes, chunks laid out [B * H, C, L, width].
    Returns (numerator [B, H, S, Dv], normalizer [B, H, S, 1])."""
    op = relax.op
    batch, heads, seq, _ = static_shape(phi_q)
    chunk = min(CHUNK, seq)
    pad = (-seq) % chunk
    count = (seq + pad) // chunk

    def chunked(x):
        width = static_shape(x)[-1]
        if pad:
            x = bb.emit(op.concat([x, bb.emit(op.zeros((batch, heads, pad, width), "float32"))], axis=2))
        return bb.emit(op.reshape(x, (batch * heads, count, chunk, width)))

    def unchunked(x):
        x = bb.emit(op.reshape(x, (batch, heads, count * chunk, static_shape(x)[-1])))
        return bb.emit(op.strided_slice(x, axes=[2], begin=[0], end=[seq])) if pad else x

    q4, k4, v4 = chunked(phi_q), chunked(phi_k), chunked(value)
    k4_t = bb.emit(op.permute_dims(k4, [0, 1, 3, 2]))
    inside = bb.emit(op.tril(bb.emit(op.matmul(q4, k4_t))))  # [BH, C, L, L]
    states = bb.emit(op.matmul(k4_t, v4))  # [BH, C, M, Dv]
    earlier = bb.emit(op.cumsum(states, axis=1, exclusive=True))
    numerator = bb.emit(op.add(bb.emit(op.matmul(inside, v4)), bb.emit(op.matmul(q4, earlier))))
    key_sums = bb.emit(op.sum(k4, axis=[2], keepdims=True))  # [BH, C, 1, M]
    earlier_sums = bb.emit(op.cumsum(key_sums, axis=1, exclusive=True))
    normalizer = bb.emit(op.add(bb.emit(op.sum(inside, axis=[-1], keepdims=True)),
                                bb.emit(op.sum(bb.emit(op.multiply(q4, earlier_sums)), axis=[-1], keepdims=True))))
    return unchunked(numerator), unchunked(normalizer)
