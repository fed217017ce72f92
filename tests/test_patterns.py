"""Patterns and canonicalization on hand-built graphs: what is taken, what is refused and why."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kernelize
from kernelize.frontends.onnx import load
from kernelize.passes.canonicalize import canonicalize
from kernelize.passes.fuse import find_sites

RNG = np.random.default_rng(0)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _sdpa_model(perm=(0, 1, 3, 2), prescale=False, mask=None, extra_user=False):
    """Q, K, V [1, 4, 4, 4] (heads = seq = head_size = 4, so a wrong perm still type-checks)."""
    shape = [1, 4, 4, 4]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=list(perm))]
    inits = [_init("s", 0.5)]
    if prescale:
        nodes += [helper.make_node("Mul", ["q", "s"], ["qs"]), helper.make_node("Mul", ["kt", "s"], ["kts"]),
                  helper.make_node("MatMul", ["qs", "kts"], ["scores"])]
    else:
        nodes += [helper.make_node("MatMul", ["q", "kt"], ["raw"]), helper.make_node("Div", ["raw", "two"], ["scores"])]
        inits.append(_init("two", 2.0))
    last = "scores"
    if mask == "additive":
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, 4, 4]))
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["masked"]))
        last = "masked"
    elif mask == "boolean":
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 4, 4]))
        inits.append(_init("neg", -1e9))
        nodes.append(helper.make_node("Where", ["keep", "scores", "neg"], ["masked"]))
        last = "masked"
    nodes += [helper.make_node("Softmax", [last], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if extra_user:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, shape))
    return _model(nodes, inputs, outputs, inits)


def _sites(proto):
    model = load(proto)
    canonicalize(model)
    return find_sites(model)


@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("mask", [None, "additive", "boolean"])
def test_attention_found_and_exact(prescale, mask):
    proto = _sdpa_model(prescale=prescale, mask=mask)
    sites, _ = _sites(proto)
    (site,) = [s for s in sites if s.kind == "attention"]
    assert math.isclose(site.attrs["scale"], 0.25 if prescale else 0.5, rel_tol=1e-6)
    assert site.info["mask"] == (mask or "none")
    result = kernelize.optimize(proto, measure_latency=False)
    assert [s["rewrite"] for s in result.report["sites"]] == ["Attention"]
    assert max(result.report["end_to_end"]["outputs"].values()) <= 1e-5


def test_wrong_transpose_perm_is_a_near_miss():
    sites, misses = _sites(_sdpa_model(perm=(0, 2, 1, 3)))
    assert not sites
    assert any("perm" in m.reason and "[0, 2, 1, 3]" in m.reason for m in misses)


def test_interior_value_used_outside_is_a_near_miss():
    sites, misses = _sites(_sdpa_model(extra_user=True))
    assert not [s for s in sites if s.kind == "attention"]
    assert any(m.kind == "attention" for m in misses)


def test_canonicalize_removes_nan_guard_and_gemm():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
             helper.make_node("Softmax", ["g"], ["p"], axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "p"], ["y"])]
    proto = _model(nodes, [x], [y], [_init("w", RNG.standard_normal((3, 4))), _init("b", [1, 2, 3]),
                                      _init("zero", 0.0)])
    model = load(proto)
    counts = canonicalize(model)
    ops = [n.op_type for n in model.graph]
    assert counts.get("gemm_to_matmul") == 1 and counts.get("softmax_nan_guard") == 1
    assert "Gemm" not in ops and "IsNaN" not in ops and "Where" not in ops
    result = kernelize.optimize(proto, measure_latency=False)
    assert max(result.report["end_to_end"]["outputs"].values()) <= 1e-6


def _norm_model(kind):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])
    inits = [_init("axes", [-1]), _init("eps", 1e-5), _init("gamma", RNG.standard_normal(8)),
             _init("beta", RNG.standard_normal(8)), _init("two", 2.0)]
    inits[0] = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    if kind == "layer":
        nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"]),
                 helper.make_node("Sub", ["x", "m"], ["d"]),
                 helper.make_node("Pow", ["d", "two"], ["d2"]),
                 helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
                 helper.make_node("Add", ["var", "eps"], ["ve"]),
                 helper.make_node("Sqrt", ["ve"], ["std"]),
                 helper.make_node("Div", ["d", "std"], ["n"]),
                 helper.make_node("Mul", ["n", "gamma"], ["g"]),
                 helper.make_node("Add", ["g", "beta"], ["y"])]
    else:
        nodes = [helper.make_node("Pow", ["x", "two"], ["x2"]),
                 helper.make_node("ReduceMean", ["x2", "axes"], ["ms"]),
                 helper.make_node("Add", ["ms", "eps"], ["mse"]),
                 helper.make_node("Sqrt", ["mse"], ["rms"]),
                 helper.make_node("Reciprocal", ["rms"], ["inv"]),
                 helper.make_node("Mul", ["x", "inv"], ["n"]),
                 helper.make_node("Mul", ["gamma", "n"], ["y"])]
    return _model(nodes, [x], [y], inits)


@pytest.mark.parametrize("kind,rewrite", [("layer", "onnx::LayerNormalization"), ("rms", "RMSNorm")])
def test_decomposed_norms(kind, rewrite):
    result = kernelize.optimize(_norm_model(kind), measure_latency=False)
    assert [s["rewrite"] for s in result.report["sites"]] == [rewrite]
    assert max(result.report["end_to_end"]["outputs"].values()) <= 1e-5
    ops = {n.op_type for n in result.model.graph}
    assert "ReduceMean" not in ops


def test_inspect_reports_near_miss_reason():
    report = kernelize.inspect(_sdpa_model(perm=(0, 2, 1, 3)))
    assert report["summary"]["sites"] == {}
    assert report["near_misses"] and "perm" in report["near_misses"][0]["reason"]


def test_causal_sdpa_recognized_and_exact():
    import torch
    import torch.nn.functional as F

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    result = kernelize.optimize(Causal(), (q, k, v), measure_latency=False)
    (site,) = result.report["sites"]
    assert site["rewrite"] == "Attention" and site["mask"] == "causal"
    assert max(result.report["end_to_end"]["outputs"].values()) <= 1e-5


@pytest.mark.parametrize("second,expected", [([0, 2, 1], [[1, 2, 0]]), ([1, 0, 2], [])])
def test_canonicalize_composes_consecutive_transposes(second, expected):
    """Transpose(Transpose(x, [1, 0, 2]), q) becomes one Transpose (or none when the two
    cancel), with the same values."""
    from kernelize.backends import ort as ort_backend

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Transpose", ["t"], ["u"], perm=second),
             helper.make_node("Relu", ["u"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    before = ort_backend.run(ort_backend.session(proto), feeds)["y"]
    model = load(proto)
    canonicalize(model)
    perms = [list(n.attributes["perm"].as_ints()) for n in model.graph if n.op_type == "Transpose"]
    assert perms == expected
    after = ort_backend.run(ort_backend.session(model), feeds)["y"]
    np.testing.assert_array_equal(after, before)


def _legacy_head_size_model():
    """x [batch, seq, 8] divided by sqrt(x.size(-1)) the way the legacy exporter spells it
    (Shape -> Gather -> Cast -> Sqrt), then reshaped by x.size(1) of an intermediate value."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("Shape", ["h"], ["shape"]),
             helper.make_node("Gather", ["shape", "last"], ["size"], axis=0),
             helper.make_node("Cast", ["size"], ["size_f"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["size_f"], ["root"]),
             helper.make_node("Div", ["h", "root"], ["scaled"]),
             helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
             helper.make_node("Unsqueeze", ["seq", "axis0"], ["seq_1"]),
             helper.make_node("Concat", ["minus_one", "seq_1", "eight"], ["target"], axis=0),
             helper.make_node("Reshape", ["scaled", "target"], ["y"])]
    inits = [numpy_helper.from_array(np.array(-1, np.int64), "last"), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(np.array([8], np.int64), "eight")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def test_canonicalize_folds_static_dims_and_takes_sizes_from_the_inputs(tmp_path, monkeypatch):
    """A static dim read at run time becomes a constant (the scale is then a scalar Mul); a
    named dim of an intermediate is read from the graph input instead, so the intermediate
    keeps its one real user; values unchanged. Shape inference writes nothing to the
    working folder."""
    from kernelize.backends import ort as ort_backend

    monkeypatch.chdir(tmp_path)
    proto = _legacy_head_size_model()
    feeds = {"x": RNG.standard_normal((2, 5, 8)).astype(np.float32)}
    before = ort_backend.run(ort_backend.session(proto), feeds)["y"]
    model = load(proto)
    counts = canonicalize(model)
    assert counts.get("fold_static_shapes") and counts.get("shape_from_inputs"), counts
    ops = [n.op_type for n in model.graph]
    assert "Sqrt" not in ops and "Div" not in ops and "Mul" in ops, ops
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert [u.node.op_type for u in relu.outputs[0].uses()] == ["Mul"]
    after = ort_backend.run(ort_backend.session(model), feeds)["y"]
    np.testing.assert_allclose(after, before, rtol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_masking_where_before_an_added_mask_is_attention():
    """GPT-Neo: where(causal, Q·K^T, min) + padding mask -> one attention site, exact."""
    shape = [1, 4, 4, 4]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    inputs += [helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 4, 4]),
               helper.make_tensor_value_info("pad", TensorProto.FLOAT, [1, 1, 1, 4])]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Where", ["keep", "scores", "neg"], ["causal"]),
             helper.make_node("Add", ["causal", "pad"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"])]
    proto = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                   [_init("neg", np.finfo(np.float32).min)])
    sites, misses = _sites(proto)
    assert [s.kind for s in sites] == ["attention"], misses
    assert sites[0].info["bias_terms"] == 2
