"""kernelize.Int8Linear: ``y = x @ W + b`` on 8-bit integer dot products.

Weights are symmetric per output channel: ``W ~= weight[:, j] * weight_scale[j]``
(``weight`` int8 ``[in, out]``), in 7 bits (``|weight| <= 63``, see ``WEIGHT_MAX``). An optional ``input_scale [in]`` multiplies ``x`` first
(SmoothQuant: the calibration divides outlier input channels down and multiplies the weight
rows up by the same factor, so the product is unchanged while the activations quantize
better).

Activations are uint8, asymmetric, per tensor:

* ``activation="dynamic"``: the range is taken from each call's tensor, exactly as ONNX's
  ``DynamicQuantizeLinear`` does it (float32): ``lo = min(0, min x)``, ``hi = max(0, max x)``,
  ``s = (hi - lo) / 255``, ``z = clip(round(-lo / s), 0, 255)``,
  ``xq = clip(round(x / s) + z, 0, 255)`` (round half to even).
* ``activation="static"``: ``s = act_scale`` and ``z = act_zero_point`` were fixed at
  calibration (``QuantizeLinear``).

Integer part (exact, int32): ``acc[t, j] = sum_i (xq[t, i] - z) * weight[i, j]``.
Float part: ``y = acc * (s * weight_scale[j]) + bias[j]``.

Why 7-bit weights: on x86 CPUs without VNNI (AVX2 only, like this project's machines) MLAS
runs u8 x s8 products with ``vpmaddubsw``, which adds two products into a saturating int16:
with full 8-bit weights ``255 * 127 * 2`` overflows it and ONNX Runtime's integer results
are wrong (measured: off by up to 2e5 in the int32 accumulator at 1536 inputs). With
``|weight| <= 63`` the pair sums stay below ``2^15`` and every backend is exact; on VNNI
CPUs the same kernels run unchanged. The u8 x u8 kernel would be exact at 8 bits but is
1.2-1.3x slower than u8 x s8 here.

The accumulator cannot overflow below 2^31 / (255 * 128) = 65793 input features.

Backends. The ONNX body is ``DynamicQuantizeLinear`` (or ``QuantizeLinear``) +
``MatMulInteger`` + the float epilogue in standard ops. ONNX Runtime: the same arithmetic
in one ``com.microsoft.DynamicQuantizeMatMul`` (dynamic) or ``QuantizeLinear`` +
``com.microsoft.MatMulIntegerToFloat`` (static), both on MLAS's u8 x s8 GEMM (VNNI where the
CPU has it). TVM: quantization and epilogue as TE kernels around an int32-accumulating
matmul (``kernelize/backends/tvm/lower/int8_linear.py``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.graph import const_array
from kernelize.ops.base import Operator, add_initializer, attributes_of, const, function_inputs, swap_in

ACTIVATIONS = ("dynamic", "static")
WEIGHT_MAX = 63  # |weight| bound: exact on MLAS's saturating AVX2 u8 x s8 kernel (see above)


def quantize_dynamic(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """``DynamicQuantizeLinear`` in float32: (uint8 xq, scale, zero point) for all of ``x``."""
    x = np.asarray(x, np.float32)
    lo = np.float32(min(0.0, float(x.min()))) if x.size else np.float32(0)
    hi = np.float32(max(0.0, float(x.max()))) if x.size else np.float32(0)
    scale = np.float32((hi - lo) / np.float32(255.0))
    if scale == 0:
        return np.zeros(x.shape, np.uint8), np.float32(0.0), np.uint8(0)
    zero = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
    return quantize_static(x, scale, zero), scale, zero


def quantize_static(x: np.ndarray, scale, zero) -> np.ndarray:
    """``QuantizeLinear`` to uint8 in float32 (round half to even, saturate)."""
    q = np.round(np.asarray(x, np.float32) / np.float32(scale)) + np.float32(zero)
    return np.clip(q, 0, 255).astype(np.uint8)


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 7-bit per output channel: (int8 ``[in, out]``, float32 scale ``[out]``)."""
    weight = np.asarray(weight, np.float64)
    peak = np.max(np.abs(weight), axis=0)
    scale = np.where(peak > 0, peak / WEIGHT_MAX, 1.0)
    q = np.clip(np.round(weight / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def accumulate(xq: np.ndarray, zero, weight: np.ndarray) -> np.ndarray:
    """The integer part: ``(xq - zero) @ weight``, exact integers held in float64 (every
    partial sum stays far below 2^53, so BLAS computes it without rounding)."""
    return (np.asarray(xq, np.float64) - float(zero)) @ np.asarray(weight, np.float64)


class Int8Linear(Operator):
    name = "Int8Linear"
    inputs = ("x", "weight", "weight_scale", "bias?", "input_scale?")
    attributes = {"activation": str, "act_scale": float, "act_zero_point": int}

    def quantize(self, x, input_scale=None, *, activation, act_scale=0.0, act_zero_point=0):
        """(uint8 xq, scale, zero point) as every backend computes them."""
        x = np.asarray(x, np.float32)
        if input_scale is not None:
            x = x * np.asarray(input_scale, np.float32)
        if activation == "dynamic":
            return quantize_dynamic(x)
        if activation != "static":
            raise ValueError(f"Int8Linear activation must be one of {ACTIVATIONS}, not {activation!r}")
        return quantize_static(x, act_scale, act_zero_point), np.float32(act_scale), np.uint8(act_zero_point)

    def reference(self, x, weight, weight_scale, bias=None, input_scale=None, *, activation,
                  act_scale=0.0, act_zero_point=0):
        weight = np.asarray(weight)
        if weight.dtype != np.int8 or (weight.size and np.max(np.abs(weight.astype(np.int16))) > WEIGHT_MAX):
            raise ValueError(f"Int8Linear weight must be int8 within +-{WEIGHT_MAX}")
        xq, scale, zero = self.quantize(x, input_scale, activation=activation, act_scale=act_scale,
                                        act_zero_point=act_zero_point)
        acc = accumulate(xq, zero, weight)
        y = acc * (np.float64(scale) * np.asarray(weight_scale, np.float64))
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
        return y.astype(np.float32)

    def _quantized(self, tape, x, input_scale, attrs):
        if input_scale is not None:
            x = tape.op("Mul", [x, input_scale])
        if attrs["activation"] == "dynamic":
            xq, scale, zero = tape.op_multi_out("DynamicQuantizeLinear", [x], num_outputs=3)
            return xq, scale, zero
        scale = const(tape, attrs["act_scale"])
        zero = const(tape, attrs["act_zero_point"], np.uint8)
        return tape.op("QuantizeLinear", [x, scale, zero]), scale, zero

    def body(self, tape, inputs, attrs):
        x, weight, weight_scale, bias, input_scale = inputs
        xq, scale, zero = self._quantized(tape, x, input_scale, attrs)
        acc = tape.op("MatMulInteger", [xq, weight, zero])
        y = tape.op("Mul", [tape.op("Cast", [acc], {"to": ir.DataType.FLOAT}),
                            tape.op("Mul", [scale, weight_scale])])
        return [tape.op("Add", [y, bias]) if bias is not None else y]

    def lower_ort(self, node, graph):
        """``DynamicQuantizeMatMul`` (dynamic) or ``QuantizeLinear`` + ``MatMulIntegerToFloat``
        (static); an ``input_scale`` stays a Mul in front."""
        x, weight, weight_scale, bias, input_scale = function_inputs(node, self)
        attrs = attributes_of(node)
        out_features = const_array(weight).shape[1] if const_array(weight) is not None else None
        if out_features is None:
            return False
        zeros = _initializer(graph, f"{node.name}_weight_zero", np.zeros(out_features, np.int8))
        new = []
        if input_scale is not None:
            new.append(ir.Node("", "Mul", [x, input_scale], num_outputs=1))
            x = new[-1].outputs[0]
        if attrs["activation"] == "dynamic":
            new.append(ir.Node("com.microsoft", "DynamicQuantizeMatMul", [x, weight, weight_scale, zeros, bias],
                               num_outputs=1, name=node.name))
        else:
            scale = _initializer(graph, f"{node.name}_act_scale", np.float32(attrs["act_scale"]))
            zero = _initializer(graph, f"{node.name}_act_zero", np.uint8(attrs["act_zero_point"]))
            new.append(ir.Node("", "QuantizeLinear", [x, scale, zero], num_outputs=1))
            new.append(ir.Node("com.microsoft", "MatMulIntegerToFloat",
                               [new[-1].outputs[0], weight, scale, weight_scale, zero, zeros, bias],
                               num_outputs=1, name=node.name))
        swap_in(graph, node, new)
        return True


def _initializer(graph: ir.Graph, name: str, array) -> ir.Value:
    return add_initializer(graph, ir.Value(name=name, const_value=ir.tensor(np.asarray(array))))
