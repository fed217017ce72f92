"""Toeplitz relative-position biases found in real exported graphs (random-weight MPT with
ALiBi, T5 encoder with bucketed relative bias, BLOOM with ALiBi on cumsum(attention_mask)
positions after canonicalization of its [batch * heads, n, n] products), proven by
``kernelize.patterns.positional.match_toeplitz`` and used to replace each attention site by
``kernelize.RPEAttention``.

For every site: the extracted ``rel_bias`` (+ remaining mask + causal flag) reproduces the
model's own bias (checked on values at a length other than the export's), the rewrite with
``exact_below`` above the length (exact softmax from the extracted pieces) leaves the model's
output unchanged, and the end-to-end error of the kernelized (FFT) rewrite is reported.
A bias that is not Toeplitz, or a mask alone, is refused with its reason.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import onnx_ir as ir
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import kernelize  # noqa: E402
from kernelize.backends import ort as ort_backend  # noqa: E402
from kernelize.frontends.torch import capture  # noqa: E402
from kernelize.ops import rpe_attention as rpe  # noqa: E402
from kernelize.ops.base import add_initializer  # noqa: E402
from kernelize.passes.canonicalize import canonicalize  # noqa: E402
from kernelize.passes.fuse import apply_site  # noqa: E402
from kernelize.patterns.attention import AttentionPattern  # noqa: E402
from kernelize.patterns.positional import Toeplitz, match_toeplitz  # noqa: E402

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 2, 100


def text_inputs(batch: int, seq: int, pad: bool = True, left: bool = False) -> dict:
    """Random tokens; with ``pad`` the last row's final third is padding (its first third with
    ``left``)."""
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        if left:
            mask[-1, :seq // 3] = 0
        else:
            mask[-1, seq - seq // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _export_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                  **kwargs):
    """T5's eager attention, returning the merged heads directly: the dynamo exporter cannot
    view T5's own transpose(1, 2).contiguous() output under dynamic shapes (same math)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (1.0 if scaling is None else scaling)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value)
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d), probs


def build_mpt():
    config = transformers.MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                    max_seq_len=128, use_cache=False)
    return transformers.MptModel(config)


def build_t5():
    transformers.AttentionInterface.register("kernelize_export_eager", _export_eager)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN,
                                   num_layers=LAYERS, num_heads=HEADS, use_cache=False)
    config._attn_implementation = "kernelize_export_eager"
    return transformers.T5EncoderModel(config)


def build_bloom():
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                      use_cache=False)
    return transformers.BloomModel(config)


# name: (builder, Toeplitz source, causal, canonicalize first)
MODELS = {"mpt": (build_mpt, "alibi", True, False), "t5": (build_t5, "t5", False, False),
          "bloom": (build_bloom, "alibi", True, True)}


def export(builder, canonical: bool = False):
    torch.manual_seed(0)
    module = builder().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = capture(module, text_inputs(2, 16))
    if canonical:
        # BLOOM's baddbmm/bmm over [batch * heads, n, n] becomes the [B, H, n, n] form
        counts = canonicalize(model)
        assert counts.get("batched_head_attention") == 2 * LAYERS, counts
    return module, model


def attention_cores(model: ir.Model):
    pattern = AttentionPattern()
    cores, misses = [], []
    for node in list(model.graph):
        if node.op_type == "Softmax":
            core = pattern.core(node, model)
            (misses if isinstance(core, str) else cores).append(core)
    return cores, misses


def outputs(model: ir.Model, feeds: dict, names=None) -> dict:
    session = ort_backend.session(model)
    return ort_backend.run(session, feeds, names)


def feeds_of(batch: int, seq: int, left: bool = False) -> dict:
    return {k: v.numpy() for k, v in text_inputs(batch, seq, left=left).items()}


def rewrite(model: ir.Model, feature_map: str, exact_below: int, decay: bool = False,
            far: bool = False) -> list[Toeplitz]:
    """Every attention core -> RPEAttention (raises if one is not Toeplitz); ``decay``: causal
    ALiBi sites get ``decay = 1``, ``far``: sites with a far-field constant get ``far_from``, as
    the RPE methods give them."""
    found = []
    for index, site in enumerate(attention_cores(model)[0]):
        site.index = index
        toeplitz = match_toeplitz(site.inputs[3], model)
        assert isinstance(toeplitz, Toeplitz), toeplitz
        q, k, v, _ = site.inputs
        site.op = "RPEAttention"
        site.inputs = [q, k, v, toeplitz.rel_bias, toeplitz.mask]
        site.attrs = {"feature_map": feature_map, "causal": int(toeplitz.causal), "scale": site.attrs["scale"],
                      "exact_below": exact_below,
                      "decay": int(decay and toeplitz.causal and toeplitz.source == "alibi"),
                      "far_from": int(toeplitz.info.get("far_from", 0)) if far else 0}
        site.extra_nodes = site.extra_nodes + toeplitz.nodes
        apply_site(model, site)
        found.append(toeplitz)
    return found


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request):
    builder, source, causal, canonical = MODELS[request.param]
    module, model = export(builder, canonical)
    return request.param, module, model, source, causal


