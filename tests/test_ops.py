"""Each kernelize operator: its ONNX function body (run by ONNX Runtime) agrees with its
NumPy reference, and so does its ONNX Runtime lowering where it has one.

Every case builds a one-node model with ``Operator.make_node`` on an ``onnx_ir`` model
(as ``kernelize.passes.fuse.apply_site`` does) and runs it with
``kernelize.backends.ort.session``.
"""

from __future__ import annotations

import zlib

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from kernelize import ops
from kernelize.backends import ort as ort_backend
from kernelize.ops.base import add_initializer

RTOL = 1e-5
SHAPES = [(1, 7), (2, 13)]  # (batch, sequence): batch 1 and > 1, odd lengths
HEADS, HEAD_SIZE = 4, 8
HIDDEN = HEADS * HEAD_SIZE
INNER = 64


# -- helpers ------------------------------------------------------------------------------
def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def normal(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def build(op: ops.Operator, args: list[tuple[str, np.ndarray | None]], attrs: dict,
          consts: set[str] = frozenset(), prelude=None):
    """One node of ``op`` in a fresh model.

    ``args`` follow the operator's schema as (name, array or None); a name used twice is
    the same graph value (self-attention). Names in ``consts`` become initializers, the
    others graph inputs. ``prelude(graph, values)`` may replace input values by the outputs
    of nodes it appends (returns a new {name: value} mapping).
    Returns (model, feeds, node).
    """
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20}, name=f"one_{op.name}")
    model = ir.Model(graph, ir_version=10)
    created: dict[str, ir.Value] = {}
    feeds: dict[str, np.ndarray] = {}
    for name, array in args:
        if array is None or name in created:
            continue
        if name in consts:
            value = add_initializer(graph, ir.Value(name=name, const_value=ir.tensor(array)))
        else:
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
            graph.inputs.append(value)
            feeds[name] = array
        created[name] = value
    if prelude is not None:
        created = prelude(graph, created)
    inputs = [None if array is None else created[name] for name, array in args]
    node = op.make_node(model, inputs, attrs, name=f"{op.name}_under_test")
    graph.append(node)
    for out, name in zip(node.outputs, op.outputs):
        out.name = name
        out.type = ir.TensorType(ir.DataType.FLOAT)
        graph.outputs.append(out)
    return model, feeds, node


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    sess = ort_backend.session(model)
    result = ort_backend.run(sess, feeds)
    return [result[o.name] for o in model.graph.outputs]


