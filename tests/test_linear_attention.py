"""kernelize.LinearAttention, its feature maps (kernelize.ops.feature_maps) and the
``linear:*`` methods (kernelize.methods.linear).

The operator's ONNX function body (run by ONNX Runtime) and its TVM lowering must equal its
NumPy reference within 1e-5 relative over every feature map, causal and non-causal, with and
without a key-padding mask, odd lengths, batch > 1 and both sides of ``exact_below``. The
reference is the plain quadratic form, so these also check the chunked causal computation.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from kernelize import ops
from kernelize.methods import METHODS
from kernelize.methods.base import CapturedAttention, Fitted
from kernelize.methods.linear import exact_attention, relative_error
from kernelize.ops import feature_maps
from kernelize.ops.linear_attention import CHUNK, FEATURE_MAPS
from test_ops import assert_close, build, normal, rng_for, run

OP = ops.get("LinearAttention")
HEADS, HEAD_SIZE = 3, 8
LENGTHS = [(1, 7), (2, 13), (2, 33)]  # (batch, sequence): odd lengths, batch 1 and > 1


# -- helpers ------------------------------------------------------------------------------
def padding_mask(batch: int, seq: int) -> np.ndarray:
    """[B, 1, 1, S]: the last row drops its last third of keys (-1e9), the others keep all."""
    mask = np.zeros((batch, 1, 1, seq), np.float32)
    mask[-1, ..., seq - max(1, seq // 3):] = -1e9
    return mask


def map_parameters(kind: str, rng, heads: int = HEADS, head_size: int = HEAD_SIZE):
    """(feature_weight, feature_bias) for ``kind``: FAVOR+ projections, or a hedgehog map
    perturbed away from the identity (so the test does not hinge on a symmetric start)."""
    if kind == "favor":
        return feature_maps.favor_weight(head_size, 24, heads, seed=3), None
    if kind == "hedgehog":
        weight = np.eye(head_size, 6)[None] + normal(rng, heads, head_size, 6, scale=0.3)
        return weight.astype(np.float32), normal(rng, heads, 1, 6, scale=0.3)
    return None, None


def case(kind: str, batch: int, seq: int, causal: bool, masked: bool, exact_below: int = 0):
    """(args, attrs) of one LinearAttention call on random inputs."""
    rng = rng_for("linear", kind, batch, seq, causal, masked)
    weight, bias = map_parameters(kind, rng)
    args = [("query", normal(rng, batch, HEADS, seq, HEAD_SIZE)),
            ("key", normal(rng, batch, HEADS, seq, HEAD_SIZE)),
            ("value", normal(rng, batch, HEADS, seq, HEAD_SIZE)),
            ("bias", padding_mask(batch, seq) if masked else None),
            ("feature_weight", weight), ("feature_bias", bias)]
    attrs = {"feature_map": kind, "causal": int(causal), "scale": 1.0 / math.sqrt(HEAD_SIZE),
             "exact_below": exact_below}
    return args, attrs


def ort_output(args, attrs) -> np.ndarray:
    model, feeds, _ = build(OP, args, attrs)
    return run(model, feeds)[0]


def tvm_output(args, attrs) -> np.ndarray:
    from kernelize.backends import tvm as tvm_backend

    model, feeds, _ = build(OP, args, attrs)
    return tvm_backend.build(model, "cpu").run(feeds)[0]


def reference(args, attrs) -> np.ndarray:
    return OP.reference(*[a for _, a in args], **attrs)


def exact_softmax(args, causal: bool) -> np.ndarray:
    """Exact attention through kernelize.Attention's reference, causal mask added."""
    q, k, v, bias = (a for _, a in args[:4])
    mask = np.zeros((q.shape[-2], k.shape[-2]), np.float32) if bias is None else bias
    if causal:
        mask = mask + np.triu(np.full((q.shape[-2], k.shape[-2]), -1e9, np.float32), 1)
    return ops.get("Attention").reference(q, k, v, mask, scale=1.0 / math.sqrt(HEAD_SIZE))