def test_sites_are_toeplitz(exported):
    name, _, model, source, causal = exported
    cores, misses = attention_cores(model)
    assert len(cores) == LAYERS and not misses, misses
    for site in cores:
        toeplitz = match_toeplitz(site.inputs[3], model)
        assert isinstance(toeplitz, Toeplitz), f"{name}: {toeplitz}"
        assert toeplitz.source == source and toeplitz.causal == causal
        print(name, toeplitz.source, toeplitz.info)


def test_extracted_bias_reproduces_the_model_bias(exported):
    """At a length other than the export's: the site's bias equals Toeplitz(rel_bias) + mask
    (+ causal), up to a constant per query row, on every kept entry."""
    name, _, model, _, causal = exported
    model = ir.from_proto(ir.to_proto(model))
    site = attention_cores(model)[0][0]
    toeplitz = match_toeplitz(site.inputs[3], model)
    model.graph.insert_before(site.nodes[0], site.extra_nodes + toeplitz.nodes)
    for node in site.extra_nodes + toeplitz.nodes:  # constants the patterns created
        for v in node.inputs:
            if v is not None and v.const_value is not None and v.producer() is None and not v.is_initializer():
                add_initializer(model.graph, v)
    wanted = [site.inputs[3], toeplitz.rel_bias] + ([toeplitz.mask] if toeplitz.mask is not None else [])
    for v in wanted:
        model.graph.outputs.append(v)
    batch, n = 2, 23
    result = outputs(model, feeds_of(batch, n), [v.name for v in wanted])
    full = np.broadcast_to(result[wanted[0].name], (batch, HEADS, n, n)).astype(np.float64)
    rel = result[wanted[1].name]
    assert rel.shape == (HEADS, 2 * n - 1)
    rebuilt = rpe.toeplitz(rel.astype(np.float64), n)[None]
    kept = np.ones((batch, 1, n, n), bool)
    if toeplitz.mask is not None:
        kept = kept & (result[wanted[2].name] > -1e4)
    if causal:
        kept = kept & np.tril(np.ones((n, n), bool))
    assert np.all(full[np.broadcast_to(~kept, full.shape)] <= -1e4), "an entry the mask drops is kept by the model"
    shift = np.where(kept, full - rebuilt, np.nan)
    spread = np.nanmax(shift, -1) - np.nanmin(shift, -1)
    assert np.nanmax(spread) < 1e-4, f"{name}: bias differs from Toeplitz(rel_bias) by {np.nanmax(spread)}"


@pytest.mark.parametrize("feature_map", ["exact", "elu"])
def test_rpe_rewrite_end_to_end(exported, feature_map):
    """The model with every attention site replaced by RPEAttention against the original:
    ``exact`` (exact_below above the length: the extracted bias drives exact softmax) must
    not change the output; ``elu`` (the FFT path) reports its approximation error."""
    name, _, model, _, _ = exported
    original = ir.from_proto(ir.to_proto(model))
    rewritten = ir.from_proto(ir.to_proto(model))
    found = rewrite(rewritten, "elu", exact_below=10_000 if feature_map == "exact" else 0)
    assert len(found) == LAYERS
    for batch, n in ((2, 16), (3, 23)):
        feeds = feeds_of(batch, n)
        names = [o.name for o in original.graph.outputs][:1]
        before = outputs(original, feeds, names)[names[0]]
        after = outputs(rewritten, feeds, names)[names[0]]
        assert after.shape == before.shape and np.all(np.isfinite(after))
        error = float(np.max(np.abs(after.astype(np.float64) - before)))
        relative = error / float(np.max(np.abs(before)))
        print(f"{name} {feature_map} batch={batch} n={n}: max abs error {error:.3g} (relative {relative:.3g})")
        if feature_map == "exact":
            assert error <= 1e-4, f"{name}: exact rewrite changed the output by {error}"
        else:
            assert math.isfinite(error)