def expected_outputs(op, args, attrs) -> list[np.ndarray]:
    ref = op.reference(*[a for _, a in args], **attrs)
    return list(ref) if isinstance(ref, tuple) else [ref]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL, what: str = ""):
    """|actual - expected| <= rtol * max(1, max |expected|), elementwise, same shape, finite."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def check_body(op, args, attrs, **build_kw):
    model, feeds, _ = build(op, args, attrs, **build_kw)
    expected = expected_outputs(op, args, attrs)
    actual = run(model, feeds)
    assert len(actual) == len(expected) == len(op.outputs)
    for name, a, e in zip(op.outputs, actual, expected):
        assert_close(a, e, what=f"{op.name} body output {name}")
    return model, feeds


def check_lowered(op, args, attrs, expect_lowered: bool | None, kernel: str | None = None, **build_kw):
    """Lower the one-node model for ONNX Runtime; it must still match the reference.

    ``expect_lowered``: True = replaced by ONNX Runtime kernels, False = the function body
    stays, None = either."""
    model, feeds, _ = build(op, args, attrs, **build_kw)
    counts = ort_backend.lower(model)
    remaining = [n for n in model.graph if n.domain == ops.DOMAIN]
    if expect_lowered is None:  # either is fine, as long as the result is right
        assert counts in ({}, {op.name: 1})
    elif expect_lowered:
        assert counts == {op.name: 1}
        assert not remaining, "the kernelize node is still in the graph after lowering"
        assert not model.functions, "unused function bodies were kept"
        assert ops.DOMAIN not in model.opset_imports
        if kernel is not None:
            assert kernel in {f"{n.domain}::{n.op_type}" for n in model.graph}
    else:
        assert counts == {}
        assert len(remaining) == 1 and len(model.functions) == 1
    expected = expected_outputs(op, args, attrs)
    actual = run(model, feeds)
    for name, a, e in zip(op.outputs, actual, expected):
        assert_close(a, e, what=f"{op.name} lowered output {name}")
    return model


def test_every_registered_operator_is_covered():
    assert set(ops.registered()) == set(COVERED), "add test cases for new operators (and list them in COVERED)"
    for name, test_file in COVERED.items():
        assert name in (Path(__file__).parent / test_file).read_text(), f"{test_file} does not test {name}"
    for name, op in ops.registered().items():
        assert op.name == name and ops.get(name) is op
        assert callable(op.reference) and callable(op.body)


# -- Attention ---------------------------------------------------------------------------
def attention_bias(kind: str, rng, batch: int, seq_q: int, seq_k: int) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "padding":  # [B, 1, 1, Sk]: 0 keeps, large negative drops the tail of the last row
        mask = np.zeros((batch, 1, 1, seq_k), np.float32)
        mask[-1, ..., seq_k - seq_k // 3:] = -1e9
        return mask
    if kind == "padding_inf":
        mask = np.zeros((batch, 1, 1, seq_k), np.float32)
        mask[-1, ..., seq_k - seq_k // 3:] = -np.inf
        return mask
    if kind == "causal":  # [1, 1, S, S]
        return np.triu(np.full((seq_q, seq_k), -1e9, np.float32), 1)[None, None]
    if kind == "full":  # [B, H, Sq, Sk]
        return normal(rng, batch, HEADS, seq_q, seq_k)
    raise ValueError(kind)


@pytest.mark.parametrize("batch,seq_q,seq_k", [(1, 7, 7), (2, 13, 13), (2, 7, 13)])
@pytest.mark.parametrize("bias", ["none", "padding", "padding_inf", "full"])
def test_attention_body(batch, seq_q, seq_k, bias):
    op = ops.get("Attention")
    rng = rng_for("attention", batch, seq_q, seq_k, bias)
    args = [("query", normal(rng, batch, HEADS, seq_q, HEAD_SIZE)),
            ("key", normal(rng, batch, HEADS, seq_k, HEAD_SIZE)),
            ("value", normal(rng, batch, HEADS, seq_k, HEAD_SIZE)),
            ("bias", attention_bias(bias, rng, batch, seq_q, seq_k))]
    model, _ = check_body(op, args, {"scale": HEAD_SIZE ** -0.5})
    node = next(iter(model.graph))
    assert len(node.inputs) == (3 if bias == "none" else 4)


def test_attention_masked_keys_are_ignored():
    """The reference itself: a dropped key position does not change the result."""
    op = ops.get("Attention")
    rng = rng_for("masked")
    q, k, v = (normal(rng, 1, 2, 5, 4) for _ in range(3))
    mask = np.zeros((1, 1, 1, 5), np.float32)
    mask[..., 3:] = -np.inf
    full = op.reference(q, k, v, mask, scale=0.5)
    cut = op.reference(q, k[:, :, :3], v[:, :, :3], None, scale=0.5)
    np.testing.assert_allclose(full, cut, rtol=1e-6, atol=1e-6)


def test_attention_scale_attribute_is_used():
    op = ops.get("Attention")
    rng = rng_for("scale")
    args = [("query", normal(rng, 1, HEADS, 7, HEAD_SIZE)), ("key", normal(rng, 1, HEADS, 7, HEAD_SIZE)),
            ("value", normal(rng, 1, HEADS, 7, HEAD_SIZE)), ("bias", None)]
    check_body(op, args, {"scale": 0.3})
    a = op.reference(*[x for _, x in args], scale=0.3)
    b = op.reference(*[x for _, x in args], scale=0.6)
    assert np.max(np.abs(a - b)) > 1e-3


def test_attention_has_no_ort_lowering():
    op = ops.get("Attention")
    rng = rng_for("attention-lower")
    args = [("query", normal(rng, 2, HEADS, 7, HEAD_SIZE)), ("key", normal(rng, 2, HEADS, 7, HEAD_SIZE)),
            ("value", normal(rng, 2, HEADS, 7, HEAD_SIZE)), ("bias", attention_bias("padding", rng, 2, 7, 7))]
    check_lowered(op, args, {"scale": HEAD_SIZE ** -0.5}, expect_lowered=False)


# -- MultiHeadAttention --------------------------------------------------------------------
def mha_args(rng, batch, seq_q, seq_k, bias, self_attention: bool):
    w = lambda: normal(rng, HIDDEN, HIDDEN, scale=HIDDEN ** -0.5)  # noqa: E731
    b = lambda: normal(rng, HIDDEN, scale=0.1)  # noqa: E731
    if self_attention:
        x = normal(rng, batch, seq_q, HIDDEN)
        inputs = [("x", x), ("x", x), ("x", x)]
    else:
        kv = normal(rng, batch, seq_k, HIDDEN)
        inputs = [("xq", normal(rng, batch, seq_q, HIDDEN)), ("xkv", kv), ("xkv", kv)]
    params = [("wq", w()), ("bq", b()), ("wk", w()), ("bk", b()), ("wv", w()), ("bv", b())]
    return inputs + params + [("bias", attention_bias(bias, rng, batch, seq_q, seq_k))]


MHA_PARAMS = {"wq", "bq", "wk", "bk", "wv", "bv"}
MHA_ATTRS = {"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5}


@pytest.mark.parametrize("batch,seq_q,seq_k", [(1, 7, 7), (2, 13, 13), (2, 7, 13)])
@pytest.mark.parametrize("bias", ["none", "padding", "full"])
@pytest.mark.parametrize("consts", [False, True], ids=["params-as-inputs", "params-as-initializers"])
def test_multi_head_attention_body(batch, seq_q, seq_k, bias, consts):
    op = ops.get("MultiHeadAttention")
    rng = rng_for("mha", batch, seq_q, seq_k, bias)
    args = mha_args(rng, batch, seq_q, seq_k, bias, self_attention=seq_q == seq_k)
    check_body(op, args, MHA_ATTRS, consts=MHA_PARAMS if consts else set())


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("bias", ["none", "causal", "full"])
def test_multi_head_attention_lowered_self_attention(batch, seq, bias):
    op = ops.get("MultiHeadAttention")
    rng = rng_for("mha-lower", batch, seq, bias)
    args = mha_args(rng, batch, seq, seq, bias, self_attention=True)
    model = check_lowered(op, args, MHA_ATTRS, expect_lowered=True, kernel="com.microsoft::Attention",
                          consts=MHA_PARAMS)
    (node,) = list(model.graph)
    assert node.attributes["num_heads"].value == HEADS
    packed = node.inputs[1].const_value.numpy()
    assert packed.shape == (HIDDEN, 3 * HIDDEN)


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_multi_head_attention_lowered_padding_mask(batch, seq):
    """A [B, 1, 1, S] padding mask (broadcast over heads and queries): lowered or not,
    the result must be right."""
    op = ops.get("MultiHeadAttention")
    rng = rng_for("mha-lower-padding", batch, seq)
    args = mha_args(rng, batch, seq, seq, "padding", self_attention=True)
    check_lowered(op, args, MHA_ATTRS, expect_lowered=None, consts=MHA_PARAMS)


def test_multi_head_attention_lowering_keeps_unusual_scale():
    op = ops.get("MultiHeadAttention")
    rng = rng_for("mha-scale")
    args = mha_args(rng, 2, 7, 7, "causal", self_attention=True)
    check_lowered(op, args, {"num_heads": HEADS, "scale": 0.05}, expect_lowered=True,
                  kernel="com.microsoft::Attention", consts=MHA_PARAMS)


def test_multi_head_attention_cross_attention_keeps_body():
    op = ops.get("MultiHeadAttention")
    rng = rng_for("mha-cross")
    args = mha_args(rng, 2, 7, 13, "padding", self_attention=False)
    check_lowered(op, args, MHA_ATTRS, expect_lowered=False, consts=MHA_PARAMS)


def test_multi_head_attention_runtime_weights_keep_body():
    """Weights that are graph inputs cannot be packed: the function body stays."""
    op = ops.get("MultiHeadAttention")
    rng = rng_for("mha-runtime")
    args = mha_args(rng, 1, 7, 7, "none", self_attention=True)
    check_lowered(op, args, MHA_ATTRS, expect_lowered=False)


# -- SkipLayerNorm -------------------------------------------------------------------------
def skip_ln_args(rng, batch, seq, with_beta, skip_batch=None):
    return [("input", normal(rng, batch, seq, HIDDEN)),
            ("skip", normal(rng, skip_batch or batch, seq, HIDDEN)),
            ("gamma", normal(rng, HIDDEN, scale=0.5) + 1.0),
            ("beta", normal(rng, HIDDEN, scale=0.5) if with_beta else None)]


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no-beta"])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-12])
def test_skip_layer_norm_body(batch, seq, with_beta, epsilon):
    op = ops.get("SkipLayerNorm")
    rng = rng_for("sln", batch, seq, with_beta, epsilon)
    check_body(op, skip_ln_args(rng, batch, seq, with_beta), {"epsilon": epsilon})


def test_skip_layer_norm_body_broadcasts_skip():
    op = ops.get("SkipLayerNorm")
    rng = rng_for("sln-broadcast")
    check_body(op, skip_ln_args(rng, 2, 7, True, skip_batch=1), {"epsilon": 1e-5})


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no-beta"])
def test_skip_layer_norm_lowered(batch, seq, with_beta):
    op = ops.get("SkipLayerNorm")
    rng = rng_for("sln-lower", batch, seq, with_beta)
    check_lowered(op, skip_ln_args(rng, batch, seq, with_beta), {"epsilon": 1e-5}, expect_lowered=True,
                  kernel="com.microsoft::SkipLayerNormalization", consts={"gamma", "beta"})


def _bias_prelude(bias: np.ndarray):
    """input := h + bias (a constant 1-D bias Add, as after an output projection)."""

    def prelude(graph, values):
        b = add_initializer(graph, ir.Value(name="proj_bias", const_value=ir.tensor(bias)))
        add = ir.Node("", "Add", [values["input"], b], num_outputs=1, name="proj_bias_add")
        add.outputs[0].name = "biased"
        add.outputs[0].shape = values["input"].shape
        add.outputs[0].type = values["input"].type
        graph.append(add)
        return {**values, "input": add.outputs[0]}

    return prelude


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no-beta"])
def test_skip_layer_norm_lowering_folds_bias(batch, seq, with_beta):
    op = ops.get("SkipLayerNorm")
    rng = rng_for("sln-fold", batch, seq, with_beta)
    args = skip_ln_args(rng, batch, seq, with_beta)
    bias = normal(rng, HIDDEN)
    model, feeds, _ = build(op, args, {"epsilon": 1e-5}, consts={"gamma", "beta"}, prelude=_bias_prelude(bias))
    before = run(model, feeds)
    assert ort_backend.lower(model) == {"SkipLayerNorm": 1}
    kinds = [f"{n.domain}::{n.op_type}" for n in model.graph]
    assert kinds == ["com.microsoft::SkipLayerNormalization"], "the bias Add should fold into the kernel"
    (node,) = list(model.graph)
    assert len(node.inputs) == 5 and node.inputs[4].name == "proj_bias"
    args[0] = ("input", args[0][1] + bias)
    expected = expected_outputs(op, args, {"epsilon": 1e-5})
    after = run(model, feeds)
    for name, b, a, e in zip(op.outputs, before, after, expected):
        assert_close(b, e, what=f"body output {name}")
        assert_close(a, e, what=f"lowered output {name}")


def test_skip_layer_norm_lowering_keeps_shared_bias_add():
    """The biased value is also a graph output: the Add must stay, unfolded."""
    op = ops.get("SkipLayerNorm")
    rng = rng_for("sln-shared")
    args = skip_ln_args(rng, 2, 7, True)
    bias = normal(rng, HIDDEN)
    model, feeds, _ = build(op, args, {"epsilon": 1e-5}, consts={"gamma", "beta"}, prelude=_bias_prelude(bias))
    biased = next(n for n in model.graph if n.op_type == "Add").outputs[0]
    model.graph.outputs.append(biased)
    assert ort_backend.lower(model) == {"SkipLayerNorm": 1}
    assert [n.op_type for n in model.graph] == ["Add", "SkipLayerNormalization"]
    args[0] = ("input", args[0][1] + bias)
    expected = expected_outputs(op, args, {"epsilon": 1e-5})
    y, total, b_out = run(model, feeds)
    assert_close(y, expected[0], what="Y")
    assert_close(total, expected[1], what="sum")
    assert_close(b_out, args[0][1], what="biased")


def test_skip_layer_norm_batch_broadcast_skip_lowered():
    """ONNX Runtime's kernel takes a [1, S, H] skip: lowered, same result."""
    op = ops.get("SkipLayerNorm")
    rng = rng_for("sln-broadcast-lower")
    check_lowered(op, skip_ln_args(rng, 2, 7, True, skip_batch=1), {"epsilon": 1e-5}, expect_lowered=True,
                  consts={"gamma", "beta"})


