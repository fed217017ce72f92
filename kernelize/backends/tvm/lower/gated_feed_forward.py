"""TVM lowering of kernelize.GatedFeedForward (kernelize/ops/gated_feed_forward.py)."""

from __future__ import annotations

from tvm import relax

from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import linear


@lowering("GatedFeedForward")
def gated_feed_forward(bb, inputs, attrs):
    """silu(x Wg) * (x Wu), then the down projection."""
    x, w_gate, w_up, w_down = inputs
    gate = bb.emit(relax.op.nn.silu(linear(bb, x, w_gate)))
    h = bb.emit(relax.op.multiply(gate, linear(bb, x, w_up)))
    return linear(bb, h, w_down)
