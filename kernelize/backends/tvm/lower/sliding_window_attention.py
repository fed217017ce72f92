"""TVM lowering of kernelize.SlidingWindowAttention (kernelize/ops/sliding_window_attention.py):
the banded block kernel of ``lower/block_sparse_attention.py`` over the window's band."""

from __future__ import annotations

from kernelize.backends.tvm.lower.block_sparse_attention import band_attention, exact
from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import length_dispatch
from kernelize.ops.sliding_window_attention import SlidingWindowAttention, window_band, window_rule


@lowering("SlidingWindowAttention")
def sliding_window_attention(bb, inputs, attrs):
    query, key, value, bias = inputs
    scale, causal, window, sinks = SlidingWindowAttention.settings(attrs)
    band = window_band(window, sinks, causal)
    rule = lambda i, j: window_rule(i, j, window, sinks, causal)  # noqa: E731
    approximate = lambda: band_attention(bb, query, key, value, bias, scale, band, rule,  # noqa: E731
                                         SlidingWindowAttention.name)
    return length_dispatch(query, int(attrs.get("exact_below", 0)),
                           lambda: exact(bb, query, key, value, bias, scale, causal), approximate)