# -- RMSNorm ---------------------------------------------------------------------------------
def rms_args(rng, batch, seq):
    return [("input", normal(rng, batch, seq, HIDDEN, scale=3.0)), ("weight", normal(rng, HIDDEN) + 1.0)]


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("epsilon", [1e-6, 1e-5, 0.5])
def test_rms_norm_body(batch, seq, epsilon):
    op = ops.get("RMSNorm")
    check_body(op, rms_args(rng_for("rms", batch, seq, epsilon), batch, seq), {"epsilon": epsilon})


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_rms_norm_lowered(batch, seq, epsilon):
    op = ops.get("RMSNorm")
    check_lowered(op, rms_args(rng_for("rms-lower", batch, seq, epsilon), batch, seq), {"epsilon": epsilon},
                  expect_lowered=True, kernel="::SimplifiedLayerNormalization", consts={"weight"})


# -- FeedForward -----------------------------------------------------------------------------
def ffn_args(rng, batch, seq):
    return [("input", normal(rng, batch, seq, HIDDEN)),
            ("w1", normal(rng, HIDDEN, INNER, scale=HIDDEN ** -0.5)), ("b1", normal(rng, INNER, scale=0.5)),
            ("w2", normal(rng, INNER, HIDDEN, scale=INNER ** -0.5)), ("b2", normal(rng, HIDDEN, scale=0.5))]


ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]
FFN_KERNEL = {"gelu": "com.microsoft::BiasGelu", "gelu_tanh": "com.microsoft::FastGelu", "relu": "::Relu"}


