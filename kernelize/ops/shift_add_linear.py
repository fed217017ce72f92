"""kernelize.ShiftAddLinear: ``y = x @ W + b`` with W in powers of two (DeepShift / ShiftAddViT).

Weights. Each weight is ``scale[c] * sum_t sign_t * 2^-shift_t`` over ``terms`` (1 or 2)
signed powers of two, ``scale`` per output channel. A term is a 4-bit code (a nibble):
bit 3 is the sign (1 = negative), bits 0..2 the right shift ``0..7``. Two nibbles share a
byte: ``codes`` is uint8 ``[ceil(terms * in / 2), out]``; nibble ``n = i * terms + t``
(input row ``i``, term ``t``) lives in byte row ``n // 2``, low half when ``n`` is even.
So one term takes half a byte per weight (8x less than fp32), two terms a byte (4x).

Activations are fixed point with a static per-tensor format chosen at calibration:
``xq = clip(floor(x * 2^frac_bits + 0.5), -2^(act_bits-1), 2^(act_bits-1) - 1)`` (int32).

Integer part (exact, int32; no multiplies)::

    acc[t, c] = sum_i sum_terms  sign * (xq[t, i] >> shift)        (>> arithmetic: floor)

Float part: ``y = acc * (scale[c] * 2^-frac_bits) + bias[c]``. The floor of each shift
biases ``acc`` by about -1/2 per term with a nonzero shift; the calibration folds that mean
error into ``bias``. ``acc`` stays in int32 while ``2^(act_bits-1) * terms * in < 2^31``
(act_bits 16: in <= 32768 for two terms); ``reference`` checks it.

Backends: the TVM kernel is one hand-scheduled PrimFunc: per input row it decodes a vector
of nibbles into shift amounts and sign masks once, then for a tile of token rows adds
``(xq >> shift) ^ mask`` into int32 accumulators (a vector shift, a xor and an add per 8
weights); ``x ^ -1 = -x - 1``, so the count of negative terms per channel (a constant of the
weights) is added back in the epilogue. The ONNX body runs the same integer arithmetic in
standard ops: one int32 MatMul of the 8 shifted copies ``floor(xq * 2^-s)`` (exact in float32)
against the decoded ``{-2..2}`` matrix of each shift; ONNX Runtime folds that decoding of the
constant codes when the session starts, so in ONNX Runtime the codes save file/transfer size,
not run-time memory or time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, const

MAX_SHIFT = 7  # 3 bits of shift per nibble
SIGN_BIT = 8


# -- codes (shared with kernelize.methods.projection) ------------------------------------
def pack_codes(signs: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """uint8 codes ``[ceil(terms*in/2), out]`` from ``signs`` (+1/-1) and ``shifts`` (0..7),
    both ``[in, terms, out]``."""
    signs, shifts = np.asarray(signs), np.asarray(shifts)
    if shifts.min() < 0 or shifts.max() > MAX_SHIFT or not np.all(np.abs(signs) == 1):
        raise ValueError("shifts must be 0..7 and signs +1/-1")
    in_features, terms, out = shifts.shape
    nibbles = (shifts.astype(np.uint8) | np.where(signs < 0, SIGN_BIT, 0).astype(np.uint8))
    nibbles = nibbles.reshape(in_features * terms, out)
    if nibbles.shape[0] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((1, out), np.uint8)])  # padding: +x >> 0 of a zero row
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_codes(codes: np.ndarray, terms: int, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(signs int64 +1/-1, shifts int64 0..7), each ``[in, terms, out]``."""
    codes = np.asarray(codes, np.uint8)
    nibbles = np.stack([codes & 15, codes >> 4], axis=1).reshape(-1, codes.shape[1])
    nibbles = nibbles[: in_features * terms].reshape(in_features, terms, -1).astype(np.int64)
    return 1 - 2 * (nibbles >> 3), nibbles & MAX_SHIFT


def code_rows(terms: int, in_features: int) -> int:
    return (terms * in_features + 1) // 2


