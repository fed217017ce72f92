"""Sparse attention operators (SlidingWindowAttention, BlockSparseAttention, TopKAttention) and
their calibration methods (sparse:window, sparse:block, sparse:topk).

Operators: the ONNX function body (run by ONNX Runtime) and the TVM lowering must equal the
dense masked NumPy reference within 1e-5 relative, over causal / non-causal, with and without
a key-padding mask, odd lengths (not multiples of the block, shorter than the window), batch
> 1 and ``exact_below`` on both sides of the threshold. The references themselves are checked
against the documented rules with one-hot values (uniform scores reveal the attended set).

Methods: on synthetic local attention the chosen budget is small and meets the recall target;
on uniform attention nothing cheaper than exact attention does.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelize import ops
from kernelize.methods import METHODS, exact_attention_cost
from kernelize.methods.base import CapturedAttention
from test_ops import assert_close, build, normal, rng_for, run

HEADS, HEAD_SIZE = 2, 8
SCALE = HEAD_SIZE ** -0.5
SEQS = [(1, 7), (2, 13), (2, 33)]  # (batch, seq): odd, not multiples of the blocks below
CONFIGS = {  # id -> (operator, its sparsity attributes)
    "window5-sinks2": ("SlidingWindowAttention", {"window": 5, "sinks": 2}),
    "window20": ("SlidingWindowAttention", {"window": 20, "sinks": 0}),  # longer than 7 and 13
    "block4-local1-global1": ("BlockSparseAttention", {"block": 4, "local_blocks": 1, "global_blocks": 1}),
    "block8-local0": ("BlockSparseAttention", {"block": 8, "local_blocks": 0, "global_blocks": 0}),
    "topk5": ("TopKAttention", {"top_k": 5}),
    "topk16": ("TopKAttention", {"top_k": 16}),  # more than 7 and 13 keys
}


def padding_bias(batch: int, seq: int, kind: str = "hard") -> np.ndarray:
    """[B, 1, 1, S]: the last sample's last third is padding (-1e9); ``soft`` adds small
    negative values elsewhere (added as-is)."""
    bias = np.zeros((batch, 1, 1, seq), np.float32)
    if kind == "soft":
        bias[...] = -np.linspace(0.0, 1.5, seq, dtype=np.float32)
    bias[-1, ..., seq - seq // 3:] = -1e9
    return bias


def site_args(key, batch, seq, bias: np.ndarray | None):
    rng = rng_for(*key)
    return [("query", normal(rng, batch, HEADS, seq, HEAD_SIZE)), ("key", normal(rng, batch, HEADS, seq, HEAD_SIZE)),
            ("value", normal(rng, batch, HEADS, seq, HEAD_SIZE)), ("bias", bias)]


def attrs_for(config: str, causal: int, exact_below: int = 0) -> tuple[ops.Operator, dict]:
    name, extra = CONFIGS[config]
    return ops.get(name), {"scale": SCALE, "causal": causal, "exact_below": exact_below, **extra}


def check_body(op, args, attrs):
    model, feeds, _ = build(op, args, attrs)
    expected = op.reference(*[a for _, a in args], **attrs)
    (actual,) = run(model, feeds)
    assert_close(actual, expected, what=f"{op.name} ONNX body")
    return actual


def check_tvm(op, args, attrs):
    from kernelize.backends import tvm as tvm_backend

    model, feeds, _ = build(op, args, attrs)
    (actual,) = tvm_backend.build(model, "cpu").run(feeds)
    expected = op.reference(*[a for _, a in args], **attrs)
    assert_close(actual, expected, what=f"{op.name} TVM")
    return actual


def exact(args, causal: bool) -> np.ndarray:
    from kernelize.ops.block_sparse_attention import exact_reference

    return exact_reference(*[a for _, a in args], SCALE, causal)


# -- references against the documented rules ---------------------------------------------------
def window_rule(i, j, window, sinks, causal):
    if causal and j > i:
        return False
    return abs(i - j) < window or j < sinks


def block_rule(i, j, block, local_blocks, global_blocks, causal):
    if causal and j > i:
        return False
    qb, kb = i // block, j // block
    return abs(qb - kb) <= local_blocks or kb < global_blocks or qb < global_blocks


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.startswith("topk")])
@pytest.mark.parametrize("causal", [0, 1])
def test_attended_keys_follow_the_rule(config, causal):
    """Zero queries (uniform scores) and one-hot values: output row i is the uniform
    distribution over the keys i attends, in the reference and in the ONNX body."""
    seq = 21
    op, attrs = attrs_for(config, causal)
    q = np.zeros((1, 1, seq, 4), np.float32)
    k = normal(rng_for("rule", config), 1, 1, seq, 4)
    v = np.eye(seq, dtype=np.float32)[None, None]
    extra = CONFIGS[config][1]
    rule = window_rule if op.name == "SlidingWindowAttention" else block_rule
    expected = np.array([[rule(i, j, *extra.values(), causal) for j in range(seq)] for i in range(seq)], float)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(op.reference(q, k, v, None, **attrs)[0, 0], expected, atol=1e-6)
    model, feeds, _ = build(op, [("query", q), ("key", k), ("value", v), ("bias", None)], attrs)
    np.testing.assert_allclose(run(model, feeds)[0][0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("causal", [0, 1])
def test_topk_reference_keeps_the_k_best_scores(causal):
    op, attrs = attrs_for("topk5", causal)
    seq = 12
    args = site_args(("topk-rule", causal), 1, seq, None)
    q, k, v, _ = (a for _, a in args)
    scores = (q[0, 0].astype(np.float64) @ k[0, 0].T.astype(np.float64)) * SCALE
    expected = np.zeros((seq, HEAD_SIZE))
    for i in range(seq):
        keys = np.arange(i + 1 if causal else seq)
        best = keys[np.argsort(-scores[i, keys])[:5]]
        p = np.exp(scores[i, best] - scores[i, best].max())
        expected[i] = (p / p.sum()) @ v[0, 0, best]
    np.testing.assert_allclose(op.reference(q, k, v, None, **attrs)[0, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["window5-sinks2", "block4-local1-global1", "topk5"])
def test_sparse_reference_differs_from_exact_attention(config):
    """The test shapes really exercise sparsity (otherwise the kernels could be dense)."""
    op, attrs = attrs_for(config, 0)
    args = site_args(("differs", config), 1, 33, None)
    assert np.max(np.abs(op.reference(*[a for _, a in args], **attrs) - exact(args, False))) > 1e-2


def test_window_covering_everything_is_exact_attention():
    op, attrs = attrs_for("window20", 0)
    args = site_args(("covering",), 2, 13, padding_bias(2, 13))
    np.testing.assert_allclose(op.reference(*[a for _, a in args], **attrs), exact(args, False), atol=1e-6)


# -- ONNX function bodies -----------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch,seq", SEQS)
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("bias", ["none", "padding"])
def test_body(config, batch, seq, causal, bias):
    op, attrs = attrs_for(config, causal)
    args = site_args(("body", config, batch, seq, causal, bias), batch, seq,
                     padding_bias(batch, seq) if bias == "padding" else None)
    check_body(op, args, attrs)


@pytest.mark.parametrize("config", ["window5-sinks2", "block4-local1-global1", "topk5"])
def test_body_soft_bias_and_inf_padding(config):
    """Bias values above -1e4 are added as-is; -inf padding drops keys without NaNs."""
    op, attrs = attrs_for(config, 0)
    bias = padding_bias(2, 33, "soft")
    bias[bias < -1e4] = -np.inf
    check_body(op, site_args(("soft", config), 2, 33, bias), attrs)


@pytest.mark.parametrize("config", ["window5-sinks2", "block8-local0", "topk5"])
def test_rows_without_keys_give_zero(config):
    """A sample whose keys are all padding: its rows have no key left and output 0
    (reference and body), the other sample's rows are untouched."""
    op, attrs = attrs_for(config, 1)
    bias = np.zeros((2, 1, 1, 33), np.float32)
    bias[1, ..., :] = -1e9  # the whole second sample is padding
    args = site_args(("empty", config), 2, 33, bias)
    out = check_body(op, args, attrs)
    assert np.all(out[1] == 0) and np.max(np.abs(out[0])) > 0.1


