"""kernelize.ShiftAddLinear: ``y = x @ W + b`` with W in powers of two (DeepShift / ShiftAddViT).

Weights. Each weight is ``scale[c] * sum_t sign_t * 2^-shift_t`` over ``terms`` (1 or 2)
signed powers of two, ``scale`` per output channel.

* One term: a 4-bit code (a nibble), bit 3 the sign (1 = negative), bits 0..2 the right
  shift ``0..7``. Two nibbles share a byte: ``codes`` is uint8 ``[ceil(in / 2), out]``;
  the nibble of input row ``i`` lives in byte row ``i // 2``, low half when ``i`` is even.
  Half a byte per weight (8x less than fp32).
* Two terms: 7 bits per weight. Term 1 is a nibble as above (sign, shift ``s1 = 0..7``);
  term 2 is a 3-bit code relative to term 1: bit 2 set = the opposite sign, bits 0..1 =
  ``d - 1`` where ``s2 = s1 + d``, ``d = 1..4`` (so ``s2`` reaches 11). A weight is thus
  ``+-2^-s1 (1 +- 2^-d)``, 114 distinct values: in each octave ``[2^-e / 2, 2^-e)`` the
  magnitudes ``2^-e * {1/2, 17/32, 9/16, 5/8, 3/4, 7/8, 15/16}``, up to ``3/2``, down to
  ``2^-8`` (no exact zero, and ``1`` itself is not one of them: the calibration's scale
  absorbs that). Against the former code (two free nibbles, 8 bits, 105 values) it drops
  the sums of two far-apart powers and gains finer small values; on real MiniLM weights
  its fit error is within 6% of the former code's (``two_term_codes`` in
  ``benchmarks/results/projections.json``). Input rows go in groups of
  8 (zero-padded), 7 code bytes per group and channel: ``codes`` is uint8 ``[7 *
  ceil(in / 8), out]``, group ``g`` in rows ``7g .. 7g+6``: rows ``7g+j`` (j = 0..3) hold
  the term-1 nibbles of input rows ``8g+2j`` (low half) and ``8g+2j+1`` (high half); row
  ``7g+4`` the 8 opposite-sign bits (bit k for input row ``8g+k``); rows ``7g+5`` and
  ``7g+6`` the 2-bit ``d - 1`` of input rows ``8g .. 8g+3`` and ``8g+4 .. 8g+7`` (bits
  ``2k .. 2k+1``). 7/8 of a byte per weight (4.6x less than fp32); every byte pattern is a
  valid code.

Activations are fixed point with a static per-tensor format chosen at calibration:
``xq = clip(floor(x * 2^frac_bits + 0.5), -2^(act_bits-1), 2^(act_bits-1) - 1)`` (int32).

Integer part (exact, int32; no multiplies)::

    acc[t, c] = sum_i sum_terms  sign * (xq[t, i] >> shift)        (>> arithmetic: floor)

Float part: ``y = acc * (scale[c] * 2^-frac_bits) + bias[c]``. The floor of each shift
biases ``acc`` by about -1/2 per term with a nonzero shift; the calibration folds that mean
error into ``bias``. ``acc`` stays in int32 while ``2^(act_bits-1) * terms * in < 2^31``
(act_bits 16: in <= 32768 for two terms); ``reference`` checks it.

Backends. TVM (``kernelize/backends/tvm/lower/shift_add_linear.py``): a small kernel
quantizes x into two int32 operands, ``xq`` and ``~xq << 8`` (``~x = -x - 1``); one
hand-scheduled PrimFunc then, per code byte row and tile of 16 output channels, adds
``select(negative, ~xq << 8, xq) >> nibble`` for the nibbles into int32 vector accumulators:
for a negative nibble ``8 + s`` the shift count is the nibble itself,
``(~xq << 8) >> (8 + s) = ~(xq >> s)``, so decoding a term costs a blend and a variable shift,
no masking of the sign (where ``act_bits > 23`` the pre-shift would overflow and the shift
count is masked instead). The two-term kernel derives term 2 from term 1's
value ``v1`` (``xq >> s1`` or ``~(xq >> s1)``): arithmetic shifts compose and commute with
``~``, so term 2 is ``(v1 ^ m) >> d`` with ``m = -1`` where the opposite-sign bit is set,
else 0: a bit test, an xor and a variable shift, still no multiply. The count of negative
terms per channel (a constant of the weights, padding rows included) is added back in the
epilogue. ONNX body: the same integer arithmetic in standard ops, split at
``xq = 128 a + b`` (see ``body``): a float32 MatMul of ``a`` by the integer weight
``128 W / scale`` (in row chunks that keep every partial sum exact) plus one 8-bit
``MatMulInteger`` of the seven shifted copies ``b >> s`` by the ``{-2..2}`` level matrices
(two terms: shifts 8..11 split ``a`` again, ``a = 16 a1 + a0``).
ONNX Runtime folds the decoding of the constant codes when the session starts, so in ONNX
Runtime the codes save file/transfer size, not run-time memory.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.ops.base import Operator, const

MAX_SHIFT = 7  # 3 bits of shift per nibble (term 1)
SIGN_BIT = 8
MAX_DELTA = 4  # two terms: s2 = s1 + d, d = 1..4
GROUP = 8  # two terms: input rows per code group
GROUP_BYTES = 7  # two terms: code bytes per group and channel (4 nibble bytes + 3 for term 2)


def max_term_shift(terms: int) -> int:
    """The largest right shift a term can have: 7 (one term), 11 (two terms)."""
    return MAX_SHIFT if terms == 1 else MAX_SHIFT + MAX_DELTA


# -- codes (shared with kernelize.methods.projection) ------------------------------------
def pack_codes(signs: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """uint8 codes ``[code_rows(terms, in), out]`` from ``signs`` (+1/-1) and ``shifts``, both
    ``[in, terms, out]``. One term: shifts 0..7. Two terms: the larger term's shift 0..7, the
    smaller one's 1..4 more (the two may come in either order)."""
    signs, shifts = np.asarray(signs), np.asarray(shifts)
    if not np.all(np.abs(signs) == 1):
        raise ValueError("signs must be +1/-1")
    in_features, terms, out = shifts.shape
    if terms == 1:
        return _pack_nibbles(_nibbles(signs[:, 0], shifts[:, 0]))
    if terms != 2:
        raise ValueError(f"terms must be 1 or 2, not {terms}")
    swap = shifts[:, 1] < shifts[:, 0]
    s1, s2 = np.where(swap, shifts[:, 1], shifts[:, 0]), np.where(swap, shifts[:, 0], shifts[:, 1])
    sign1, sign2 = np.where(swap, signs[:, 1], signs[:, 0]), np.where(swap, signs[:, 0], signs[:, 1])
    delta = s2 - s1
    if delta.min() < 1 or delta.max() > MAX_DELTA:
        raise ValueError(f"two terms: the second shift must be 1..{MAX_DELTA} more than the first")
    nibbles = _nibbles(sign1, s1)
    opposite = (sign1 != sign2).astype(np.uint8)
    delta_code = (delta - 1).astype(np.uint8)
    groups = -(-in_features // GROUP)
    pad = groups * GROUP - in_features  # padding rows: code 0 (their operands are zero)

    def grouped(a):  # [in, out] -> [groups, 8, out]
        return np.concatenate([a, np.zeros((pad, out), np.uint8)]).reshape(groups, GROUP, out)

    nib, opp, dc = grouped(nibbles), grouped(opposite), grouped(delta_code)
    codes = np.empty((groups, GROUP_BYTES, out), np.uint8)
    codes[:, 0:4] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    codes[:, 4] = np.bitwise_or.reduce(opp << np.arange(GROUP, dtype=np.uint8)[:, None], axis=1)
    for half in range(2):
        part = dc[:, 4 * half:4 * half + 4]
        codes[:, 5 + half] = np.bitwise_or.reduce(part << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=1)
    return codes.reshape(groups * GROUP_BYTES, out)


def _nibbles(signs, shifts) -> np.ndarray:
    if shifts.min() < 0 or shifts.max() > MAX_SHIFT:
        raise ValueError(f"the (first) shift must be 0..{MAX_SHIFT}")
    return (shifts.astype(np.uint8) | np.where(signs < 0, SIGN_BIT, 0).astype(np.uint8))


def _pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    out = nibbles.shape[1]
    if nibbles.shape[0] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((1, out), np.uint8)])  # padding: +x >> 0 of a zero row
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_codes(codes: np.ndarray, terms: int, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(signs int64 +1/-1, shifts int64), each ``[in, terms, out]`` (two terms: the larger
    term first). ``in_features`` may include the padding rows of the codes."""
    codes = np.asarray(codes, np.uint8)
    out = codes.shape[1]
    if terms == 1:
        nibbles = np.stack([codes & 15, codes >> 4], axis=1).reshape(-1, out)[:in_features].astype(np.int64)
        return (1 - 2 * (nibbles >> 3))[:, None], (nibbles & MAX_SHIFT)[:, None]
    grouped = codes.reshape(-1, GROUP_BYTES, out).astype(np.int64)
    k = np.arange(GROUP)[:, None]  # row within the group, against [groups, 8, out]
    nibbles = np.stack([grouped[:, 0:4] & 15, grouped[:, 0:4] >> 4], axis=2).reshape(-1, out)
    opposite = ((grouped[:, 4:5] >> k) & 1).reshape(-1, out)
    delta_bytes = np.repeat(grouped[:, 5:7], 4, axis=1)  # [groups, 8, out]: rows 0..3, 4..7
    delta = ((delta_bytes >> (2 * (k % 4))) & 3).reshape(-1, out) + 1
    nibbles, opposite, delta = nibbles[:in_features], opposite[:in_features], delta[:in_features]
    sign1, s1 = 1 - 2 * (nibbles >> 3), nibbles & MAX_SHIFT
    return np.stack([sign1, sign1 * (1 - 2 * opposite)], axis=1), np.stack([s1, s1 + delta], axis=1)


def code_rows(terms: int, in_features: int) -> int:
    return (in_features + 1) // 2 if terms == 1 else GROUP_BYTES * (-(-in_features // GROUP))


def padded_rows(terms: int, in_features: int) -> int:
    """Input rows the codes describe, padding included."""
    return in_features + in_features % 2 if terms == 1 else GROUP * (-(-in_features // GROUP))


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
    for s in range(max_term_shift(terms) + 1):
        level = np.sum(np.where(shifts == s, signs, 0), axis=1)  # [in, out], -2..2
        if np.any(level):
            acc += (xq >> s).astype(np.float64) @ level.astype(np.float64)
    return acc.astype(np.int64)


class ShiftAddLinear(Operator):
    name = "ShiftAddLinear"
    inputs = ("x", "codes", "scale", "bias?")
    attributes = {"terms": int, "frac_bits": int, "act_bits": int}

    def reference(self, x, codes, scale, bias=None, *, terms, frac_bits, act_bits=16):
        in_features = x.shape[-1]
        if terms not in (1, 2):
            raise ValueError(f"terms must be 1 or 2, not {terms}")
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

            acc = a @ Wint + sum_{s<7} (b >> s) @ L_s  [+ the shifts 8..11 of two terms]

        where ``L_s [in, out]`` (-2..2) counts the signed terms with shift ``s`` and
        ``Wint = sum_{s<=7} 2^(7-s) L_s``. Two terms reach shifts ``s = 7 + j``, ``j = 1..4``:
        ``xq >> s = a >> j``, and with ``a = 16 a1 + a0`` (``0 <= a0 < 16``)
        ``a >> j = 2^(4-j) a1 + (a0 >> j)``, so ``a1`` joins the float product (weight
        ``Whi = sum_j 2^(4-j) L_{7+j}``) and ``a0 >> j`` (j < 4) the 8-bit one. The float
        product runs in chunks of input rows small enough that every partial sum is an
        integer below 2^24 (exact in any order); the 8-bit one is one ``MatMulInteger``
        (uint8 shifted copies by int8 ``L_s``) with int32 accumulation. The weight matrices
        are decoded from the constant codes, which ONNX Runtime folds when the session starts."""
        x, codes, scale, bias = inputs
        terms, frac_bits = attrs["terms"], attrs["frac_bits"]
        act_bits = attrs.get("act_bits", 16)
        i64 = lambda values: const(tape, values, np.int64)  # noqa: E731
        top_shift = max_term_shift(terms)
        width = tape.op("Shape", [codes], {"start": 1})  # [out]
        in_features = tape.op("Shape", [x], {"start": -1})  # [in]
        if terms == 1:
            level = _decode_levels(tape, codes, terms, in_features, width)  # int32 [levels, in, out]
        else:
            level = _decode_levels_two_terms(tape, codes, in_features, width)
        # fixed-point activations, then xq = 128 a + b
        top = 2.0 ** (act_bits - 1)
        xq = tape.op("Floor", [tape.op("Add", [tape.op("Mul", [x, const(tape, 2.0**frac_bits)]), const(tape, 0.5)])])
        xq = tape.op("Clip", [xq, const(tape, -top), const(tape, top - 1)])
        xq = tape.op("Reshape", [xq, tape.op("Concat", [i64([-1]), in_features], {"axis": 0})])  # [N, in]
        tokens_shape = tape.op("Shape", [xq], {"end": 1})
        step_of_a = float(2**MAX_SHIFT)
        a = tape.op("Floor", [tape.op("Mul", [xq, const(tape, 1.0 / step_of_a)])])
        b = tape.op("Sub", [xq, tape.op("Mul", [a, const(tape, step_of_a)])])  # 0..127

        def shifted_copies(v, shifts):  # [N, in] -> [N, len(shifts), in] floor(v / 2^s)
            pow2 = const(tape, (2.0 ** -np.asarray(shifts, np.float64)).reshape(-1, 1))
            return tape.op("Floor", [tape.op("Mul", [tape.op("Unsqueeze", [v, i64([1])]), pow2])])

        def level_slice(start, stop):
            return tape.op("Slice", [level, i64([start]), i64([stop]), i64([0])])

        def power_sum(start, stop, top_power):  # sum_{s in start..stop-1} 2^(top_power - s) L_s
            weights = const(tape, (2.0 ** (top_power - np.arange(start, stop))).reshape(-1, 1, 1))
            return tape.op("ReduceSum", [tape.op("Mul", [tape.op("Cast", [level_slice(start, stop)],
                                                                  {"to": ir.DataType.FLOAT}), weights]),
                                         i64([0])], {"keepdims": 0})  # [in, out]

        low_copies, low_levels = [shifted_copies(b, range(MAX_SHIFT))], [level_slice(0, MAX_SHIFT)]
        float_operands, float_weights = [a], [power_sum(0, MAX_SHIFT + 1, MAX_SHIFT)]
        if top_shift > MAX_SHIFT:  # two terms: shifts 8..11 through a = 16 a1 + a0
            split = float(2**MAX_DELTA)
            a1 = tape.op("Floor", [tape.op("Mul", [a, const(tape, 1.0 / split)])])
            a0 = tape.op("Sub", [a, tape.op("Mul", [a1, const(tape, split)])])  # 0..15
            low_copies.append(shifted_copies(a0, range(1, MAX_DELTA)))
            low_levels.append(level_slice(MAX_SHIFT + 1, MAX_SHIFT + MAX_DELTA))
            float_operands.append(a1)
            float_weights.append(power_sum(MAX_SHIFT + 1, top_shift + 1, MAX_SHIFT + MAX_DELTA))
        # the 8-bit part: [N, copies*in] @ [copies*in, out]
        copies = low_copies[0] if len(low_copies) == 1 else tape.op("Concat", low_copies, {"axis": 1})
        copies = tape.op("Cast", [tape.op("Reshape", [copies, tape.op("Concat", [tokens_shape, i64([-1])],
                                                                        {"axis": 0})])], {"to": ir.DataType.UINT8})
        levels_8bit = low_levels[0] if len(low_levels) == 1 else tape.op("Concat", low_levels, {"axis": 0})
        levels_8bit = tape.op("Cast", [tape.op("Reshape", [levels_8bit, tape.op("Concat", [i64([-1]), width],
                                                                                  {"axis": 0})])],
                              {"to": ir.DataType.INT8})
        acc_low = tape.op("MatMulInteger", [copies, levels_8bit])  # int32 [N, out]
        # the float part, chunked over its rows (zero-padded to whole chunks)
        operand = float_operands[0] if len(float_operands) == 1 else tape.op("Concat", float_operands, {"axis": 1})
        weight = float_weights[0] if len(float_weights) == 1 else tape.op("Concat", float_weights, {"axis": 0})
        depth = tape.op("Shape", [weight], {"end": 1})
        chunk = _exact_chunk_rows(terms, act_bits)
        chunk_c = i64([chunk])
        pad = tape.op("Mod", [tape.op("Sub", [chunk_c, tape.op("Mod", [depth, chunk_c])]), chunk_c])
        zero2 = i64([0, 0])
        operand = tape.op("Pad", [operand, tape.op("Concat", [zero2, i64([0]), pad], {"axis": 0})])  # columns
        weight = tape.op("Pad", [weight, tape.op("Concat", [zero2, pad, i64([0])], {"axis": 0})])  # rows
        operand_chunks = tape.op("Transpose", [tape.op("Reshape", [operand, tape.op("Concat", [
            tokens_shape, i64([-1, chunk])], {"axis": 0})])], {"perm": [1, 0, 2]})
        weight_chunks = tape.op("Reshape", [weight, tape.op("Concat", [i64([-1, chunk]), width], {"axis": 0})])
        partial = tape.op("Cast", [tape.op("MatMul", [operand_chunks, weight_chunks])], {"to": ir.DataType.INT32})
        acc_high = tape.op("ReduceSum", [partial, i64([0])], {"keepdims": 0})  # int32 [N, out]
        acc = tape.op("Add", [acc_low, acc_high])
        step = tape.op("Mul", [scale, const(tape, 2.0**-frac_bits)])
        y = tape.op("Mul", [tape.op("Cast", [acc], {"to": ir.DataType.FLOAT}), step])
        if bias is not None:
            y = tape.op("Add", [y, bias])
        lead = tape.op("Shape", [x], {"end": -1})
        return [tape.op("Reshape", [y, tape.op("Concat", [lead, width], {"axis": 0})])]


def _exact_chunk_rows(terms: int, act_bits: int) -> int:
    """Rows per float32 chunk of ``a @ Wint`` (and ``a1 @ Whi``) such that every partial sum is
    an integer of magnitude <= 2^24 (so exact): ``|a| <= 2^(act_bits-1-MAX_SHIFT)``,
    ``|Wint| <= terms * 2^MAX_SHIFT`` (``a1``, ``Whi`` are smaller)."""
    a_max = 2 ** max(act_bits - 1 - MAX_SHIFT, 0)
    return max(1, 2**24 // (a_max * terms * 2**MAX_SHIFT))


def _decode_levels(tape, codes, terms: int, in_features, width):
    """ONNX ops decoding one-term ``codes [P, out]`` uint8 into ``L [levels, in, out]`` int32:
    ``L[s, i, c]`` = the sign of row ``i``'s term if its shift is ``s``, else 0."""
    i64 = lambda values: const(tape, values, np.int64)  # noqa: E731
    low = tape.op("BitwiseAnd", [codes, const(tape, 15, np.uint8)])
    high = tape.op("BitShift", [codes, const(tape, 4, np.uint8)], {"direction": "RIGHT"})
    pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, i64([1])]), tape.op("Unsqueeze", [high, i64([1])])],
                    {"axis": 1})
    nibbles = tape.op("Reshape", [pairs, tape.op("Concat", [i64([-1]), width], {"axis": 0})])  # [2P, out]
    used = tape.op("Mul", [in_features, i64([terms])])
    nibbles = tape.op("Slice", [nibbles, i64([0]), used, i64([0])])
    sign, shift = _nibble_terms(tape, nibbles)
    return _one_hot_levels(tape, [(sign, shift)], MAX_SHIFT)