def quantize_activations(x: np.ndarray, frac_bits: int, act_bits: int) -> np.ndarray:
    """The fixed-point activations (int64 values), exactly as the kernels compute them."""
    top = 2.0 ** (act_bits - 1)
    scaled = np.floor(np.asarray(x, np.float64) * 2.0**frac_bits + 0.5)
    return np.clip(scaled, -top, top - 1).astype(np.int64)


def accumulate(xq: np.ndarray, codes: np.ndarray, terms: int) -> np.ndarray:
    """The integer part: ``sum sign * (xq >> shift)`` (int64 values) for ``xq`` [..., in].

    Computed as one product per shift level in float64 (BLAS): every operand and partial sum
    is an integer far below 2^53, so the result is exact."""
    in_features = xq.shape[-1]
    signs, shifts = unpack_codes(codes, terms, in_features)
    xq = np.asarray(xq, np.int64)
    acc = np.zeros((*xq.shape[:-1], codes.shape[1]), np.float64)
    for s in range(MAX_SHIFT + 1):
        level = np.sum(np.where(shifts == s, signs, 0), axis=1)  # [in, out], -2..2
        if np.any(level):
            acc += (xq >> s).astype(np.float64) @ level.astype(np.float64)
    return acc.astype(np.int64)


def dense_weight(codes: np.ndarray, scale: np.ndarray, terms: int, in_features: int) -> np.ndarray:
    """The float64 weight ``[in, out]`` the codes stand for."""
    signs, shifts = unpack_codes(codes, terms, in_features)
    return np.sum(signs * 2.0 ** (-shifts), axis=1) * np.asarray(scale, np.float64)


