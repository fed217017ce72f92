"""TVM lowering of kernelize.Int8Linear (kernelize/ops/int8_linear.py)."""

from __future__ import annotations

from tvm import relax, te, tirx

from kernelize.backends.tvm.registry import lowering


@lowering("Int8Linear")
def int8_linear(bb, inputs, attrs):
    """Quantization as one TE kernel (the same float32 formulas as ONNX), an int32-accumulating
    ``matmul`` of the shifted activations ``xq - z`` by the int8 weights, then the float
    epilogue. The integer matmul runs on whatever the target's schedule makes of it: on x86
    without VNNI (and on the default TVM CPU schedules) it is plain int32 arithmetic, slower
    than the fp32 matmul, which the recipes' measured selection then declines (see
    ``kernelize.backends.targets.int8_dot_product``)."""
    x, weight, weight_scale, bias, input_scale = inputs
    if input_scale is not None:
        x = bb.emit(relax.op.multiply(x, input_scale))
    quantized = bb.emit_te(_quantize_te(attrs["activation"], attrs.get("act_scale", 0.0),
                                        attrs.get("act_zero_point", 0)), x, primfunc_name_hint="int8_quantize")
    shifted, scale = (bb.emit(relax.TupleGetItem(quantized, i)) for i in range(2))
    acc = bb.emit(relax.op.matmul(shifted, relax.op.astype(weight, "int32"), out_dtype="int32"))
    y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.op.multiply(scale, weight_scale)))
    return bb.emit(relax.op.add(y, bias)) if bias is not None else y


def _quantize_te(activation: str, act_scale: float, act_zero_point: int):
    """TE compute for ``(xq - z)`` as int32 and the activation scale (a 0-d float32)."""

    def compute(data):
        f32 = "float32"
        if activation == "dynamic":
            axes = [te.reduce_axis((0, d), f"r{n}") for n, d in enumerate(data.shape)]
            lo = te.compute((), lambda: te.min(data[tuple(axes)], axis=axes), name="int8_lo")
            axes2 = [te.reduce_axis((0, d), f"q{n}") for n, d in enumerate(data.shape)]
            hi = te.compute((), lambda: te.max(data[tuple(axes2)], axis=axes2), name="int8_hi")
            scale = te.compute((), lambda: (te.max(hi[()], tirx.const(0, f32)) - te.min(lo[()], tirx.const(0, f32)))
                               / tirx.const(255, f32), name="int8_scale")
            safe = te.compute((), lambda: tirx.Select(scale[()] > 0, scale[()], tirx.const(1, f32)), name="int8_div")
            zero = te.compute((), lambda: te.min(te.max(te.round(-te.min(lo[()], tirx.const(0, f32)) / safe[()]),
                                                        tirx.const(0, f32)), tirx.const(255, f32)), name="int8_zero")
            divisor, offset = (lambda: safe[()]), (lambda: zero[()])
        else:
            scale = te.compute((), lambda: tirx.const(act_scale, f32), name="int8_scale")
            divisor, offset = (lambda: tirx.const(act_scale, f32)), (lambda: tirx.const(act_zero_point, f32))

        def shifted(*i):
            q = te.min(te.max(te.round(data[i] / divisor()) + offset(), tirx.const(0, f32)), tirx.const(255, f32))
            return (q - offset()).astype("int32")

        return te.compute(data.shape, shifted, name="int8_shifted"), scale

    return compute
