"""TVM lowering of kernelize.ShiftAddLinear (kernelize/ops/shift_add_linear.py): a small TE
kernel quantizes x into two int32 operands, ``xq`` and ``~xq << 8``; one hand-scheduled
PrimFunc then does the shift-adds and the epilogue (the ops module's docstring explains the
decoding)."""

from __future__ import annotations

import numpy as np
from tvm import relax, s_tir, te, tirx
from tvm.ir.expr import Constant

from kernelize.backends.tvm.registry import lowering
from kernelize.ops.shift_add_linear import GROUP, GROUP_BYTES, code_rows, padded_rows, unpack_codes


@lowering("ShiftAddLinear")
def shift_add_linear(bb, inputs, attrs):
    """A small kernel quantizes x, one hand-scheduled kernel does the shift-adds and the
    epilogue (see the module docstring of kernelize/ops/shift_add_linear.py)."""
    x, codes, scale, bias = inputs
    terms, frac_bits = attrs["terms"], attrs["frac_bits"]
    act_bits = attrs.get("act_bits", 16)
    shape = [int(d) for d in x.ty.shape]
    in_features, out = shape[-1], int(codes.ty.shape[1])
    tokens = int(np.prod(shape[:-1]))
    x2 = bb.emit(relax.op.reshape(x, [tokens, in_features]))
    rows = in_features if terms == 1 else padded_rows(terms, in_features)
    operands = bb.emit_te(_operands_te, x2, frac_bits, act_bits, rows, primfunc_name_hint="shift_add_quantize")
    negatives = _negative_counts(bb, codes, terms, in_features)
    scale_value = constant_array(scale)  # a weight: fold the step here (one kernel call less)
    if scale_value is not None:
        step = relax.const((scale_value.astype(np.float32) * np.float32(2.0**-frac_bits)).astype(np.float32))
    else:
        step = bb.emit(relax.op.multiply(scale, relax.const(np.float32(2.0**-frac_bits))))
    if bias is None:
        bias = relax.const(np.zeros(out, np.float32))
    if terms == 1:
        func = _one_term_kernel(tokens, in_features, out, act_bits)
    else:
        func = _two_term_kernel(tokens, in_features, out, act_bits)
    gvar = bb.add_func(func, "shift_add_linear")
    y = bb.emit(relax.call_tir(gvar, [operands, codes, negatives, step, bias],
                               relax.TensorType([tokens, out], "float32")))
    return bb.emit(relax.op.reshape(y, [*shape[:-1], out]))


def _negated_pre_shift(act_bits: int) -> int:
    """How far the kernel's negative operand ``~xq`` is stored shifted left (8 while it fits
    int32), so that a negative nibble ``8 + s`` is itself the right-shift count."""
    return 8 if act_bits <= 23 else 0


def _operands_te(x, frac_bits, act_bits, rows):
    """``[2, T, rows]`` int32: the fixed-point ``xq`` and the negative-term operand
    ``~xq << pre_shift`` (both read by the shift-add kernel as broadcast scalars); input rows
    past ``in`` (the two-term codes' padding) hold ``xq = 0``."""
    top = float(2 ** (act_bits - 1))
    pre_shift = _negated_pre_shift(act_bits)
    tokens, in_features = x.shape

    def q(t, i):
        v = tirx.floor(x[t, i] * np.float32(2.0**frac_bits) + np.float32(0.5))
        v = tirx.max(tirx.min(v, np.float32(top - 1)), np.float32(-top))
        return v.astype("int32")

    if rows == int(in_features):
        xq = te.compute(x.shape, q, name="xq")
    else:
        last = int(in_features) - 1
        xq = te.compute((tokens, rows), lambda t, i: tirx.Select(
            i <= last, q(t, tirx.min(i, last)), tirx.const(0, "int32")), name="xq")
    return te.compute((2, tokens, rows), lambda k, t, i: tirx.Select(
        k == 0, xq[t, i], (xq[t, i] ^ tirx.const(-1, "int32")) << pre_shift), name="operands")


def constant_array(expr) -> np.ndarray | None:
    """The NumPy value of a Relax constant (a weight initializer), else None."""
    return expr.value.numpy() if isinstance(expr, Constant) else None