def assert_same_outputs(model: ir.Model, other: ir.Model, shapes) -> None:
    """The first outputs of two models agree within 1e-5 (of the largest value) at each (batch, n)."""
    name = model.graph.outputs[0].name
    for batch, n in shapes:
        feeds = feeds_of(batch, n)
        want, got = outputs(model, feeds, [name])[name], outputs(other, feeds, [name])[name]
        assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want)))), (batch, n)


@pytest.mark.parametrize("exported", ["mpt", "bloom"], indirect=True)
def test_alibi_decay_form_equals_the_fft_end_to_end(exported):
    """Causal ALiBi with ``decay = 1`` (ONNX Runtime's chunked decay) computes the same
    operator as the FFT path: the two rewritten models agree end to end."""
    _, _, model, _, _ = exported
    by_fft, by_decay = (ir.from_proto(ir.to_proto(model)) for _ in range(2))
    rewrite(by_fft, "elu", 0)
    rewrite(by_decay, "elu", 0, decay=True)
    assert all(n.attributes["decay"].as_int() == 1 for n in by_decay.graph if n.op_type == "RPEAttention")
    assert_same_outputs(by_fft, by_decay, ((2, 16), (3, 70)))


@pytest.mark.parametrize("exported", ["t5"], indirect=True)
def test_t5_far_field_form_equals_the_fft_end_to_end(exported):
    """T5's buckets clamp: the pattern finds the bias constant beyond offset 91 (32 buckets,
    max_distance 128; checked on 2^20 offsets), and the far-field form (``far_from``) computes
    the same operator as the FFT: the two rewritten models agree end to end, also at lengths
    with keys in the far field on both sides."""
    _, _, model, _, _ = exported
    by_fft, by_far = (ir.from_proto(ir.to_proto(model)) for _ in range(2))
    rewrite(by_fft, "elu", 0)
    found = rewrite(by_far, "elu", 0, far=True)
    assert all(t.info["far_from"] == 91 for t in found)
    assert_same_outputs(by_fft, by_far, ((2, 16), (2, 250)))


@pytest.mark.parametrize("exported", ["bloom"], indirect=True)
def test_bloom_left_padding_and_exact_recipe(exported):
    """BLOOM's ALiBi positions are cumsum(attention_mask) - 1: with left padding they are
    j - (pads before), still Toeplitz up to a constant per row, so the exact-path RPE rewrite
    keeps the output; and ``kernelize.optimize(recipe="exact")`` keeps BLOOM within 1e-4."""
    _, module, model, _, _ = exported
    for site in attention_cores(model)[0]:
        found = match_toeplitz(site.inputs[3], model)
        assert "contiguous" in found.info["assumes"] and found.info["positions"] == "cumsum(attention_mask) - 1"
    original = ir.from_proto(ir.to_proto(model))
    rewritten = ir.from_proto(ir.to_proto(model))
    rewrite(rewritten, "elu", exact_below=10_000)
    feeds = feeds_of(3, 19, left=True)
    assert feeds["attention_mask"][-1, 0] == 0
    names = [o.name for o in original.graph.outputs][:1]
    before = outputs(original, feeds, names)[names[0]]
    after = outputs(rewritten, feeds, names)[names[0]]
    real = feeds["attention_mask"].astype(bool)  # a padded query's output is not compared
    error = float(np.max(np.abs(after.astype(np.float64) - before)[real]))
    print(f"bloom exact RPE rewrite, left padding: max abs error {error:.3g} on real tokens")
    assert error <= 1e-4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = kernelize.optimize(module, text_inputs(2, 16), recipe="exact", measure_latency=False)
    report = result.report
    attention = [s for s in report["sites"] if s["kind"] == "attention"]
    assert len(attention) == LAYERS, report["near_misses"]
    errors = report["end_to_end"]["outputs"]
    assert errors and all(e <= 1e-4 for e in errors.values()), errors
    print("bloom exact recipe end-to-end errors:", errors)


