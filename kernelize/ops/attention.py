"""kernelize.Attention: softmax(Q K^T * scale + bias) V on head-split tensors.

Inputs are ``[batch, heads, seq, head_size]`` (key/value may have another length);
``bias`` is an additive mask broadcastable to ``[batch, heads, seq_q, seq_k]``
(0 to keep, a large negative number or -inf to drop).

:func:`exact_attention` (and :func:`attention_probabilities`) is the one NumPy reference of
exact softmax attention: this operator's reference, the exact branches of the approximate
operators, the calibration of the approximation methods and the approximate pass's site
outputs all call it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, const


def softmax(x: np.ndarray, zero_empty: bool = False) -> np.ndarray:
    """Softmax over the last axis. A row whose entries are all -inf gives NaN, or 0 with
    ``zero_empty``."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    total = np.sum(e, axis=-1, keepdims=True)
    return e / (np.maximum(total, 1e-300) if zero_empty else total)


def causal_keep(seq_q: int, seq_k: int) -> np.ndarray:
    """[seq_q, seq_k] bool: key j is visible to query i when j <= i (as the operators'
    ONNX bodies and the models' Trilu masks have it)."""
    return np.tril(np.ones((seq_q, seq_k), bool))


def attention_probabilities(query, key, bias=None, *, scale: float, causal: bool = False, position=None,
                            bias_floor: float | None = None, causal_bias: float = -np.inf,
                            zero_empty: bool = False) -> np.ndarray:
    """softmax(Q K^T scale [+ position] [+ bias] [+ causal mask]) in float64.

    ``position``: an added score term (a Toeplitz relative-position bias ``[H, S, S]``).
    ``bias_floor``: the bias is clamped from below to it (a finite floor keeps a row whose keys
    are all masked finite). ``causal_bias``: what the causal mask adds above the diagonal
    (-inf drops those keys; a large finite negative number is what the ONNX bodies that add
    the mask use). ``zero_empty``: a row with no key left gives 0 instead of NaN."""
    q, k = (np.asarray(a, np.float64) for a in (query, key))
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    if position is not None:
        scores = scores + position
    if bias is not None:
        scores = scores + (np.asarray(bias) if bias_floor is None
                           else np.maximum(np.asarray(bias, np.float64), bias_floor))
    if causal:
        keep = causal_keep(*scores.shape[-2:])
        scores = (np.where(keep, scores, -np.inf) if causal_bias == -np.inf
                  else scores + np.where(keep, 0.0, causal_bias))
    return softmax(scores, zero_empty)


def exact_attention(query, key, value, bias=None, **options) -> np.ndarray:
    """softmax(Q K^T scale + ...) V in float64; ``options`` as for :func:`attention_probabilities`."""
    return attention_probabilities(query, key, bias, **options) @ np.asarray(value, np.float64)


class Attention(Operator):
    name = "Attention"
    inputs = ("query", "key", "value", "bias?")
    attributes = {"scale": float}

    def reference(self, query, key, value, bias=None, *, scale):
        return exact_attention(query, key, value, bias, scale=scale).astype(np.float32)

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
