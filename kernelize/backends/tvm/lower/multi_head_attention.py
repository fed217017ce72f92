"""TVM lowering of kernelize.MultiHeadAttention (kernelize/ops/multi_head_attention.py)."""

from __future__ import annotations

import numpy as np
from tvm import relax

from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import linear, sdpa


@lowering("MultiHeadAttention")
def multi_head_attention(bb, inputs, attrs):
    """Three projections (the scale folded into Q's weight and bias, which constant folding
    does once for constant weights), heads split with K directly in [B, H, D, Sk] layout,
    attention, heads merged."""
    xq, xk, xv, wq, bq, wk, bk, wv, bv, bias = inputs
    heads, scale = attrs["num_heads"], attrs["scale"]
    c = relax.const(np.float32(scale), "float32")
    wq, bq = bb.emit(relax.op.multiply(wq, c)), bb.emit(relax.op.multiply(bq, c))

    def split(x, w, b, perm):
        y = linear(bb, x, w, b)
        batch, seq, width = y.ty.shape
        y = bb.emit(relax.op.reshape(y, [batch, seq, heads, width // heads]))
        return bb.emit(relax.op.permute_dims(y, perm))

    q = split(xq, wq, bq, [0, 2, 1, 3])
    k_t = split(xk, wk, bk, [0, 2, 3, 1])
    v = split(xv, wv, bv, [0, 2, 1, 3])
    out = sdpa(bb, q, k_t, v, bias, None)
    merged = bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))
    batch, seq, _, _ = merged.ty.shape
    return bb.emit(relax.op.reshape(merged, [batch, seq, -1]))