# -- feature maps -------------------------------------------------------------------------
def test_feature_map_api():
    assert feature_maps.FEATURE_MAPS == ("elu", "relu", "favor", "hedgehog")
    weight = feature_maps.favor_weight(HEAD_SIZE, 20, 2, seed=1)
    assert weight.shape == (2, HEAD_SIZE, 20) and weight.dtype == np.float32
    assert np.array_equal(weight, feature_maps.favor_weight(HEAD_SIZE, 20, 2, seed=1))
    assert not np.array_equal(weight, feature_maps.favor_weight(HEAD_SIZE, 20, 2, seed=2))
    assert feature_maps.feature_count("elu", HEAD_SIZE) == HEAD_SIZE
    assert feature_maps.feature_count("relu", HEAD_SIZE) == HEAD_SIZE
    assert feature_maps.feature_count("favor", HEAD_SIZE, weight) == 20
    assert feature_maps.feature_count("hedgehog", HEAD_SIZE, np.zeros((2, HEAD_SIZE, 5))) == 10
    x = normal(rng_for("fm"), 2, 2, 5, HEAD_SIZE).astype(np.float64)
    for kind in feature_maps.FEATURE_MAPS:
        w, b = map_parameters(kind, rng_for("fm", kind), heads=2)
        for role in ("query", "key"):
            phi = feature_maps.reference(kind, x, role, w, b)
            assert phi.shape == (2, 2, 5, feature_maps.feature_count(kind, HEAD_SIZE, w))
            assert np.all(phi >= 0) and np.all(np.isfinite(phi))
    with pytest.raises(ValueError):
        feature_maps.reference("favor", x, "query")  # needs its weight
    with pytest.raises(ValueError):
        feature_maps.reference("elu", x, "value")


def test_feature_map_definitions():
    x = np.array([[-2.0, -0.5, 0.0, 1.5]])
    assert np.allclose(feature_maps.reference("elu", x, "query"), [[np.exp(-2.0), np.exp(-0.5), 1.0, 2.5]])
    assert np.allclose(feature_maps.reference("relu", x, "key"), [[0, 0, 0, 1.5]])
    weight, bias = np.eye(4)[None], np.zeros((1, 1, 4))
    phi = feature_maps.reference("hedgehog", x[None], "query", weight, bias)
    e = np.exp(x - x.max())
    assert np.allclose(phi[0, :, :4], e / e.sum()) and np.allclose(phi[0, :, 4:].sum(), 1.0)


def test_favor_estimates_the_softmax_kernel():
    """With many features, normalized phi(q) phi(k)^T approaches softmax attention (FAVOR+
    is unbiased for exp(q.k)); the stabilizers cancel in the normalization."""
    rng = rng_for("favor-kernel")
    q, k = normal(rng, 1, 1, 6, 4, scale=0.4), normal(rng, 1, 1, 9, 4, scale=0.4)
    weight = feature_maps.favor_weight(4, 8192, 1, seed=0)
    phi_q = feature_maps.reference("favor", q, "query", weight)
    phi_k = feature_maps.reference("favor", k, "key", weight)
    approx = phi_q @ np.swapaxes(phi_k, -1, -2)
    approx /= approx.sum(-1, keepdims=True)
    exact = np.exp(q.astype(np.float64) @ np.swapaxes(k, -1, -2))
    exact /= exact.sum(-1, keepdims=True)
    assert np.max(np.abs(approx - exact)) < 0.02
    orthogonal = weight[0][:, :4] / np.linalg.norm(weight[0][:, :4], axis=0)
    assert np.allclose(orthogonal.T @ orthogonal, np.eye(4), atol=1e-5)  # one block is orthogonal


