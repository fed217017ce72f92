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

Backends. TVM: a small kernel quantizes x into two int32 operands, ``xq`` and
``~xq << 8`` (``~x = -x - 1``); one hand-scheduled PrimFunc then, per code byte row and tile
of 16 output channels, adds ``select(negative, ~xq << 8, xq) >> nibble`` for both nibbles
into int32 vector accumulators: for a negative nibble ``8 + s`` the shift count is the nibble
itself, ``(~xq << 8) >> (8 + s) = ~(xq >> s)``, so decoding a term costs a blend and a
variable shift, no masking of the sign (where ``act_bits > 23`` the pre-shift would overflow
and the shift count is masked instead). The count of negative terms per channel (a constant
of the weights) is added back in the epilogue. ONNX body: the same integer arithmetic in
standard ops, split at ``xq = 128 a + b`` (see ``body``): a float32 MatMul of ``a`` by the
integer weight ``128 W / scale`` (in row chunks that keep every partial sum exact) plus one
8-bit ``MatMulInteger`` of the seven shifted copies ``b >> s`` by the ``{-2..2}`` level
matrices. ONNX Runtime folds the decoding of the constant codes when the session starts, so
in ONNX Runtime the codes save file/transfer size, not run-time memory: the folded matrices
take ``in * out * (4 + 7)`` bytes.
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
        """Exact integer arithmetic in standard ops, split at ``2^MAX_SHIFT = 128``:
        ``xq = 128 a + b`` with ``0 <= b < 128``, so for every shift ``s <= 7``
        ``xq >> s = 2^(7-s) a + (b >> s)`` and

            acc = a @ Wint + sum_{s<7} (b >> s) @ L_s

        where ``L_s [in, out]`` (-2..2) counts the signed terms with shift ``s`` and
        ``Wint = sum_s 2^(7-s) L_s = 128 W / scale``. The first product is a float32 MatMul in
        chunks of input rows small enough that every partial sum is an integer below 2^24
        (exact in any order); the second is one 8-bit ``MatMulInteger`` (uint8 ``b >> s`` by
        int8 ``L_s``) with int32 accumulation. Both weight matrices are decoded from the
        constant codes, which ONNX Runtime folds when the session starts."""
        x, codes, scale, bias = inputs
        terms, frac_bits = attrs["terms"], attrs["frac_bits"]
        act_bits = attrs.get("act_bits", 16)
        i64 = lambda values: const(tape, values, np.int64)  # noqa: E731
        levels = MAX_SHIFT + 1
        width = tape.op("Shape", [codes], {"start": 1})  # [out]
        in_features = tape.op("Shape", [x], {"start": -1})  # [in]
        level = _decode_levels(tape, codes, terms, in_features, width)  # int32 [levels, in, out]
        # fixed-point activations, then xq = 128 a + b
        top = 2.0 ** (act_bits - 1)
        xq = tape.op("Floor", [tape.op("Add", [tape.op("Mul", [x, const(tape, 2.0**frac_bits)]), const(tape, 0.5)])])
        xq = tape.op("Clip", [xq, const(tape, -top), const(tape, top - 1)])
        xq = tape.op("Reshape", [xq, tape.op("Concat", [i64([-1]), in_features], {"axis": 0})])  # [N, in]
        step_of_a = float(2**MAX_SHIFT)
        a = tape.op("Floor", [tape.op("Mul", [xq, const(tape, 1.0 / step_of_a)])])
        b = tape.op("Sub", [xq, tape.op("Mul", [a, const(tape, step_of_a)])])  # 0..127
        # (b >> s) @ L_s over s < 7 as one uint8 x int8 product ([N, 7*in] @ [7*in, out])
        pow2 = const(tape, (2.0 ** -np.arange(MAX_SHIFT)).reshape(MAX_SHIFT, 1))
        b_shifted = tape.op("Floor", [tape.op("Mul", [tape.op("Unsqueeze", [b, i64([1])]), pow2])])  # [N, 7, in]
        b_shifted = tape.op("Cast", [tape.op("Reshape", [b_shifted, tape.op("Concat", [
            tape.op("Shape", [xq], {"end": 1}), i64([-1])], {"axis": 0})])], {"to": ir.DataType.UINT8})
        low_levels = tape.op("Slice", [level, i64([0]), i64([MAX_SHIFT]), i64([0])])
        low_levels = tape.op("Cast", [tape.op("Reshape", [low_levels, tape.op("Concat", [i64([-1]), width],
                                                                              {"axis": 0})])], {"to": ir.DataType.INT8})
        acc_low = tape.op("MatMulInteger", [b_shifted, low_levels])  # int32 [N, out]
        # a @ Wint in float32, chunked over input rows (zero-padded to whole chunks)
        weights = const(tape, (2.0 ** (MAX_SHIFT - np.arange(levels))).reshape(levels, 1, 1))
        w_int = tape.op("ReduceSum", [tape.op("Mul", [tape.op("Cast", [level], {"to": ir.DataType.FLOAT}), weights]),
                                      i64([0])], {"keepdims": 0})  # [in, out]
        chunk = _exact_chunk_rows(terms, act_bits)
        chunk_c = i64([chunk])
        pad = tape.op("Mod", [tape.op("Sub", [chunk_c, tape.op("Mod", [in_features, chunk_c])]), chunk_c])
        zero2 = i64([0, 0])
        a_padded = tape.op("Pad", [a, tape.op("Concat", [zero2, i64([0]), pad], {"axis": 0})])  # columns
        w_padded = tape.op("Pad", [w_int, tape.op("Concat", [zero2, pad, i64([0])], {"axis": 0})])  # rows
        a_chunks = tape.op("Transpose", [tape.op("Reshape", [a_padded, tape.op("Concat", [
            tape.op("Shape", [xq], {"end": 1}), i64([-1, chunk])], {"axis": 0})])], {"perm": [1, 0, 2]})
        w_chunks = tape.op("Reshape", [w_padded, tape.op("Concat", [i64([-1, chunk]), width], {"axis": 0})])
        partial = tape.op("Cast", [tape.op("MatMul", [a_chunks, w_chunks])], {"to": ir.DataType.INT32})
        acc_high = tape.op("ReduceSum", [partial, i64([0])], {"keepdims": 0})  # int32 [N, out]
        acc = tape.op("Add", [acc_low, acc_high])
        step = tape.op("Mul", [scale, const(tape, 2.0**-frac_bits)])
        y = tape.op("Mul", [tape.op("Cast", [acc], {"to": ir.DataType.FLOAT}), step])
        if bias is not None:
            y = tape.op("Add", [y, bias])
        lead = tape.op("Shape", [x], {"end": -1})
        return [tape.op("Reshape", [y, tape.op("Concat", [lead, width], {"axis": 0})])]

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
        operands = bb.emit_te(_operands_te, x2, frac_bits, act_bits, primfunc_name_hint="shift_add_quantize")
        negatives = _negative_counts(bb, codes, terms, in_features)
        scale_value = constant_array(scale)  # a weight: fold the step here (one kernel call less)
        if scale_value is not None:
            step = relax.const((scale_value.astype(np.float32) * np.float32(2.0**-frac_bits)).astype(np.float32))
        else:
            step = bb.emit(relax.op.multiply(scale, relax.const(np.float32(2.0**-frac_bits))))
        if bias is None:
            bias = relax.const(np.zeros(out, np.float32))
        func = _shift_add_kernel(tokens, in_features, out, terms, act_bits)
        gvar = bb.add_func(func, "shift_add_linear")
        y = bb.emit(relax.call_tir(gvar, [operands, codes, negatives, step, bias],
                                   relax.TensorType([tokens, out], "float32")))
        return bb.emit(relax.op.reshape(y, [*shape[:-1], out]))