def test_topk_takes_a_full_bias():
    op, attrs = attrs_for("topk5", 1)
    rng = rng_for("topk-full-bias")
    args = site_args(("topk-full",), 2, 13, normal(rng, 2, HEADS, 13, 13))
    check_body(op, args, attrs)


@pytest.mark.parametrize("config", ["window5-sinks2", "block4-local1-global1", "topk5"])
@pytest.mark.parametrize("causal", [0, 1])
def test_body_exact_below(config, causal):
    """S = 13: exact_below 14 runs exact attention, exact_below 13 the sparse kernel."""
    args = site_args(("exact-below", config, causal), 2, 13, padding_bias(2, 13))
    op, attrs = attrs_for(config, causal, exact_below=14)
    out = check_body(op, args, attrs)
    assert_close(out, exact(args, bool(causal)), what="exact branch")
    op, attrs = attrs_for(config, causal, exact_below=13)
    out = check_body(op, args, attrs)
    assert np.max(np.abs(out - exact(args, bool(causal)))) > 1e-3


# -- TVM lowerings -----------------------------------------------------------------------------
FAST_TVM = {((2, 13), 1, "padding"), ((2, 33), 0, "none")}  # the rest: slow


def tvm_cases():
    for config in CONFIGS:
        for batch_seq in SEQS:
            for causal in (0, 1):
                for bias in ("none", "padding"):
                    marks = [] if (batch_seq, causal, bias) in FAST_TVM else [pytest.mark.slow]
                    yield pytest.param(config, *batch_seq, causal, bias, marks=marks)