# -- the operator: ONNX Runtime -----------------------------------------------------------
@pytest.mark.parametrize("batch,seq", LENGTHS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", FEATURE_MAPS)
def test_body_matches_reference(kind, causal, masked, batch, seq):
    args, attrs = case(kind, batch, seq, causal, masked)
    assert_close(ort_output(args, attrs), reference(args, attrs), what=f"{kind} body")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_body_long_causal_spans_several_chunks(causal):
    """S = 2 CHUNK + 5: three chunks, the last one padded."""
    args, attrs = case("hedgehog", 2, 2 * CHUNK + 5, causal, True)
    assert_close(ort_output(args, attrs), reference(args, attrs), what="hedgehog body, several chunks")


@pytest.mark.parametrize("kind", ["elu", "favor"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exact_below_dispatch(kind, causal):
    """Below the threshold the op is exact softmax attention; at it, linear attention."""
    seq = 13
    for threshold, exact in ((seq + 1, True), (seq, False)):
        args, attrs = case(kind, 2, seq, causal, True, exact_below=threshold)
        expected = reference(args, attrs)
        assert_close(ort_output(args, attrs), expected, what=f"exact_below={threshold}")
        linear = reference(args, {**attrs, "exact_below": 0})
        softmax = exact_softmax(args, causal)
        assert_close(expected, softmax if exact else linear, what="reference branch")
        assert np.max(np.abs(linear - softmax)) > 1e-3  # the two branches really differ here


def test_masked_keys_are_ignored():
    args, attrs = case("elu", 2, 13, False, True)
    changed = [(n, a.copy() if a is not None else None) for n, a in args]
    changed[2][1][-1, :, -2:] += 100.0  # values of dropped keys of the last row
    changed[1][1][-1, :, -2:] -= 50.0
    a, b = ort_output(args, attrs), ort_output(changed, attrs)
    assert_close(b, a, what="masked keys changed the output")


def test_causal_output_ignores_later_positions():
    args, attrs = case("cosformer", 1, 33, True, False)
    changed = [(n, a.copy() if a is not None else None) for n, a in args]
    for i in (1, 2):
        changed[i][1][:, :, 20:] = 7.0
    a, b = ort_output(args, attrs), ort_output(changed, attrs)
    assert_close(b[:, :, :20], a[:, :, :20], what="causal prefix")
    assert np.max(np.abs(b[:, :, 20:] - a[:, :, 20:])) > 1e-3


# -- the operator: TVM --------------------------------------------------------------------
TVM_CASES = []  # every map, causal and not; masks alternate and lengths rotate (full grid: slow)
for _i, _kind in enumerate(FEATURE_MAPS):
    for _causal in (False, True):
        TVM_CASES.append((_kind, _causal, (_i + _causal) % 2 == 0, *LENGTHS[(2 * _i + _causal) % 3]))


@pytest.mark.parametrize("kind,causal,masked,batch,seq", TVM_CASES)
def test_tvm_matches_reference(kind, causal, masked, batch, seq):
    pytest.importorskip("tvm")
    args, attrs = case(kind, batch, seq, causal, masked)
    assert_close(tvm_output(args, attrs), reference(args, attrs), what=f"{kind} TVM")


@pytest.mark.slow
@pytest.mark.parametrize("batch,seq", LENGTHS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", FEATURE_MAPS)
def test_tvm_matches_reference_full_grid(kind, causal, masked, batch, seq):
    pytest.importorskip("tvm")
    args, attrs = case(kind, batch, seq, causal, masked)
    assert_close(tvm_output(args, attrs), reference(args, attrs), what=f"{kind} TVM")


def test_tvm_several_chunks_and_exact_below():
    pytest.importorskip("tvm")
    args, attrs = case("favor", 1, CHUNK + 9, True, True)
    assert_close(tvm_output(args, attrs), reference(args, attrs), what="TVM several chunks")
    for threshold in (13, 14):
        args, attrs = case("relu", 2, 13, True, True, exact_below=threshold)
        assert_close(tvm_output(args, attrs), reference(args, attrs), what=f"TVM exact_below={threshold}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tvm_graph_has_no_sequence_squared_tensor(causal):
    """Every tensor of the lowered Relax graph at S = 150: the non-causal form has no tensor
    with two axes as long as S, the causal form none larger than CHUNK x CHUNK."""
    pytest.importorskip("tvm")
    from kernelize.backends import tvm as tvm_backend

    seq = 150
    args, attrs = case("elu", 1, seq, causal, True)
    model, _, _ = build(OP, args, attrs)
    mod, _ = tvm_backend.to_relax(model)
    shapes = [[int(d) for d in b.var.ty.shape] for block in mod["main"].body.blocks for b in block.bindings
              if hasattr(b.var.ty, "shape") and b.var.ty.shape is not None]
    assert len(shapes) > 10
    limit = seq if not causal else CHUNK + 1
    assert not [s for s in shapes if sum(d >= limit for d in s) >= 2], shapes
    if causal:
        assert any(s[-2:] == [CHUNK, CHUNK] for s in shapes)  # the in-chunk quadratic part


# -- methods ------------------------------------------------------------------------------
def peaked_site(samples: int, seed: int, heads: int = 2, seq: int = 64, head_size: int = 16,
                causal: bool = False) -> CapturedAttention:
    """Keys of norm 2 d^(1/4) in random directions; each query is a random key plus noise, so
    scaled scores have a spread of about 4 and softmax rows are peaked (entropy about 3 nats
    of log 64 = 4.2). The last sample pads its last quarter of keys."""
    rng = np.random.default_rng(seed)
    key = rng.standard_normal((samples, heads, seq, head_size))
    key *= 2.0 * head_size ** 0.25 / np.linalg.norm(key, axis=-1, keepdims=True)
    partner = rng.integers(0, seq, (samples, heads, seq))
    query = np.take_along_axis(key, partner[..., None], axis=2) + 0.3 * rng.standard_normal(key.shape)
    value = rng.standard_normal(key.shape)
    bias = np.zeros((samples, 1, 1, seq), np.float32)
    bias[-1, ..., -seq // 4:] = -1e9
    return CapturedAttention(query.astype(np.float32), key.astype(np.float32), value.astype(np.float32),
                             bias, 1.0 / math.sqrt(head_size), causal)


NAMES = ["linear:elu", "linear:relu", "linear:favor", "linear:cosformer", "linear:hedgehog"]


def test_methods_are_registered():
    for name in NAMES:
        assert METHODS[name].name == name and METHODS[name].kind == "attention"


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_a_linear_attention_call(name):
    site = peaked_site(4, seed=5, causal=name == "linear:cosformer")
    fitted = METHODS[name].fit(site, steps=20)
    assert isinstance(fitted, Fitted) and fitted.method == name and fitted.op == "LinearAttention"
    assert fitted.attrs == {"feature_map": name.split(":")[1], "causal": int(site.causal),
                            "scale": site.scale, "exact_below": 0}
    assert len(fitted.inputs) == 2
    weight, bias = fitted.inputs
    if name == "linear:favor":
        assert weight.shape == (2, 16, 64) and bias is None
    elif name == "linear:hedgehog":
        assert weight.shape == (2, 16, 16) and bias.shape == (2, 1, 16)
    else:
        assert weight is None and bias is None
    out = fitted.reference(site.query, site.key, site.value, site.bias)
    assert out.shape == site.value.shape and np.all(np.isfinite(out))
    assert 0.0 < fitted.info["output_error"] < 1.5


def test_options_are_honoured():
    site = peaked_site(4, seed=6)
    favor = METHODS["linear:favor"].fit(site, features=40, seed=1)
    assert favor.inputs[0].shape == (2, 16, 40) and favor.info["features"] == 40
    assert not np.array_equal(favor.inputs[0], METHODS["linear:favor"].fit(site, features=40, seed=2).inputs[0])
    hedgehog = METHODS["linear:hedgehog"].fit(site, features=24, steps=15)
    assert hedgehog.inputs[0].shape == (2, 16, 12) and hedgehog.info["steps"] == 15
    assert hedgehog.info["features"] == 24
    assert METHODS["linear:elu"].fit(site, exact_below=32).attrs["exact_below"] == 32
    causal_cross = CapturedAttention(site.query[:, :, :10], site.key, site.value, None, site.scale, True)
    assert isinstance(METHODS["linear:elu"].fit(causal_cross), str)


def test_cost_is_linear_in_sequence_length():
    site = peaked_site(2, seed=7)
    for name in NAMES:
        fitted = METHODS[name].fit(site, steps=5)
        shape = {"batch": 1, "heads": 12, "seq": 512, "head_size": 16}
        cost = METHODS[name].cost(fitted, shape)
        assert cost > 0
        assert METHODS[name].cost(fitted, {**shape, "seq": 1024}) == pytest.approx(2 * cost)
        causal = Fitted(fitted.method, fitted.op, {**fitted.attrs, "causal": 1}, fitted.inputs)
        assert METHODS[name].cost(causal, {**shape, "seq": 1024}) == pytest.approx(
            2 * METHODS[name].cost(causal, shape))
    elu = METHODS["linear:elu"].fit(site)
    shape = {"batch": 2, "heads": 3, "seq": 100, "head_size": 16}
    assert METHODS["linear:elu"].cost(elu, shape) == 2 * 2 * 3 * 100 * 16 * 17  # phi(K)^T [V 1], phi(Q) S
    short = Fitted(elu.method, elu.op, {**elu.attrs, "exact_below": 128}, elu.inputs)
    assert METHODS["linear:elu"].cost(short, shape) == 2.0 * 2 * 3 * 100 * 100 * 16


def test_hedgehog_beats_elu_on_peaked_attention_and_is_deterministic():
    train, held_out = peaked_site(8, seed=1), peaked_site(4, seed=2)
    start = time.perf_counter()
    hedgehog = METHODS["linear:hedgehog"].fit(train, seed=0)
    seconds = time.perf_counter() - start
    elu = METHODS["linear:elu"].fit(train)
    errors = {"elu": relative_error(elu, held_out), "hedgehog": relative_error(hedgehog, held_out)}
    assert errors["hedgehog"] < errors["elu"] - 0.1, errors
    assert hedgehog.info["loss"] < hedgehog.info["loss_identity"] - 0.2, hedgehog.info
    again = METHODS["linear:hedgehog"].fit(train, seed=0)
    for a, b in zip(hedgehog.inputs, again.inputs):
        assert np.array_equal(a, b)
    assert seconds < 60


def test_hedgehog_respects_causality():
    site = peaked_site(4, seed=3, causal=True)
    fitted = METHODS["linear:hedgehog"].fit(site, steps=100)
    assert fitted.attrs["causal"] == 1
    assert fitted.info["loss"] < fitted.info["loss_identity"]
    exact = exact_attention(site)
    assert np.allclose(exact[:, :, 0], site.value[:, :, 0], atol=1e-5)  # first query sees only itself
    out = fitted.reference(site.query, site.key, site.value, site.bias)
    assert np.allclose(out[:, :, 0], site.value[:, :, 0] / (1 + 1e-6 / _first_score(fitted, site)), atol=1e-4)


def _first_score(fitted, site):
    """phi(q_0) . phi(k_0) per sample and head (the causal row 0 has only that key)."""
    root = math.sqrt(site.scale)
    weight, bias = fitted.inputs
    phi_q = feature_maps.reference("hedgehog", site.query[:, :, :1] * root, "query", weight, bias)
    phi_k = feature_maps.reference("hedgehog", site.key[:, :, :1] * root, "key", weight, bias)
    return (phi_q * phi_k).sum(-1)  # [N, H, 1]


@pytest.mark.slow
def test_hedgehog_fits_a_full_size_site_in_seconds():
    """The brief's size: N=16, H=12, S=256, D=32."""
    site = peaked_site(16, seed=4, heads=12, seq=256, head_size=32)
    start = time.perf_counter()
    fitted = METHODS["linear:hedgehog"].fit(site)
    assert time.perf_counter() - start < 60
    assert fitted.info["loss"] < fitted.info["loss_identity"]
