"""kernelize.Attention: softmax(Q K^T * scale + bias) V on head-split tensors.

Inputs are ``[batch, heads, seq, head_size]`` (key/value may have another length);
``bias`` is an additive mask broadcastable to ``[batch, heads, seq_q, seq_k]``
(0 to keep, a large negative number or -inf to drop).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, const


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


class Attention(Operator):
    name = "Attention"
    inputs = ("query", "key", "value", "bias?")
    attributes = {"scale": float}

    def reference(self, query, key, value, bias=None, *, scale):
        q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
        scores = (q @ np.swapaxes(k, -1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        return (softmax(scores) @ v).astype(np.float32)

    def body(self, tape, inputs, attrs):
        query, key, value, bias = inputs
        return [emit_sdpa(tape, query, key, value, bias, attrs["scale"])]


def emit_sdpa(tape: ir.tape.Tape, query, key, value, bias, scale: float) -> ir.Value:
    """Scaled dot-product attention in standard ops (shared with MultiHeadAttention)."""
    key_t = tape.op("Transpose", [key], {"perm": [0, 1, 3, 2]})
    scores = tape.op("Mul", [tape.op("MatMul", [query, key_t]), const(tape, scale)])
    if bias is not None:
        scores = tape.op("Add", [scores, bias])
    probs = tape.op("Softmax", [scores], {"axis": -1})
    return tape.op("MatMul", [probs, value])
