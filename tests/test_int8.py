"""Integer projections (issue 11): Int8Linear and its calibration ``projection:int8``.

The operator's ONNX body, its ONNX Runtime lowering (``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat``) and its TVM build equal the NumPy reference: the integer part
bit-exactly (unit weight scales, no bias: the output divided by the activation scale *is*
the int32 accumulator), dynamic and static activations, with and without a SmoothQuant
input scale, at 1536 input features with an outlier channel (where 8-bit weights overflow
MLAS's int16 pair sums on CPUs without VNNI: the reason for 7-bit weights). The float path
(real scales and bias) to 1e-5 relative. The fit: small error, GPTQ no worse than plain
rounding on held-out tokens, smoothing helps when an input channel is an outlier, static
ranges refused on too few tokens. Targets: which CPUs have int8 dot products.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelize import ops
from kernelize.backends import targets
from kernelize.errors import UsageError
from kernelize.methods import METHODS
from kernelize.methods import int8
from kernelize.methods.base import CapturedProjection
from kernelize.methods.projection import relative_error
from kernelize.ops import int8_linear
from test_ops import assert_close, build, check_lowered, normal, rng_for, run
from test_projections import tvm_outputs

OP = ops.get("Int8Linear")
CONSTS = {"weight", "weight_scale", "bias", "input_scale"}


def int8_args(rng, batch, seq, in_features, out, *, unit: bool, smooth: bool, outlier: bool = False):
    x = normal(rng, batch, seq, in_features, scale=2.0)
    if outlier:  # one input channel 30x the others, as in transformer activations
        x[..., 3] *= 30.0
    x[..., 0] = np.abs(x[..., 0])  # positive and negative values: a non-trivial zero point
    weight = rng.integers(-int8_linear.WEIGHT_MAX, int8_linear.WEIGHT_MAX + 1, (in_features, out)).astype(np.int8)
    if unit:
        weight_scale, bias = np.ones(out, np.float32), None
    else:
        weight_scale, bias = rng.uniform(0.001, 0.02, out).astype(np.float32), normal(rng, out)
    input_scale = rng.uniform(0.2, 2.0, in_features).astype(np.float32) if smooth else None
    return [("x", x), ("weight", weight), ("weight_scale", weight_scale), ("bias", bias),
            ("input_scale", input_scale)]


def static_attrs(args) -> dict:
    x, input_scale = args[0][1], args[4][1]
    _, scale, zero = int8_linear.quantize_dynamic(x * input_scale if input_scale is not None else x)
    return {"activation": "static", "act_scale": float(scale) * 0.8, "act_zero_point": int(zero)}  # some clip


def accumulator(args, attrs):
    x, weight, input_scale = args[0][1], args[1][1], args[4][1]
    xq, scale, zero = OP.quantize(x, input_scale, **attrs)
    return int8_linear.accumulate(xq, zero, weight), scale


def backend_outputs(backend, args, attrs):
    if backend == "body":
        model, feeds, _ = build(OP, args, attrs, consts=CONSTS)
        return run(model, feeds)[0]
    if backend == "ort":
        model = check_lowered(OP, args, attrs, expect_lowered=True, consts=CONSTS)
        kernels = {n.op_type for n in model.graph}
        assert ("DynamicQuantizeMatMul" if attrs["activation"] == "dynamic" else "MatMulIntegerToFloat") in kernels
        return run(model, build(OP, args, attrs, consts=CONSTS)[1])[0]
    return tvm_outputs(OP, args, attrs, CONSTS)


@pytest.mark.parametrize("backend", ["body", "ort", "tvm"])
@pytest.mark.parametrize("activation", ["dynamic", "static"])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("in_features,out", [(24, 16), (1536, 40)])
def test_int8_integer_path_bit_exact(backend, activation, smooth, in_features, out):
    rng = rng_for("int8-int", activation, smooth, in_features, out)
    args = int8_args(rng, 2, 5, in_features, out, unit=True, smooth=smooth, outlier=in_features > 100)
    attrs = {"activation": "dynamic"} if activation == "dynamic" else static_attrs(args)
    acc, scale = accumulator(args, attrs)
    y = backend_outputs(backend, args, attrs)
    assert y.shape == acc.shape
    assert np.array_equal(np.round(y.astype(np.float64) / np.float64(scale)), acc), \
        f"{backend}: integer accumulator differs in {int(np.sum(np.round(y / scale) != acc))} places"
    assert_close(y, OP.reference(*[a for _, a in args], **attrs), what=f"{backend} vs reference")


@pytest.mark.parametrize("backend", ["body", "ort", "tvm"])
@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_int8_float_path(backend, activation):
    rng = rng_for("int8-float", activation)
    args = int8_args(rng, 1, 7, 48, 32, unit=False, smooth=True)
    attrs = {"activation": "dynamic"} if activation == "dynamic" else static_attrs(args)
    assert_close(backend_outputs(backend, args, attrs), OP.reference(*[a for _, a in args], **attrs),
                 what=f"{backend} float path")


def test_int8_quantization_matches_onnx_dynamic_quantize_linear():
    """The reference's DynamicQuantizeLinear is ONNX Runtime's, element for element."""
    import onnx
    import onnxruntime as ort

    x = normal(rng_for("dql"), 3, 50, scale=4.0)
    x[0, 0] = 0.5 * (x.max() - x.min()) / 255 * 7  # a value near a rounding tie
    node = onnx.helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, list(x.shape))],
                                   [onnx.helper.make_tensor_value_info(n, t, None)
                                    for n, t in (("q", 2), ("s", 1), ("z", 2))])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    q, s, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    rq, rs, rz = int8_linear.quantize_dynamic(x)
    assert np.array_equal(q, rq) and s == rs and z == rz


def test_int8_reference_refuses_eight_bit_weights():
    args = int8_args(rng_for("int8-8bit"), 1, 2, 8, 4, unit=True, smooth=False)
    weight = args[1][1].copy()
    weight[0, 0] = 64
    with pytest.raises(ValueError, match="within"):
        OP.reference(args[0][1], weight, args[2][1], activation="dynamic")


def test_int8_weights_are_seven_bit():
    q, scale = int8_linear.quantize_weight(normal(rng_for("int8-w"), 30, 9))
    assert q.dtype == np.int8 and np.max(np.abs(q)) == int8_linear.WEIGHT_MAX
    gq, gscale = int8.gptq(normal(rng_for("int8-w"), 30, 9), normal(rng_for("int8-x"), 100, 30))
    assert gq.dtype == np.int8 and np.max(np.abs(gq.astype(int))) <= int8_linear.WEIGHT_MAX


# -- projection:int8 ---------------------------------------------------------------------
def site(rng, tokens, in_features, out, outlier: bool):
    basis = rng.standard_normal((8, in_features))
    x = rng.standard_normal((tokens, 8)) @ basis + 0.3 * rng.standard_normal((tokens, in_features))
    if outlier:
        x[:, :2] *= 40.0
    weight = rng.standard_normal((in_features, out)) / np.sqrt(in_features)
    return x.astype(np.float32), weight.astype(np.float32), (0.1 * rng.standard_normal(out)).astype(np.float32)


def held_out(fitted, x, weight, bias, rows_per_call) -> float:
    y = np.concatenate([fitted.reference(x[i:i + rows_per_call]) for i in range(0, len(x), rows_per_call)])
    return relative_error(y.astype(np.float64), x.astype(np.float64) @ weight + bias)


@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_int8_fit_is_accurate_and_gptq_no_worse_than_rounding(activation):
    rng = rng_for("int8-fit", activation)
    x, weight, bias = site(rng, 1200, 96, 64, outlier=False)
    captured = CapturedProjection(x[:600], weight, bias, rows_per_call=40)
    method = METHODS["projection:int8"]
    errors = {}
    for use_gptq in (False, True):
        fitted = method.fit(captured, activation=activation, gptq=use_gptq)
        errors[use_gptq] = held_out(fitted, x[600:], weight, bias, 40)
        assert fitted.op == "Int8Linear" and fitted.inputs[0].dtype == np.int8
        assert fitted.info["weight_bytes"] * 3 < fitted.info["dense_weight_bytes"]
        assert fitted.info["calibration_rel_error"] < 0.03
    assert errors[False] < 0.03 and errors[True] < 0.03, errors
    assert errors[True] <= errors[False] * 1.02, errors


def test_int8_smoothing_helps_with_outlier_channels():
    rng = rng_for("int8-smooth")
    x, weight, bias = site(rng, 800, 64, 48, outlier=True)
    captured = CapturedProjection(x[:400], weight, bias, rows_per_call=40)
    method = METHODS["projection:int8"]
    plain = method.fit(captured, alphas=(None,))
    smoothed = method.fit(captured)  # the alphas tried include no smoothing
    assert smoothed.info["alpha"] is not None and smoothed.inputs[3] is not None
    e_plain, e_smooth = (held_out(f, x[400:], weight, bias, 40) for f in (plain, smoothed))
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)


def test_int8_static_needs_enough_tokens():
    x, weight, bias = site(rng_for("int8-few"), 100, 16, 8, outlier=False)
    with pytest.raises(UsageError, match="static int8 ranges need at least"):
        METHODS["projection:int8"].fit(CapturedProjection(x, weight, bias), activation="static")
    with pytest.raises(UsageError, match="static int8 ranges need at least"):
        METHODS["projection:int8-static"].fit(CapturedProjection(x, weight, bias))
    x, weight, bias = site(rng_for("int8-many"), 300, 16, 8, outlier=False)
    fitted = METHODS["projection:int8-static"].fit(CapturedProjection(x, weight, bias))
    assert fitted.attrs["activation"] == "static" and fitted.attrs["act_scale"] > 0
    with pytest.raises(UsageError, match="activation must be one of"):
        METHODS["projection:int8"].fit(CapturedProjection(x, weight, bias), activation="per-row")


# -- targets -----------------------------------------------------------------------------
@pytest.mark.parametrize("target,expected", [
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}', "avx512vnni"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}', "avxvnni"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver2"}', None),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}', "dotprod"),
    ("arm64", None),
    ("cuda", None),
])
def test_int8_dot_product_by_target(target, expected):
    assert targets.int8_dot_product(targets.resolve(target)) == expected


def test_tvm_target_without_dot_products_falls_back_to_dense():
    from kernelize.passes import select

    names = {"projection": ["projection:int8"], "attention": ["linear:favor+"]}
    notes = select._int8_fallback(names, "tvm", '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver2"}')
    assert names["projection"] == [] and names["attention"] == ["linear:favor+"]
    assert len(notes) == 1 and "no int8 dot-product instructions" in notes[0] and "znver2" in notes[0]
    kept = {"projection": ["projection:int8"]}
    cascade = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}'
    assert select._int8_fallback(kept, "tvm", cascade) == [] and kept["projection"] == ["projection:int8"]
    assert select._int8_fallback(kept, "ort", "cpu") == [] and kept["projection"] == ["projection:int8"]