def _nibble_terms(tape, nibbles):
    """(sign int32 +1/-1, shift int32) of uint8 nibbles."""
    sign_bit = tape.op("BitShift", [nibbles, const(tape, 3, np.uint8)], {"direction": "RIGHT"})
    shift = tape.op("Cast", [tape.op("BitwiseAnd", [nibbles, const(tape, MAX_SHIFT, np.uint8)])],
                    {"to": ir.DataType.INT32})
    sign = tape.op("Sub", [const(tape, 1, np.int32),
                           tape.op("Mul", [tape.op("Cast", [sign_bit], {"to": ir.DataType.INT32}),
                                           const(tape, 2, np.int32)])])
    return sign, shift


def _one_hot_levels(tape, terms_list, top_shift: int):
    """``L [top_shift + 1, in, out]`` int32 = sum over (sign, shift) pairs of sign * (shift == s)."""
    levels = const(tape, np.arange(top_shift + 1).reshape(-1, 1, 1), np.int32)
    total = None
    for sign, shift in terms_list:
        onehot = tape.op("Cast", [tape.op("Equal", [shift, levels])], {"to": ir.DataType.INT32})
        part = tape.op("Mul", [onehot, sign])
        total = part if total is None else tape.op("Add", [total, part])
    return total


def _decode_levels_two_terms(tape, codes, in_features, width):
    """ONNX ops decoding two-term ``codes [7G, out]`` uint8 (see the module docstring) into
    ``L [12, in, out]`` int32 (shifts 0..11)."""
    i64 = lambda values: const(tape, values, np.int64)  # noqa: E731
    u8 = lambda values: const(tape, values, np.uint8)  # noqa: E731
    rows_shape = tape.op("Concat", [i64([-1]), width], {"axis": 0})
    grouped = tape.op("Reshape", [codes, tape.op("Concat", [i64([-1, GROUP_BYTES]), width], {"axis": 0})])
    nibble_bytes = tape.op("Slice", [grouped, i64([0]), i64([4]), i64([1])])  # [G, 4, out]
    low = tape.op("BitwiseAnd", [nibble_bytes, u8(15)])
    high = tape.op("BitShift", [nibble_bytes, u8(4)], {"direction": "RIGHT"})
    pairs = tape.op("Concat", [tape.op("Unsqueeze", [low, i64([2])]), tape.op("Unsqueeze", [high, i64([2])])],
                    {"axis": 2})  # [G, 4, 2, out]
    nibbles = tape.op("Reshape", [pairs, rows_shape])  # [8G, out]
    opposite_byte = tape.op("Slice", [grouped, i64([4]), i64([5]), i64([1])])  # [G, 1, out]
    opposite = tape.op("BitwiseAnd", [tape.op("BitShift", [opposite_byte, u8(np.arange(GROUP).reshape(1, -1, 1))],
                                              {"direction": "RIGHT"}), u8(1)])  # [G, 8, out]
    opposite = tape.op("Reshape", [opposite, rows_shape])
    delta_bytes = tape.op("Unsqueeze", [tape.op("Slice", [grouped, i64([5]), i64([7]), i64([1])]), i64([2])])
    delta_code = tape.op("BitwiseAnd", [tape.op("BitShift", [delta_bytes, u8((2 * np.arange(4)).reshape(1, 1, -1, 1))],
                                                {"direction": "RIGHT"}), u8(3)])  # [G, 2, 4, out]
    delta_code = tape.op("Reshape", [delta_code, rows_shape])
    used = lambda v: tape.op("Slice", [v, i64([0]), in_features, i64([0])])  # noqa: E731
    sign1, s1 = _nibble_terms(tape, used(nibbles))
    flip = tape.op("Sub", [const(tape, 1, np.int32), tape.op("Mul", [
        tape.op("Cast", [used(opposite)], {"to": ir.DataType.INT32}), const(tape, 2, np.int32)])])
    sign2 = tape.op("Mul", [sign1, flip])
    s2 = tape.op("Add", [s1, tape.op("Add", [tape.op("Cast", [used(delta_code)], {"to": ir.DataType.INT32}),
                                            const(tape, 1, np.int32)])])
    return _one_hot_levels(tape, [(sign1, s1), (sign2, s2)], max_term_shift(2))
