"""kernelize.SlidingWindowAttention: local attention within a window plus attention sinks.

Rule (query position i, key position j): key j is attended iff ``|i - j| < window``
(``causal``: ``i - window < j <= i``) or ``j < sinks`` (``causal``: and ``j <= i``). The sinks
are the first keys, attended by every query (StreamingLLM's attention sinks, Longformer's
global tokens on the key side).

Kernel (ONNX body and TVM lowering; see kernelize.ops.block_sparse_attention): the queries
are cut into blocks of :func:`window_block` positions; each block gathers the ``sinks``
keys and the contiguous band ``[t*b - (window-1), t*b + b - 1 + (window-1)]`` (causal: up to
``t*b + b - 1``) and runs Q K^T, softmax and P V over those ``sinks + b + 2 (window - 1)``
(causal: ``sinks + b + window - 1``) slots only: the cost grows with S * window, not S^2.
Bias (key padding only), self-attention only, empty rows and ``exact_below``: as in the
block-sparse module's docstring.
"""

from __future__ import annotations

import numpy as np

from kernelize.ops.base import Operator, emit_length_dispatch
from kernelize.ops.block_sparse_attention import (Band, _i64, band_cost, emit_band_attention, emit_exact,
                                                  exact_reference, masked_attention_reference)


def window_block(window: int, causal: bool = False) -> int:
    """Query block size of the kernel: the window rounded up to a multiple of 24, at most 96
    (causal: at most 48).

    Smaller blocks waste fewer slots (the band is ``block + 2 (window - 1)`` wide, causal
    ``block + window - 1``, so there the block weighs twice as much), larger ones make fewer,
    bigger matmuls and fewer K/V gathers. A multiple of 24 because the TVM matmul schedule
    keeps 6 (AVX2) or 8 (AVX-512) rows of a tile in registers and predicates a block those do
    not divide, which made the window=256 kernel about 1.3x slower at block 64 than at 48; 96
    beat 48, 144 and 192 there (TVM, 1 thread, non-causal, n = 4096: 215 ms vs 237-260, 221
    and 254 ms)."""
    return min(48 if causal else 96, 24 * max(1, -(-window // 24)))


def window_band(window: int, sinks: int, causal: bool) -> Band:
    """The sinks, then the keys ``t*b - (window - 1) .. t*b + b - 1 + (window - 1)`` of query
    block t (causal: up to ``t*b + b - 1``)."""
    b = window_block(window, causal)
    after = 0 if causal else window - 1
    return Band(block=b, prefix=sinks, before=window - 1, length=b + window - 1 + after)


def sliding_window_allowed(seq: int, window: int, sinks: int, causal: bool) -> np.ndarray:
    """[seq, seq] bool: the rule of the module docstring."""
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    return window_rule(i, j, window, sinks, causal)


def window_rule(i, j, window: int, sinks: int, causal: bool):
    if causal:
        return ((i - j >= 0) & (i - j < window)) | ((j < sinks) & (j <= i))
    return (np.abs(i - j) < window) | (j < sinks)


def sliding_window_cost(attrs: dict, shape: dict) -> float:
    """Multiply-adds of the kernel (Q K^T and P V over the gathered slots)."""
    return band_cost(window_band(attrs["window"], attrs.get("sinks", 0), bool(attrs["causal"])), shape)


class SlidingWindowAttention(Operator):
    """Sliding-window attention with ``sinks`` global keys; see the module docstring."""

    name = "SlidingWindowAttention"
    inputs = ("query", "key", "value", "bias?")
    attributes = {"scale": float, "causal": int, "exact_below": int, "window": int, "sinks": int}

    def reference(self, query, key, value, bias=None, *, scale, causal=0, exact_below=0, window=128, sinks=0):
        seq = query.shape[-2]
        if seq < exact_below:
            return exact_reference(query, key, value, bias, scale, bool(causal))
        allowed = sliding_window_allowed(seq, window, sinks, bool(causal))
        return masked_attention_reference(query, key, value, bias, scale, allowed)

    @staticmethod
    def settings(attrs):
        window = int(attrs.get("window", 128))
        if window < 1:
            raise ValueError(f"SlidingWindowAttention: window must be >= 1, not {window}")
        return float(attrs["scale"]), bool(attrs.get("causal", 0)), window, int(attrs.get("sinks", 0))

    def body(self, tape, inputs, attrs):
        query, key, value, bias = inputs
        scale, causal, window, sinks = self.settings(attrs)

        def rule(t, qpos, kpos):
            offset = t.op("Sub", [qpos, kpos])
            if causal:
                near = t.op("And", [t.op("GreaterOrEqual", [offset, _i64(t, 0)]),
                                    t.op("Less", [offset, _i64(t, window)])])
            else:
                near = t.op("Less", [t.op("Abs", [offset]), _i64(t, window)])
            if not sinks:
                return near
            sink = t.op("Less", [kpos, _i64(t, sinks)])
            if causal:
                sink = t.op("And", [sink, t.op("LessOrEqual", [kpos, qpos])])
            return t.op("Or", [near, sink])

        band = window_band(window, sinks, causal)
        approximate = lambda t: emit_band_attention(t, query, key, value, bias, scale, band, rule)  # noqa: E731
        exact = lambda t: emit_exact(t, query, key, value, bias, scale, causal)  # noqa: E731
        return [emit_length_dispatch(tape, query, int(attrs.get("exact_below", 0)), exact, approximate)]