def test_feed_forward_activations_are_all_tested():
    from kernelize.ops.feed_forward import ACTIVATIONS as declared

    assert set(declared) == set(ACTIVATIONS)


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feed_forward_body(batch, seq, activation):
    op = ops.get("FeedForward")
    check_body(op, ffn_args(rng_for("ffn", batch, seq, activation), batch, seq), {"activation": activation})


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feed_forward_lowered(batch, seq, activation):
    op = ops.get("FeedForward")
    check_lowered(op, ffn_args(rng_for("ffn-lower", batch, seq, activation), batch, seq),
                  {"activation": activation}, expect_lowered=True, kernel=FFN_KERNEL[activation],
                  consts={"w1", "b1", "w2", "b2"})


def test_feed_forward_activations_differ():
    op = ops.get("FeedForward")
    args = [a for _, a in ffn_args(rng_for("ffn-differ"), 1, 7)]
    outs = {act: op.reference(*args, activation=act) for act in ACTIVATIONS}
    assert np.max(np.abs(outs["gelu"] - outs["relu"])) > 1e-2
    assert 0 < np.max(np.abs(outs["gelu"] - outs["gelu_tanh"])) < 1e-2
    with pytest.raises(ValueError):
        op.reference(*args, activation="swish")


# -- GatedFeedForward --------------------------------------------------------------------------
def gated_args(rng, batch, seq):
    return [("input", normal(rng, batch, seq, HIDDEN)),
            ("w_gate", normal(rng, HIDDEN, INNER, scale=HIDDEN ** -0.5)),
            ("w_up", normal(rng, HIDDEN, INNER, scale=HIDDEN ** -0.5)),
            ("w_down", normal(rng, INNER, HIDDEN, scale=INNER ** -0.5))]


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_gated_feed_forward_body(batch, seq):
    op = ops.get("GatedFeedForward")
    check_body(op, gated_args(rng_for("swiglu", batch, seq), batch, seq), {})


