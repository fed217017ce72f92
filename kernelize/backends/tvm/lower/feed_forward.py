"""TVM lowering of kernelize.FeedForward (kernelize/ops/feed_forward.py)."""

from __future__ import annotations

from tvm import relax

from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import gelu, linear


@lowering("FeedForward")
def feed_forward(bb, inputs, attrs):
    """Two matmuls with bias; the activation stays elementwise so that operator fusion makes
    it the first matmul's epilogue."""
    x, w1, b1, w2, b2 = inputs
    act = attrs["activation"]
    h = linear(bb, x, w1, b1)
    if act == "relu":
        h = bb.emit(relax.op.nn.relu(h))
    elif act in ("gelu", "gelu_tanh"):
        h = gelu(bb, h, "tanh" if act == "gelu_tanh" else "none")
    else:
        raise ValueError(f"unknown activation {act!r}")
    return linear(bb, h, w2, b2)