class ShiftAddLinear(Operator):
    name = "ShiftAddLinear"
    inputs = ("x", "codes", "scale", "bias?")
    attributes = {"terms": int, "frac_bits": int, "act_bits": int}

    def reference(self, x, codes, scale, bias=None, *, terms, frac_bits, act_bits=16):
        in_features = x.shape[-1]
        if codes.shape[0] != code_rows(terms, in_features):
            raise ValueError(f"codes have {codes.shape[0]} rows, {code_rows(terms, in_features)} expected")
        if 2.0 ** (act_bits - 1) * terms * in_features >= 2.0**31:
            raise ValueError("act_bits too wide for an int32 accumulator at this input width")
        acc = accumulate(quantize_activations(x, frac_bits, act_bits), codes, terms)
        y = acc * (np.asarray(scale, np.float64) * 2.0**-frac_bits)
        if bias is not None:
            y = y + bias
        return y.astype(np.float32)

    # -- ONNX body ---------------------------------------------------------------------------
    def body(self, tape, inputs, attrs):
        x, codes, scale, bias = inputs
        terms, frac_bits = attrs["terms"], attrs["frac_bits"]
        act_bits = attrs.get("act_bits", 16)
        levels = MAX_SHIFT + 1
        # decode the codes: [P, out] uint8 -> level matrix [levels * in, out] int32
        low = tape.op("BitwiseAnd", [codes, const(tape, 15, np.uint8)])
        high = tape.op("BitShift", [codes, const(tape, 4, np.uint8)], {"direction": "RIGHT"})
        pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, const(tape, [1], np.int64)]),
                                   tape.op("Unsqueeze", [high, const(tape, [1], np.int64)])], {"axis": 1})
        width = tape.op("Shape", [codes], {"start": 1})  # [out]
        nibbles = tape.op("Reshape", [pairs, tape.op("Concat", [const(tape, [-1], np.int64), width],
                                                     {"axis": 0})])  # [2P, out]
        in_features = tape.op("Shape", [x], {"start": -1})
        used = tape.op("Mul", [in_features, const(tape, [terms], np.int64)])
        nibbles = tape.op("Slice", [nibbles, const(tape, [0], np.int64), used, const(tape, [0], np.int64)])
        sign_bit = tape.op("BitShift", [nibbles, const(tape, 3, np.uint8)], {"direction": "RIGHT"})
        shift = tape.op("BitwiseAnd", [nibbles, const(tape, MAX_SHIFT, np.uint8)])
        signed = tape.op("Sub", [const(tape, 1, np.int32),
                                 tape.op("Mul", [tape.op("Cast", [sign_bit], {"to": ir.DataType.INT32}),
                                                 const(tape, 2, np.int32)])])  # [terms*in, out]
        onehot = tape.op("Cast", [tape.op("Equal", [shift, const(tape, np.arange(levels).reshape(levels, 1, 1),
                                                                np.uint8)])], {"to": ir.DataType.INT32})
        per_term = tape.op("Mul", [onehot, signed])  # [levels, terms*in, out]
        shape = tape.op("Concat", [const(tape, [levels, -1, terms], np.int64), width], {"axis": 0})
        level = tape.op("ReduceSum", [tape.op("Reshape", [per_term, shape]), const(tape, [2], np.int64)],
                        {"keepdims": 0})  # [levels, in, out]
        level = tape.op("Reshape", [level, tape.op("Concat", [const(tape, [-1], np.int64), width], {"axis": 0})])
        # fixed-point activations and their shifted copies floor(xq * 2^-s), exact in float32
        top = 2.0 ** (act_bits - 1)
        xq = tape.op("Floor", [tape.op("Add", [tape.op("Mul", [x, const(tape, 2.0**frac_bits)]), const(tape, 0.5)])])
        xq = tape.op("Clip", [xq, const(tape, -top), const(tape, top - 1)])
        pow2 = const(tape, (2.0 ** -np.arange(levels)).reshape(levels, 1))
        shifted = tape.op("Floor", [tape.op("Mul", [tape.op("Unsqueeze", [xq, const(tape, [-2], np.int64)]), pow2])])
        lead = tape.op("Shape", [x], {"end": -1})
        flat = tape.op("Reshape", [shifted, tape.op("Concat", [lead, const(tape, [-1], np.int64)], {"axis": 0})])
        acc = tape.op("MatMul", [tape.op("Cast", [flat], {"to": ir.DataType.INT32}), level])
        step = tape.op("Mul", [scale, const(tape, 2.0**-frac_bits)])
        y = tape.op("Mul", [tape.op("Cast", [acc], {"to": ir.DataType.FLOAT}), step])
        if bias is not None:
            y = tape.op("Add", [y, bias])
        return [y]

    # -- TVM ---------------------------------------------------------------------------------
    def lower_tvm(self, bb, inputs, attrs):
        """TVM Relax: a small kernel quantizes x, one hand-scheduled kernel does the shift-adds
        and the epilogue (see the module docstring)."""
        from tvm import relax

        x, codes, scale, bias = inputs
        terms, frac_bits = attrs["terms"], attrs["frac_bits"]
        act_bits = attrs.get("act_bits", 16)
        shape = [int(d) for d in x.ty.shape]
        in_features, out = shape[-1], int(codes.ty.shape[1])
        tokens = int(np.prod(shape[:-1]))
        x2 = bb.emit(relax.op.reshape(x, [tokens, in_features]))
        xq = bb.emit_te(_quantize_te, x2, frac_bits, act_bits, primfunc_name_hint="shift_add_quantize")
        negatives = _negative_counts(bb, codes, terms, in_features)
        step = bb.emit(relax.op.multiply(scale, relax.const(np.float32(2.0**-frac_bits))))
        if bias is None:
            bias = relax.const(np.zeros(out, np.float32))
        func = _shift_add_kernel(tokens, in_features, out, terms)
        gvar = bb.add_func(func, "shift_add_linear")
        y = bb.emit(relax.call_tir(gvar, [xq, codes, negatives, step, bias],
                                   relax.TensorType([tokens, out], "float32")))
        return bb.emit(relax.op.reshape(y, [*shape[:-1], out]))