def _negative_counts(bb, codes, terms, in_features):
    """Per output channel, the number of negative terms (int32 [out]), the padding rows of
    two-term codes included (the kernel adds their ``~0 >> s = -1`` too): numpy on constant
    codes, else a small TE reduction."""
    constant = constant_array(codes)
    if constant is not None:
        rows = in_features if terms == 1 else padded_rows(terms, in_features)
        signs, _ = unpack_codes(constant, terms, rows)
        return relax.const(np.sum(signs < 0, axis=(0, 1)).astype(np.int32))

    def count(c):
        rows, out = c.shape
        p = te.reduce_axis((0, rows), "p")
        return te.compute((out,), lambda j: te.sum(((c[p, j] >> 3) & 1).astype("int32")
                                                   + ((c[p, j] >> 7) & 1).astype("int32"), axis=p),
                          name="negatives")

    def count_two_terms(c):
        rows, out = c.shape
        g = te.reduce_axis((0, int(rows) // GROUP_BYTES), "g")
        k = te.reduce_axis((0, GROUP), "k")

        def negatives(j, g, k):
            nibble = (c[GROUP_BYTES * g + k // 2, j].astype("int32") >> (4 * (k % 2))) & 15
            first = nibble >> 3
            opposite = (c[GROUP_BYTES * g + 4, j].astype("int32") >> k) & 1
            return first + (first ^ opposite)

        return te.compute((out,), lambda j: te.sum(negatives(j, g, k), axis=[g, k]), name="negatives")

    return bb.emit_te(count if terms == 1 else count_two_terms, codes, primfunc_name_hint="shift_add_negatives")


def _one_term_kernel(tokens: int, in_features: int, out: int, act_bits: int = 16):
    """The scheduled one-term PrimFunc ``(operands [2, T, in] i32 (xq and ~xq << pre_shift),
    codes [P, out] u8, negatives [out] i32, step [out] f32, bias [out] f32) -> y [T, out] f32``."""
    rows = code_rows(1, in_features)
    operands = te.placeholder((2, tokens, in_features), "int32", name="operands")
    pre_shift = _negated_pre_shift(act_bits)
    codes = te.placeholder((rows, out), "uint8", name="codes")
    p = te.reduce_axis((0, rows), "p")

    def term(t, code, high, row):
        """``(xq >> shift) ^ mask`` of one nibble ``n`` (sign bit 3, shift bits 0..2), computed
        as ``select(negative, ~xq, xq) >> shift`` (the same value: an arithmetic shift commutes
        with ``~``). Where ``act_bits <= 23`` the negative operand is stored pre-shifted,
        ``~xq << 8``, so that the shift count is the whole nibble (``8 + shift`` for a negative
        term) and needs no masking; the sign test becomes a vector blend."""
        nibble = (code >> 4) if high else (code & 15)
        negative = nibble >= 8
        if in_features % 2 and high:  # the padding nibble reads past the last row
            inside = row < in_features
            row = tirx.min(row, in_features - 1)
            value = tirx.if_then_else(inside, operands[0, t, row], 0)
            flipped = tirx.if_then_else(inside, operands[1, t, row], 0)
        else:
            value, flipped = operands[0, t, row], operands[1, t, row]
        return tirx.Select(negative, flipped, value) >> (nibble if pre_shift else nibble & 7)

    def both(t, c, p):
        code = codes[p, c].astype("int32")
        return term(t, code, False, 2 * p) + term(t, code, True, 2 * p + 1)

    acc = te.compute((tokens, out), lambda t, c: te.sum(both(t, c, p), axis=p), name="acc")
    return _scheduled(acc, operands, codes, tokens, out)


def _two_term_kernel(tokens: int, in_features: int, out: int, act_bits: int = 16):
    """The scheduled two-term PrimFunc: as ``_one_term_kernel`` with ``operands [2, T, 8G]``
    (zero past ``in``) and the grouped codes ``[7G, out]``. Per group of 8 input rows and tile
    of channels, the 7 code bytes are first widened to int32 once (a small local stage:
    decoding then runs on 32-bit lanes, not on bytes that would need widening per row). Per
    input row ``i = 8g + k`` and channel: term 1 ``v1 = select(negative, ~xq << 8, xq) >>
    nibble`` (``xq >> s1`` or ``~(xq >> s1)``), term 2 ``(v1 ^ m) >> d`` with ``m = -1`` where
    the opposite-sign bit is set (``~`` flips a term's sign in this representation; shifts
    compose). With fewer than 4 tokens the 8 rows of a group are unrolled, so every in-byte
    shift is a constant; with more, decoding is shared by the token tile and a rolled loop
    is faster."""
    groups = -(-in_features // GROUP)
    operands = te.placeholder((2, tokens, GROUP * groups), "int32", name="operands")
    pre_shift = _negated_pre_shift(act_bits)
    codes = te.placeholder((GROUP_BYTES * groups, out), "uint8", name="codes")
    wide = te.compute((groups, GROUP_BYTES, out), lambda g, j, c: codes[GROUP_BYTES * g + j, c].astype("int32"),
                      name="wide")
    g = te.reduce_axis((0, groups), "g")
    k = te.reduce_axis((0, GROUP), "k")

    def two_terms(t, c, g, k):
        row = GROUP * g + k
        nibble = (wide[g, k // 2, c] >> (4 * (k % 2))) & 15
        first = tirx.Select(nibble >= 8, operands[1, t, row], operands[0, t, row]) >> (
            nibble if pre_shift else nibble & 7)
        bit = tirx.const(1, "int32") << k
        opposite = (wide[g, 4, c] & bit) == bit
        mask = tirx.Select(opposite, tirx.const(-1, "int32"), tirx.const(0, "int32"))
        delta = ((wide[g, 5 + k // 4, c] >> (2 * (k % 4))) & 3) + 1
        return first + ((first ^ mask) >> delta)

    acc = te.compute((tokens, out), lambda t, c: te.sum(two_terms(t, c, g, k), axis=[g, k]), name="acc")
    return _scheduled(acc, operands, codes, tokens, out, widened="wide", unroll_rows=tokens < 4)


def _scheduled(acc, operands, codes, tokens: int, out: int, widened: str | None = None,
               unroll_rows: bool = True):
    """The PrimFunc ``(operands, codes, negatives, step, bias) -> y`` with the epilogue
    ``y = (acc + negatives) * step + bias``, scheduled for CPU: tiles of ``mr`` tokens by
    ``nr`` channels (16 = two 8-lane vectors where ``out`` allows) held in registers over
    the whole reduction, reduction loops below the tile loops, inner reduction loops (where
    ``unroll_rows``) and tokens unrolled, channels vectorized; tiles in parallel. ``widened``:
    a stage between the codes and ``acc``, computed per outer reduction step in local memory."""
    negatives = te.placeholder((out,), "int32", name="negatives")
    step = te.placeholder((out,), "float32", name="step")
    bias = te.placeholder((out,), "float32", name="bias")
    y = te.compute((tokens, out), lambda t, c: (acc[t, c] + negatives[c]).astype("float32") * step[c] + bias[c],
                   name="y")
    func = te.create_prim_func([operands, codes, negatives, step, bias, y])
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    lanes = 8
    nr = 2 * lanes if out % (2 * lanes) == 0 else (lanes if out % lanes == 0 else 1)
    mr = min(4 if nr == 2 * lanes else 6, tokens)
    t_loop, c_loop, *reduce_loops = sch.get_loops(block)
    c_outer, c_inner = sch.split(c_loop, [None, nr])
    t_outer, t_inner = sch.split(t_loop, [None, mr])
    sch.reorder(c_outer, t_outer, *reduce_loops, t_inner, c_inner)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, t_outer, preserve_unit_loops=True)
    sch.reverse_compute_inline(sch.get_sblock("y"))
    if widened is not None:
        stage = sch.get_sblock(widened)
        sch.compute_at(stage, reduce_loops[0])
        sch.set_scope(stage, 0, "local")
        if nr > 1:
            sch.vectorize(sch.get_loops(stage)[-1])
    sch.parallel(sch.fuse(c_outer, t_outer) if tokens > mr else c_outer)
    if unroll_rows:
        for loop in reduce_loops[1:]:
            sch.unroll(loop)
    sch.unroll(t_inner)
    if nr > 1:
        sch.vectorize(c_inner)
        sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(block, reduce_loops[0])
    if nr > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
