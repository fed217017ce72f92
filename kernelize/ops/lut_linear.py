"""kernelize.LUTLinear: ``y = x @ W + b`` by product quantization and table lookup (MADDNESS / LUT-NN).

The input row is split into ``C`` subspaces of ``V`` consecutive features (``in = C * V``).
Each subspace has ``K`` prototypes (``prototypes [C, K, V]``, learned by k-means on
calibration activations). ``tables [C, K, out]`` (int8) hold ``prototype_ck . W_c`` quantized
per output channel, so that ``W`` is replaced by a lookup::

    code[t, c] = argmin_k ||x[t, c] - prototypes[c, k]||^2        (encode; ties: lowest k)
    acc[t, j]  = sum_c tables[c, code[t, c], j]                   (gather + int32 accumulate)
    y[t, j]    = acc[t, j] * scale[j] + offset[j]                 (dequantize)

``prototypes`` may be stored in float16 (as the calibration does: half the bytes); every
backend computes with those values in float32 (the reference in float64).
``offset`` holds the bias plus the tables' per-channel offsets (see
:mod:`kernelize.methods.projection`). The accumulation is exact integer arithmetic in every
backend; the encoding is float arithmetic, so backends agree except where two prototypes are
equally near to within float32 rounding (a measure-zero case on real data).

Backends: the ONNX body uses standard ops (Sub/ReduceSum/ArgMin, Gather of int8 rows,
ReduceSum in int32). The TVM lowering is one fused hand-scheduled kernel: for a block of
tokens it encodes (distances ``|p|^2 - 2 x.p`` vectorized over the K prototypes, then the
argmin) and then, per tile of output channels, gathers and accumulates the int8 table rows
into int32 vector registers for a few tokens at a time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, const


def encode(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Nearest prototype per subspace: int64 ``[..., C]`` for ``x [..., C*V]``."""
    c, k, v = prototypes.shape
    xs = np.asarray(x, np.float64).reshape(*x.shape[:-1], c, 1, v)
    distance = np.sum((xs - np.asarray(prototypes, np.float64)) ** 2, axis=-1)
    return np.argmin(distance, axis=-1)


def accumulate(codes: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """The integer part: ``sum_c tables[c, code_c, :]`` (int64) for ``codes [..., C]``."""
    c = tables.shape[0]
    rows = np.asarray(tables, np.int64)[np.arange(c), codes]  # [..., C, out]
    return rows.sum(axis=-2)


class LUTLinear(Operator):
    name = "LUTLinear"
    inputs = ("x", "prototypes", "tables", "scale", "offset")
    attributes = {}

    def reference(self, x, prototypes, tables, scale, offset):
        c, k, v = prototypes.shape
        if x.shape[-1] != c * v:
            raise ValueError(f"x has {x.shape[-1]} features, prototypes cover {c} x {v}")
        acc = accumulate(encode(x, prototypes), tables)
        return (acc * np.asarray(scale, np.float64) + np.asarray(offset, np.float64)).astype(np.float32)

    def body(self, tape, inputs, attrs):
        x, prototypes, tables, scale, offset = inputs
        i64 = lambda values: const(tape, values, np.int64)  # noqa: E731
        prototypes = tape.op("Cast", [prototypes], {"to": ir.DataType.FLOAT})  # float16 storage allowed
        proto_shape = tape.op("Shape", [prototypes])  # [C, K, V]
        lead = tape.op("Shape", [x], {"end": -1})
        split = tape.op("Concat", [lead, tape.op("Gather", [proto_shape, i64([0])]), i64([1]),
                                   tape.op("Gather", [proto_shape, i64([2])])], {"axis": 0})
        xs = tape.op("Reshape", [x, split])  # [..., C, 1, V]
        diff = tape.op("Sub", [xs, prototypes])  # [..., C, K, V]
        distance = tape.op("ReduceSum", [tape.op("Mul", [diff, diff]), i64([-1])], {"keepdims": 0})
        code = tape.op("ArgMin", [distance], {"axis": -1, "keepdims": 0, "select_last_index": 0})  # [..., C]
        count = tape.op("Gather", [proto_shape, i64([0])])
        protos_k = tape.op("Gather", [proto_shape, i64(1)])
        base = tape.op("Mul", [tape.op("Range", [i64(0), tape.op("Squeeze", [count]), i64(1)]), protos_k])
        index = tape.op("Add", [code, base])  # flat row c * K + code
        table_shape = tape.op("Shape", [tables])
        flat = tape.op("Reshape", [tables, tape.op("Concat", [i64([-1]), tape.op("Gather", [table_shape, i64([2])])],
                                                   {"axis": 0})])
        rows = tape.op("Cast", [tape.op("Gather", [flat, index], {"axis": 0})], {"to": ir.DataType.INT32})
        acc = tape.op("ReduceSum", [rows, i64([-2])], {"keepdims": 0})  # int32 [..., out]
        y = tape.op("Mul", [tape.op("Cast", [acc], {"to": ir.DataType.FLOAT}), scale])
        return [tape.op("Add", [y, offset])]
