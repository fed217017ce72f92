"""TVM form of the feature maps of kernelize/ops/feature_maps.py (shared by the lowerings of
LinearAttention and RPEAttention; registers no operator)."""

from __future__ import annotations

import numpy as np
from tvm import relax

from kernelize.backends.tvm.te import softmax
from kernelize.ops import feature_maps


def features(bb, kind: str, x, role: str, weight=None, bias=None):
    """The features of ``x`` as Relax bindings in ``bb`` (static shapes)."""
    feature_maps.check(kind, role, weight, bias)
    op = relax.op
    one = relax.const(np.float32(1.0), "float32")
    if kind == "elu":
        positive = bb.emit(op.greater(x, relax.const(np.float32(0.0), "float32")))
        below = bb.emit(op.exp(bb.emit(op.minimum(x, relax.const(np.float32(0.0), "float32")))))
        return bb.emit(op.where(positive, bb.emit(op.add(x, one)), below))
    if kind == "relu":
        return bb.emit(op.nn.relu(x))
    if kind == "favor":
        count = int(weight.ty.shape[-1])
        projected = bb.emit(op.matmul(x, weight))
        square = bb.emit(op.sum(bb.emit(op.multiply(x, x)), axis=[-1], keepdims=True))
        exponent = bb.emit(op.subtract(projected, bb.emit(op.multiply(square, relax.const(np.float32(0.5))))))
        axes = [-1] if role == "query" else [-2, -1]
        stabilizer = bb.emit(op.max(exponent, axis=axes, keepdims=True))
        exp = bb.emit(op.exp(bb.emit(op.subtract(exponent, stabilizer))))
        return bb.emit(op.multiply(exp, relax.const(np.float32(1.0 / np.sqrt(count)), "float32")))
    z = bb.emit(op.add(bb.emit(op.matmul(x, weight)), bias))
    positive = softmax(bb, z)
    negative = softmax(bb, bb.emit(op.negative(z)))
    return bb.emit(op.concat([positive, negative], axis=-1))