# -- refusals ----------------------------------------------------------------------------------
class _LearnedFullBias(torch.nn.Module):
    """Self-attention with a learned [H, n, n] bias: not Toeplitz (random entries)."""

    def __init__(self, n=12, hidden=HIDDEN, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (torch.nn.Linear(hidden, hidden) for _ in range(3))
        self.bias = torch.nn.Parameter(torch.randn(heads, n, n))

    def forward(self, x):
        b, s, hidden = x.shape

        def split(t):
            return t.view(b, s, self.heads, hidden // self.heads).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) * (hidden // self.heads) ** -0.5
        probs = torch.softmax(scores + self.bias, -1)
        return (probs @ split(self.v(x))).transpose(1, 2).reshape(b, s, hidden)


def test_non_toeplitz_bias_stays_exact_with_its_reason():
    torch.manual_seed(0)
    module = _LearnedFullBias().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = capture(module, (torch.randn(2, 12, HIDDEN),))
    cores, misses = attention_cores(model)
    assert len(cores) == 1, misses
    reason = match_toeplitz(cores[0].inputs[3], model)
    print("non-Toeplitz:", reason)
    assert isinstance(reason, str) and "not Toeplitz" in reason


def test_constant_toeplitz_bias_is_taken():
    n = 6
    c = np.random.default_rng(0).standard_normal((2, 2 * n - 1)).astype(np.float32)
    value = ir.Value(name="bias", const_value=ir.tensor(rpe.toeplitz(c, n)[None]))
    found = match_toeplitz(value, None)
    assert isinstance(found, Toeplitz) and found.source == "constant" and found.mask is None
    np.testing.assert_array_equal(found.rel_bias.producer().attributes["value"].value.numpy(), c)


def test_mask_alone_is_refused():
    mask = ir.Value(name="mask", shape=ir.Shape([2, 1, 1, 7]), type=ir.TensorType(ir.DataType.FLOAT))
    reason = match_toeplitz(mask, None)
    assert isinstance(reason, str) and "no term" in reason


def _cumsum_alibi_bias(mask_from_positions: bool, reverse: int = 0) -> ir.Value:
    """BLOOM's bias spelled by hand: Unsqueeze(slopes * ((cumsum(M) - 1) * M)[:, None], 2) plus
    a key-padding mask computed from M (or from another input)."""
    i64, f32 = ir.TensorType(ir.DataType.INT64), ir.TensorType(ir.DataType.FLOAT)
    m = ir.Value(name="M", shape=ir.Shape(["B", "n"]), type=i64)
    other = ir.Value(name="other_mask", shape=ir.Shape(["B", 1, 1, "n"]), type=f32)

    def const(name, array):
        return ir.Value(name=name, const_value=ir.tensor(np.asarray(array)))

    def op(op_type, inputs, shape, dtype=f32, **attributes):
        attrs = [ir.convenience.convert_attribute(k, v) for k, v in attributes.items()]
        node = ir.Node("", op_type, inputs, attributes=attrs, num_outputs=1)
        node.outputs[0].shape, node.outputs[0].type = ir.Shape(shape), dtype
        return node.outputs[0]

    cumsum = op("CumSum", [m, const("axis", np.int64(1))], ["B", "n"], i64, reverse=reverse)
    positions = op("Mul", [op("Sub", [cumsum, const("one", np.int64(1))], ["B", "n"], i64), m], ["B", "n"], i64)
    positions = op("Cast", [op("Unsqueeze", [positions, const("a1", [1])], ["B", 1, "n"], i64)], ["B", 1, "n"], to=1)
    slopes = const("slopes", np.array([[0.5], [0.25]], np.float32))
    alibi = op("Unsqueeze", [op("Mul", [slopes, positions], ["B", 2, "n"]), const("a2", [2])], ["B", 2, 1, "n"])
    if mask_from_positions:
        dropped = op("Sub", [const("one_f", np.float32(1)), op("Cast", [m], ["B", "n"], to=1)], ["B", "n"])
        padding = op("Unsqueeze", [op("Mul", [dropped, const("big", np.float32(-1e9))], ["B", "n"]),
                                   const("a12", [1, 2])], ["B", 1, 1, "n"])
    else:
        padding = other
    return op("Add", [alibi, padding], ["B", 2, 1, "n"])


def test_cumsum_alibi_needs_a_mask_from_the_same_positions():
    found = match_toeplitz(_cumsum_alibi_bias(True), None)
    assert isinstance(found, Toeplitz) and found.source == "alibi" and not found.causal, found
    assert found.info["slopes"] == [0.5, 0.25] and "contiguous" in found.info["assumes"]
    reason = match_toeplitz(_cumsum_alibi_bias(False), None)
    print("cumsum ALiBi, unrelated mask:", reason)
    assert isinstance(reason, str) and "no mask drops the keys" in reason
    reason = match_toeplitz(_cumsum_alibi_bias(True, reverse=1), None)
    assert isinstance(reason, str) and "reversed" in reason
