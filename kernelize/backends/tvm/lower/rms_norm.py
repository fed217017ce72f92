"""TVM lowering of kernelize.RMSNorm (kernelize/ops/rms_norm.py)."""

from __future__ import annotations

from tvm import relax

from kernelize.backends.tvm.registry import lowering


@lowering("RMSNorm")
def rms_norm(bb, inputs, attrs):
    """``nn.rms_norm`` over the last axis."""
    x, weight = inputs
    return bb.emit(relax.op.nn.rms_norm(x, weight, axes=[-1], epsilon=attrs["epsilon"]))