def test_gated_feed_forward_has_no_ort_lowering():
    op = ops.get("GatedFeedForward")
    check_lowered(op, gated_args(rng_for("swiglu-lower"), 2, 13), {}, expect_lowered=False,
                  consts={"w_gate", "w_up", "w_down"})


# -- function bookkeeping ------------------------------------------------------------------------
def test_make_node_shares_one_function_per_overload():
    op = ops.get("RMSNorm")
    rng = rng_for("overloads")
    model, feeds, first = build(op, rms_args(rng, 1, 7), {"epsilon": 1e-6})
    x = first.outputs[0]
    second = op.make_node(model, [x, first.inputs[1]], {"epsilon": 1e-6})
    third = op.make_node(model, [second.outputs[0], first.inputs[1]], {"epsilon": 0.5})
    model.graph.extend([second, third])
    model.graph.outputs[0] = third.outputs[0]
    third.outputs[0].name = "Y3"
    third.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    assert first.overload == second.overload != third.overload
    assert len(model.functions) == 2
    w = feeds["weight"]
    expected = op.reference(op.reference(op.reference(feeds["input"], w, epsilon=1e-6), w, epsilon=1e-6),
                            w, epsilon=0.5)
    (actual,) = run(model, feeds)
    assert_close(actual, expected, what="chained RMSNorm")


# operator -> the test file with its cases (reference vs ONNX body vs TVM)
COVERED = {
    **{name: "test_ops.py" for name in ("Attention", "MultiHeadAttention", "SkipLayerNorm", "RMSNorm",
                                        "FeedForward", "GatedFeedForward")},
    "LinearAttention": "test_linear_attention.py",
    "SlidingWindowAttention": "test_sparse_attention.py",
    "BlockSparseAttention": "test_sparse_attention.py",
    "TopKAttention": "test_sparse_attention.py",
    "RPEAttention": "test_rpe_attention.py",
    "ShiftAddLinear": "test_projections.py",
    "LUTLinear": "test_projections.py",
    "Int8Linear": "test_int8.py",
}
