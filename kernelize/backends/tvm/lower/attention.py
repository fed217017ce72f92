"""TVM lowering of kernelize.Attention (kernelize/ops/attention.py)."""

from __future__ import annotations

from tvm import relax

from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import sdpa


@lowering("Attention")
def attention(bb, inputs, attrs):
    """K is transposed to [B, H, D, Sk] once, so both products are plain (non-transposed)
    batched matmuls for the CPU schedule."""
    query, key, value, bias = inputs
    key_t = bb.emit(relax.op.permute_dims(key, [0, 1, 3, 2]))
    return sdpa(bb, query, key_t, value, bias, attrs["scale"])
