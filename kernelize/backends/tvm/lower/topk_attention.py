"""TVM lowering of kernelize.TopKAttention (kernelize/ops/topk_attention.py): dense scores,
``topi.topk`` and a gather-reduce of the chosen value rows."""

from __future__ import annotations

import numpy as np
from tvm import relax, te, topi

from kernelize.backends.tvm.lower.block_sparse_attention import causal_mask, exact, padding_or_neg, row_has_key
from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import length_dispatch, softmax, static_shape
from kernelize.ops.topk_attention import TopKAttention


@lowering("TopKAttention")
def topk_attention(bb, inputs, attrs):
    query, key, value, bias = inputs
    scale, causal, top_k = TopKAttention.settings(attrs)

    def approximate():
        op = relax.op
        batch, heads, seq, _ = static_shape(query)
        seq_k, head_v = static_shape(key)[2], static_shape(value)[3]
        k = min(top_k, seq_k)
        key_t = bb.emit(op.permute_dims(key, [0, 1, 3, 2]))
        scores = bb.emit(op.matmul(query, key_t))
        scores = bb.emit(op.multiply(scores, relax.const(np.float32(scale), "float32")))
        mask = causal_mask(seq, seq_k) if causal else None
        if bias is not None:
            padding = padding_or_neg(bb, bias)
            mask = padding if mask is None else bb.emit(op.add(padding, mask))
        if mask is not None:
            scores = bb.emit(op.add(scores, mask))
        chosen = bb.emit_te(topi.topk, scores, k, -1, "both", False, "int32", primfunc_name_hint="topk")
        best = bb.emit(relax.TupleGetItem(chosen, 0))
        index = bb.emit(relax.TupleGetItem(chosen, 1))
        probs = softmax(bb, best)

        def gather_reduce(p, idx, v):
            m = te.reduce_axis((0, k), "m")
            return te.compute((batch, heads, seq, head_v),
                              lambda n, h, i, d: te.sum(p[n, h, i, m] * v[n, h, idx[n, h, i, m], d], axis=m),
                              name="topk_pv")

        out = bb.emit_te(gather_reduce, probs, index, value, primfunc_name_hint="topk_pv")
        if bias is not None:
            out = bb.emit(op.multiply(out, row_has_key(bb, mask)))
        return out

    return length_dispatch(query, int(attrs.get("exact_below", 0)),
                           lambda: exact(bb, query, key, value, bias, scale, causal), approximate)
