"""Feature maps phi of kernelized (linear) attention, shared by the operators that use them.

A feature map turns head-split queries or keys ``x [..., H, S, D]`` into non-negative
features ``[..., H, S, M]`` so that ``phi(q) . phi(k)`` stands in for the softmax kernel
``exp(scale * q . k)``. Each map has three agreeing forms: :func:`reference` (NumPy,
float64), :func:`emit_onnx` (standard ONNX ops, opset 20) and a Relax one in the TVM backend
(``kernelize/backends/tvm/lower/feature_maps.py``).

Scaling convention (one for every map): the caller multiplies queries and keys by
``sqrt(scale)`` before the map, so the map approximates ``exp(q' . k')`` on the scaled
``q' = q sqrt(scale)``, ``k' = k sqrt(scale)``. FAVOR+ is then unbiased for the softmax
kernel, and hedgehog weights are trained on (and applied to) the scaled inputs.

Maps (``FEATURE_MAPS``):

- ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020), M = D.
- ``relu``: ``relu(x)``, M = D. No epsilon is added to the features; the operator's
  normalizer carries one instead.
- ``favor``: Performer FAVOR+ positive orthogonal random features (Choromanski et al. 2021),
  ``phi(x) = exp(x w - |x|^2 / 2 - stabilizer) / sqrt(M)`` with ``w [H or 1, D, M]`` from
  :func:`favor_weight` (fixed seed, never redrawn at inference). The stabilizer keeps
  ``exp`` from overflowing and cancels in the attention's normalization: for queries it is
  the maximum of the exponent over each row's features, for keys one maximum over all keys
  and features of a head (so it is a constant factor of every key of that head).
- ``hedgehog`` (Zhang et al. 2024, "The Hedgehog & the Porcupine"): ``z = x W + b`` with
  ``W [H, D, M/2]``, ``b [H, 1, M/2]``, ``phi(x) = concat(softmax(z), softmax(-z))`` over
  the feature axis, M = 2 * (M/2).
"""

from __future__ import annotations

import numpy as np

from kernelize.ops.attention import softmax

FEATURE_MAPS = ("elu", "relu", "favor", "hedgehog")
ROLES = ("query", "key")


def check(kind: str, role: str, weight, bias) -> None:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")
    if role not in ROLES:
        raise ValueError(f"role must be 'query' or 'key', not {role!r}")
    if kind == "favor" and weight is None:
        raise ValueError("the favor feature map needs its random projection (feature_weight)")
    if kind == "hedgehog" and (weight is None or bias is None):
        raise ValueError("the hedgehog feature map needs feature_weight and feature_bias")


def feature_count(kind: str, head_size: int, weight=None) -> int:
    """M, the number of features per position (``weight``: an array or anything with a
    ``shape``; None for the parameter-free maps)."""
    if kind in ("elu", "relu"):
        return int(head_size)
    if weight is None:
        raise ValueError(f"the {kind} feature map needs its weight to know the feature count")
    last = int(np.shape(weight)[-1]) if not hasattr(weight, "shape") else int(weight.shape[-1])
    return last if kind == "favor" else 2 * last


def favor_weight(head_size: int, features: int, heads: int, seed: int = 0) -> np.ndarray:
    """FAVOR+ projections ``[heads, head_size, features]`` (float32): per head, blocks of
    ``head_size`` orthogonal directions (QR of a Gaussian matrix) whose lengths are drawn
    like the norms of Gaussian vectors, so each column is marginally N(0, I) while the
    columns within a block are exactly orthogonal (lower variance than i.i.d. ones)."""
    rng = np.random.default_rng(seed)
    weight = np.empty((heads, head_size, features), np.float64)
    for h in range(heads):
        columns = []
        for _ in range(-(-features // head_size)):
            q, r = np.linalg.qr(rng.standard_normal((head_size, head_size)))
            columns.append(q * np.sign(np.diag(r)))  # sign fix: Haar-distributed directions
        block = np.concatenate(columns, axis=1)[:, :features]  # [D, M], orthonormal columns per block
        lengths = np.linalg.norm(rng.standard_normal((features, head_size)), axis=1)
        weight[h] = block * lengths[None, :]
    return weight.astype(np.float32)


# -- NumPy -----------------------------------------------------------------------------------
def reference(kind: str, x: np.ndarray, role: str, weight=None, bias=None) -> np.ndarray:
    """Features of ``x [..., H, S, D]`` (float64 in and out): ``[..., H, S, M]``."""
    check(kind, role, weight, bias)
    x = np.asarray(x, np.float64)
    if kind == "elu":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    w = np.asarray(weight, np.float64)
    if kind == "favor":
        exponent = x @ w - 0.5 * np.sum(x * x, axis=-1, keepdims=True)
        axes = (-1,) if role == "query" else (-2, -1)
        stabilizer = np.max(exponent, axis=axes, keepdims=True)
        return np.exp(exponent - stabilizer) / np.sqrt(w.shape[-1])
    z = x @ w + np.asarray(bias, np.float64)
    return np.concatenate([softmax(z), softmax(-z)], axis=-1)


# -- ONNX ------------------------------------------------------------------------------------
def emit_onnx(tape, kind: str, x, role: str, weight=None, bias=None):
    """The features of ``x`` as standard ONNX ops (opset 20) appended to ``tape``."""
    from kernelize.ops.base import const

    check(kind, role, weight, bias)
    if kind == "elu":
        return tape.op("Add", [tape.op("Elu", [x], {"alpha": 1.0}), const(tape, 1.0)])
    if kind == "relu":
        return tape.op("Relu", [x])
    if kind == "favor":
        projected = tape.op("MatMul", [x, weight])
        square = tape.op("ReduceSum", [tape.op("Mul", [x, x]), const(tape, [-1], np.int64)], {"keepdims": 1})
        exponent = tape.op("Sub", [projected, tape.op("Mul", [square, const(tape, 0.5)])])
        axes = [-1] if role == "query" else [-2, -1]
        stabilizer = tape.op("ReduceMax", [exponent, const(tape, axes, np.int64)], {"keepdims": 1})
        features = tape.op("Exp", [tape.op("Sub", [exponent, stabilizer])])
        count = tape.op("Cast", [tape.op("Shape", [weight], {"start": -1})], {"to": 1})  # M as float
        return tape.op("Div", [features, tape.op("Sqrt", [count])])
    z = tape.op("Add", [tape.op("MatMul", [x, weight]), bias])
    positive = tape.op("Softmax", [z], {"axis": -1})
    negative = tape.op("Softmax", [tape.op("Neg", [z])], {"axis": -1})
    return tape.op("Concat", [positive, negative], {"axis": -1})