def _exact_chunk_rows(terms: int, act_bits: int) -> int:
    """Input rows per float32 chunk of ``a @ Wint`` such that every partial sum is an integer
    of magnitude <= 2^24 (so exact): ``|a| <= 2^(act_bits-1-MAX_SHIFT)``, ``|Wint| <= terms * 2^MAX_SHIFT``."""
    a_max = 2 ** max(act_bits - 1 - MAX_SHIFT, 0)
    return max(1, 2**24 // (a_max * terms * 2**MAX_SHIFT))


def _decode_levels(tape, codes, terms: int, in_features, width):
    """ONNX ops decoding ``codes [P, out]`` uint8 into ``L [levels, in, out]`` int32:
    ``L[s, i, c]`` = sum of the signs of row ``i``'s terms with shift ``s`` (-2..2)."""
    i64 = lambda values: const(tape, values, np.int64)  # noqa: E731
    levels = MAX_SHIFT + 1
    low = tape.op("BitwiseAnd", [codes, const(tape, 15, np.uint8)])
    high = tape.op("BitShift", [codes, const(tape, 4, np.uint8)], {"direction": "RIGHT"})
    pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, i64([1])]), tape.op("Unsqueeze", [high, i64([1])])],
                    {"axis": 1})
    nibbles = tape.op("Reshape", [pairs, tape.op("Concat", [i64([-1]), width], {"axis": 0})])  # [2P, out]
    used = tape.op("Mul", [in_features, i64([terms])])
    nibbles = tape.op("Slice", [nibbles, i64([0]), used, i64([0])])
    sign_bit = tape.op("BitShift", [nibbles, const(tape, 3, np.uint8)], {"direction": "RIGHT"})
    shift = tape.op("BitwiseAnd", [nibbles, const(tape, MAX_SHIFT, np.uint8)])
    signed = tape.op("Sub", [const(tape, 1, np.int32),
                             tape.op("Mul", [tape.op("Cast", [sign_bit], {"to": ir.DataType.INT32}),
                                             const(tape, 2, np.int32)])])  # [terms*in, out]
    onehot = tape.op("Cast", [tape.op("Equal", [shift, const(tape, np.arange(levels).reshape(levels, 1, 1),
                                                            np.uint8)])], {"to": ir.DataType.INT32})
    per_term = tape.op("Mul", [onehot, signed])  # [levels, terms*in, out]
    shape = tape.op("Concat", [i64([levels, -1, terms]), width], {"axis": 0})
    return tape.op("ReduceSum", [tape.op("Reshape", [per_term, shape]), i64([2])], {"keepdims": 0})


