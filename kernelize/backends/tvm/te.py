"""Relax / TE helpers shared by the operators' TVM lowerings (``kernelize.backends.tvm.lower``).

Each takes the frontend's Relax BlockBuilder ``bb`` and emits bindings into it. ``tvm`` is
imported when a helper runs, so importing this module (and ``kernelize.backends.tvm``) does
not import TVM.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def static_shape(expr) -> list[int]:
    """Static shape of a Relax expression (``ty`` in TVM 0.27, ``struct_info`` before)."""
    info = expr.ty if hasattr(expr, "ty") else expr.struct_info
    return [int(d) for d in info.shape]


def f32(value):
    """A float32 Relax constant (scalar or array)."""
    from tvm import relax

    return relax.const(np.asarray(value, np.float32), "float32")


def length_dispatch(query, exact_below: int, exact: Callable[[], object], approximate: Callable[[], object]):
    """The TVM side of :func:`kernelize.ops.base.emit_length_dispatch`: shapes are static
    here, so the branch is chosen while lowering (``exact`` below ``exact_below`` query
    positions, axis -2 of ``query``)."""
    length = int(query.ty.shape[-2])  # TVM 0.27: a Relax expression's type carries its shape
    return exact() if length < exact_below else approximate()


def linear(bb, x, w, b=None):
    """``x @ w (+ b)`` as Relax bindings (the bias add becomes the matmul's epilogue)."""
    from tvm import relax

    y = bb.emit(relax.op.matmul(x, w))
    return bb.emit(relax.op.add(y, b)) if b is not None else y


def softmax(bb, x):
    """Softmax over the last axis in TE: max, ``fast_exp`` (TVM's vectorizable polynomial,
    relative error < 3e-7; ``exp`` becomes a scalar libm call per element on CPU), sum, scale."""
    from tvm import te, topi

    def compute(data):
        *lead, width = data.shape
        k = te.reduce_axis((0, width), "k")
        peak = te.compute(lead, lambda *i: te.max(data[(*i, k)], axis=k), name="softmax_max")
        shifted = te.compute(data.shape, lambda *i: data[i] - peak[i[:-1]], name="softmax_shift")
        e = topi.fast_exp(shifted)
        k2 = te.reduce_axis((0, width), "k2")
        total = te.compute(lead, lambda *i: te.sum(e[(*i, k2)], axis=k2), name="softmax_sum")
        inverse = te.compute(lead, lambda *i: np.float32(1.0) / total[i], name="softmax_inv")
        return te.compute(data.shape, lambda *i: e[i] * inverse[i[:-1]], name="softmax_norm")

    return bb.emit_te(compute, x, primfunc_name_hint="softmax_fast")


def gelu(bb, x, approximate: str = "none"):
    """GELU in TE with TVM's vectorizable ``fast_erf`` / ``fast_tanh`` (relative error < 4e-7;
    the plain ``erf`` is a scalar libm call per element on CPU)."""
    from tvm import te, topi

    def compute(data):
        if approximate == "tanh":
            c = np.float32(np.sqrt(2.0 / np.pi))
            inner = te.compute(data.shape, lambda *i: c * (data[i] + np.float32(0.044715) * data[i] * data[i] * data[i]),
                               name="gelu_inner")
            t = topi.fast_tanh(inner)
        else:
            inner = te.compute(data.shape, lambda *i: data[i] * np.float32(1 / np.sqrt(2.0)), name="gelu_inner")
            t = topi.fast_erf(inner)
        return te.compute(data.shape, lambda *i: np.float32(0.5) * data[i] * (np.float32(1.0) + t[i]), name="gelu")

    return bb.emit_te(compute, x, primfunc_name_hint="gelu_tanh" if approximate == "tanh" else "gelu")


def sdpa(bb, query, key_t, value, bias, scale):
    """softmax(Q K^T * scale + bias) V with ``key_t`` already [B, H, D, Sk] (``scale`` None:
    already folded into Q)."""
    from tvm import relax

    op = relax.op
    scores = bb.emit(op.matmul(query, key_t))
    if scale is not None:
        scores = bb.emit(op.multiply(scores, relax.const(np.float32(scale), "float32")))
    if bias is not None:
        scores = bb.emit(op.add(scores, bias))
    probs = softmax(bb, scores)
    return bb.emit(op.matmul(probs, value))