@pytest.mark.parametrize("config,batch,seq,causal,bias", list(tvm_cases()))
def test_tvm(config, batch, seq, causal, bias):
    pytest.importorskip("tvm")
    op, attrs = attrs_for(config, causal)
    args = site_args(("tvm", config, batch, seq, causal, bias), batch, seq,
                     padding_bias(batch, seq) if bias == "padding" else None)
    check_tvm(op, args, attrs)


@pytest.mark.parametrize("config", ["window5-sinks2", "block4-local1-global1", "topk5"])
def test_tvm_exact_below(config):
    pytest.importorskip("tvm")
    args = site_args(("tvm-exact-below", config), 2, 13, padding_bias(2, 13))
    op, attrs = attrs_for(config, 1, exact_below=14)
    assert_close(check_tvm(op, args, attrs), exact(args, True), what="exact branch")
    op, attrs = attrs_for(config, 1, exact_below=13)
    assert np.max(np.abs(check_tvm(op, args, attrs) - exact(args, True))) > 1e-3


def test_tvm_rejects_a_full_bias_for_banded_kernels():
    pytest.importorskip("tvm")
    from kernelize.backends import tvm as tvm_backend
    from kernelize.errors import KernelizeError

    op, attrs = attrs_for("window5-sinks2", 0)
    args = site_args(("tvm-full",), 1, 13, normal(rng_for("full"), 1, HEADS, 13, 13))
    model, _, _ = build(op, args, attrs)
    with pytest.raises(KernelizeError, match="key-padding"):
        tvm_backend.build(model, "cpu")


# -- costs ----------------------------------------------------------------------------------------
SHAPE_4K = {"batch": 1, "heads": 12, "seq": 4096, "head_size": 64}


def test_kernel_costs_fall_with_sparsity():
    from kernelize.ops.block_sparse_attention import block_sparse_cost
    from kernelize.ops.sliding_window_attention import sliding_window_cost
    from kernelize.ops.topk_attention import topk_cost

    dense = exact_attention_cost(SHAPE_4K)
    window = sliding_window_cost({"window": 256, "sinks": 4, "causal": 0}, SHAPE_4K) / dense
    causal_window = sliding_window_cost({"window": 256, "sinks": 4, "causal": 1}, SHAPE_4K) / dense
    block = block_sparse_cost({"block": 64, "local_blocks": 2, "global_blocks": 1, "causal": 0}, SHAPE_4K) / dense
    topk = topk_cost({"top_k": 256}, SHAPE_4K) / dense
    assert 0.12 < window < 0.16 and causal_window < 0.08  # (4 + 64 + 510) / 4096, (4 + 64 + 255) / 4096
    assert 0.08 < block < 0.12  # 6 blocks of 64 per query + 64 dense rows
    assert 0.5 < topk < 0.54  # Q K^T stays dense
    assert sliding_window_cost({"window": 128, "sinks": 0, "causal": 0}, SHAPE_4K) < \
        sliding_window_cost({"window": 256, "sinks": 0, "causal": 0}, SHAPE_4K)