def _negated_pre_shift(act_bits: int) -> int:
    """How far the kernel's negative operand ``~xq`` is stored shifted left (8 while it fits
    int32), so that a negative nibble ``8 + s`` is itself the right-shift count."""
    return 8 if act_bits <= 23 else 0


def _operands_te(x, frac_bits, act_bits):
    """``[2, T, in]`` int32: the fixed-point ``xq`` and the negative-term operand
    ``~xq << pre_shift`` (both read by the shift-add kernel as broadcast scalars)."""
    from tvm import te, tirx

    top = float(2 ** (act_bits - 1))
    pre_shift = _negated_pre_shift(act_bits)

    def q(t, i):
        v = tirx.floor(x[t, i] * np.float32(2.0**frac_bits) + np.float32(0.5))
        v = tirx.max(tirx.min(v, np.float32(top - 1)), np.float32(-top))
        return v.astype("int32")

    xq = te.compute(x.shape, q, name="xq")
    return te.compute((2, *x.shape), lambda k, t, i: tirx.Select(
        k == 0, xq[t, i], (xq[t, i] ^ tirx.const(-1, "int32")) << pre_shift), name="operands")


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


def _shift_add_kernel(tokens: int, in_features: int, out: int, terms: int, act_bits: int = 16):
    """The scheduled PrimFunc ``(operands [2, T, in] i32 (xq and ~xq << pre_shift), codes
    [P, out] u8, negatives [out] i32, step [out] f32, bias [out] f32) -> y [T, out] f32``."""
    from tvm import s_tir, te, tirx

    rows = code_rows(terms, in_features)
    operands = te.placeholder((2, tokens, in_features), "int32", name="operands")
    pre_shift = _negated_pre_shift(act_bits)
    codes = te.placeholder((rows, out), "uint8", name="codes")
    negatives = te.placeholder((out,), "int32", name="negatives")
    step = te.placeholder((out,), "float32", name="step")
    bias = te.placeholder((out,), "float32", name="bias")
    p = te.reduce_axis((0, rows), "p")

    def term(t, code, high, row):
        """``(xq >> shift) ^ mask`` of one nibble ``n`` (sign bit 3, shift bits 0..2), computed
        as ``select(negative, ~xq, xq) >> shift`` (the same value: an arithmetic shift commutes
        with ``~``). Where ``act_bits <= 23`` the negative operand is stored pre-shifted,
        ``~xq << 8``, so that the shift count is the whole nibble (``8 + shift`` for a negative
        term) and needs no masking; the sign test becomes a vector blend."""
        nibble = (code >> 4) if high else (code & 15)
        negative = nibble >= 8
        if terms == 1 and in_features % 2 and high:  # the padding nibble reads past the last row
            inside = row < in_features
            row = tirx.min(row, in_features - 1)
            value = tirx.if_then_else(inside, operands[0, t, row], 0)
            flipped = tirx.if_then_else(inside, operands[1, t, row], 0)
        else:
            value, flipped = operands[0, t, row], operands[1, t, row]
        return tirx.Select(negative, flipped, value) >> (nibble if pre_shift else nibble & 7)

    def both(t, c, p):
        code = codes[p, c].astype("int32")
        low_row, high_row = (p, p) if terms == 2 else (2 * p, 2 * p + 1)
        return term(t, code, False, low_row) + term(t, code, True, high_row)

    acc = te.compute((tokens, out), lambda t, c: te.sum(both(t, c, p), axis=p), name="acc")
    y = te.compute((tokens, out), lambda t, c: (acc[t, c] + negatives[c]).astype("float32") * step[c] + bias[c],
                   name="y")
    func = te.create_prim_func([operands, codes, negatives, step, bias, y])
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    lanes = 8
    nr = 2 * lanes if out % (2 * lanes) == 0 else (lanes if out % lanes == 0 else 1)
    mr = min(4 if nr == 2 * lanes else 6, tokens)
    t_loop, c_loop, p_loop = sch.get_loops(block)
    c_outer, c_inner = sch.split(c_loop, [None, nr])
    t_outer, t_inner = sch.split(t_loop, [None, mr])
    sch.reorder(c_outer, t_outer, p_loop, t_inner, c_inner)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, t_outer, preserve_unit_loops=True)
    sch.reverse_compute_inline(sch.get_sblock("y"))
    sch.parallel(sch.fuse(c_outer, t_outer) if tokens > mr else c_outer)
    sch.unroll(t_inner)
    if nr > 1:
        sch.vectorize(c_inner)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(block, p_loop)
    if nr > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