def _quantize_te(x, frac_bits, act_bits):
    from tvm import te, tirx

    top = float(2 ** (act_bits - 1))

    def q(t, i):
        v = tirx.floor(x[t, i] * np.float32(2.0**frac_bits) + np.float32(0.5))
        v = tirx.max(tirx.min(v, np.float32(top - 1)), np.float32(-top))
        return v.astype("int32")

    return te.compute(x.shape, q, name="xq")


def constant_array(expr) -> np.ndarray | None:
    """The NumPy value of a Relax constant (a weight initializer), else None."""
    from tvm.ir.expr import Constant

    return expr.value.numpy() if isinstance(expr, Constant) else None


def _negative_counts(bb, codes, terms, in_features):
    """Per output channel, the number of negative terms (int32 [out]): numpy on constant
    codes, else a small TE reduction."""
    from tvm import relax, te

    constant = constant_array(codes)
    if constant is not None:
        signs, _ = unpack_codes(constant, terms, in_features)
        return relax.const(np.sum(signs < 0, axis=(0, 1)).astype(np.int32))

    def count(c):
        rows, out = c.shape
        p = te.reduce_axis((0, rows), "p")
        return te.compute((out,), lambda j: te.sum(((c[p, j] >> 3) & 1).astype("int32")
                                                   + ((c[p, j] >> 7) & 1).astype("int32"), axis=p),
                          name="negatives")

    return bb.emit_te(count, codes, primfunc_name_hint="shift_add_negatives")


def _shift_add_kernel(tokens: int, in_features: int, out: int, terms: int):
    """The scheduled PrimFunc ``(xq [T, in] i32, codes [P, out] u8, negatives [out] i32,
    step [out] f32, bias [out] f32) -> y [T, out] f32``."""
    from tvm import s_tir, te, tirx

    rows = code_rows(terms, in_features)
    xq = te.placeholder((tokens, in_features), "int32", name="xq")
    codes = te.placeholder((rows, out), "uint8", name="codes")
    negatives = te.placeholder((out,), "int32", name="negatives")
    step = te.placeholder((out,), "float32", name="step")
    bias = te.placeholder((out,), "float32", name="bias")
    p = te.reduce_axis((0, rows), "p")
    h = te.reduce_axis((0, 2), "h")

    def term(t, c, p, h):
        nibble = ((codes[p, c] >> (h * 4).astype("uint8")) & tirx.const(15, "uint8")).astype("int32")
        shift = nibble & 7
        mask = tirx.const(0, "int32") - (nibble >> 3)  # 0 or -1
        row = 2 * p + h if terms == 1 else p
        if terms == 1 and in_features % 2:  # the padding nibble reads past the last row
            value = tirx.if_then_else(row < in_features, xq[t, tirx.min(row, in_features - 1)], 0)
        else:
            value = xq[t, row]
        return (value >> shift) ^ mask

    acc = te.compute((tokens, out), lambda t, c: te.sum(term(t, c, p, h), axis=[p, h]), name="acc")
    y = te.compute((tokens, out), lambda t, c: (acc[t, c] + negatives[c]).astype("float32") * step[c] + bias[c],
                   name="y")
    func = te.create_prim_func([xq, codes, negatives, step, bias, y])
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    lanes = 8
    nr = 2 * lanes if out % (2 * lanes) == 0 else (lanes if out % lanes == 0 else 1)
    mr = min(4 if nr == 2 * lanes else 6, tokens)
    t_loop, c_loop, p_loop, h_loop = sch.get_loops(block)
    c_outer, c_inner = sch.split(c_loop, [None, nr])
    t_outer, t_inner = sch.split(t_loop, [None, mr])
    sch.reorder(c_outer, t_outer, p_loop, h_loop, t_inner, c_inner)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, t_outer, preserve_unit_loops=True)
    sch.reverse_compute_inline(sch.get_sblock("y"))
    sch.parallel(sch.fuse(c_outer, t_outer) if tokens > mr else c_outer)
    sch.unroll(h_loop)
    sch.unroll(t_inner)
    if nr > 1:
        sch.vectorize(c_inner)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(block, p_loop)
    if nr > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