# -- methods ----------------------------------------------------------------------------------------
def positional_site(seq: int, sharpness: float, batch: int = 2, heads: int = 2, causal: bool = False,
                    bias: np.ndarray | None = None) -> CapturedAttention:
    """Q = K = sinusoidal positions: the score falls with |i - j|, faster for larger
    ``sharpness`` (0: uniform attention)."""
    freqs = np.linspace(0.02, 0.6, 16)
    angles = np.arange(seq)[:, None] * freqs[None, :]
    pos = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    x = np.broadcast_to(pos, (batch, heads, seq, pos.shape[1])).copy()
    value = normal(rng_for("site-values", seq), batch, heads, seq, 8)
    return CapturedAttention(query=x * sharpness, key=x, value=value, bias=bias, scale=1.0, causal=causal)


def test_methods_are_registered():
    for name in ("sparse:window", "sparse:block", "sparse:topk"):
        assert METHODS[name].name == name and METHODS[name].kind == "attention"


@pytest.mark.parametrize("causal", [False, True])
def test_window_fit_on_local_attention(causal):
    bias = padding_bias(2, 256)
    site = positional_site(256, 3.0, causal=causal, bias=bias)
    fitted = METHODS["sparse:window"].fit(site)
    assert not isinstance(fitted, str), fitted
    assert fitted.op == "SlidingWindowAttention" and fitted.attrs["causal"] == int(causal)
    assert fitted.attrs["window"] <= 16 and fitted.info["recall"] >= 0.95
    assert 0 < fitted.attrs["exact_below"] <= 256
    # a higher target needs at least as large a budget
    strict = METHODS["sparse:window"].fit(site, recall=0.999)
    assert isinstance(strict, str) or strict.attrs["window"] >= fitted.attrs["window"]
    # the fitted call runs, and is close to exact attention on this local site (real rows)
    real = np.broadcast_to((bias[:, 0, 0] > -1e4)[:, None, :, None], site.value.shape)
    out = fitted.reference(site.query, site.key, site.value, site.bias)
    ref = exact_reference_of(site)
    assert np.mean(np.abs(out - ref)[real]) < 0.1 * np.mean(np.abs(ref)[real])
    shape = {"batch": 1, "heads": 2, "seq": 4096, "head_size": 32}
    assert METHODS["sparse:window"].cost(fitted, shape) < 0.05 * exact_attention_cost(shape)
    assert METHODS["sparse:window"].cost(fitted, {**shape, "seq": 1}) == exact_attention_cost({**shape, "seq": 1})


def exact_reference_of(site: CapturedAttention) -> np.ndarray:
    from kernelize.ops.block_sparse_attention import exact_reference

    return exact_reference(site.query, site.key, site.value, site.bias, site.scale, site.causal)


@pytest.mark.parametrize("method", ["sparse:window", "sparse:block", "sparse:topk"])
def test_fit_on_uniform_attention_finds_nothing(method):
    site = positional_site(128, 0.0)
    result = METHODS[method].fit(site)
    assert isinstance(result, str) and "attention" in result


def test_block_fit_on_local_attention():
    site = positional_site(256, 3.0)
    fitted = METHODS["sparse:block"].fit(site)
    assert not isinstance(fitted, str), fitted
    assert fitted.op == "BlockSparseAttention" and fitted.info["recall"] >= 0.95
    assert fitted.info["cost_vs_exact"] < 0.5
    assert fitted.attrs["block"] * (2 * fitted.attrs["local_blocks"] + 1 + fitted.attrs["global_blocks"]) <= 128


def test_topk_fit_on_local_attention():
    site = positional_site(256, 3.0)
    fitted = METHODS["sparse:topk"].fit(site, recall=0.9)
    assert not isinstance(fitted, str), fitted
    assert fitted.attrs["top_k"] <= 16 and fitted.info["recall"] >= 0.9
    assert METHODS["sparse:topk"].cost(fitted, {"batch": 1, "heads": 2, "seq": 256, "head_size": 32}) < \
        exact_attention_cost({"batch": 1, "heads": 2, "seq": 256, "head_size": 32})


def test_fit_refuses_relative_position_bias():
    site = positional_site(64, 3.0)
    site.rel_bias = np.zeros((2, 127), np.float32)
    assert isinstance(METHODS["sparse:window"].fit(site), str)
