"""TVM lowering of kernelize.SkipLayerNorm (kernelize/ops/skip_layer_norm.py)."""

from __future__ import annotations

from tvm import relax

from kernelize.backends.tvm.registry import lowering


@lowering("SkipLayerNorm")
def skip_layer_norm(bb, inputs, attrs):
    """The sum and ``nn.layer_norm`` (no beta: a zero one); outputs (normalized, sum)."""
    x, skip, gamma, beta = inputs
    total = bb.emit(relax.op.add(x, skip))
    if beta is None:
        beta = bb.emit(relax.op.zeros_like(gamma))
    y = bb.emit(relax.op.nn.layer_norm(total, gamma, beta, axes=[-1], epsilon=attrs["epsilon"]))
    return [y, total]
