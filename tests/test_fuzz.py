"""A bounded fuzz test (issue 13): valid models mutated (an input dropped or rewired, a dtype,
a shape or an attribute changed) go through ``kernelize optimize``, and random ``.npz`` inputs
through ``kernelize run`` on a valid artifact. Every case must end in exit 0 with a written,
verified artifact, or in one ``kernelize: error:`` line with exit 1 or 2 and no output
folder; never a traceback (an exception escaping the command) or a case over its deadline.
The number of cases tried is printed (``-s`` shows it)."""

from __future__ import annotations

import copy
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernelize.cli import main

BUDGET_S = 90  # for all cases of one test
CASE_S = 30  # for one case


def _attention_model() -> onnx.ModelProto:
    """x [batch, seq, 16] -> LayerNorm -> one head of attention on projections -> y."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.2, n)
            for n in ("wq", "wk", "wv")]
    init += [numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
             numpy_helper.from_array(np.array(0.25, np.float32), "scale")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["h", "wq"], ["q"]), helper.make_node("MatMul", ["h", "wk"], ["k"]),
             helper.make_node("MatMul", ["h", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mutate(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[onnx.ModelProto, str]:
    model = copy.deepcopy(model)
    graph = model.graph
    node = graph.node[int(rng.integers(len(graph.node)))]
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer] + [o for n in graph.node
                                                                                   for o in n.output]
    kind = ["drop", "rewire", "dtype", "shape", "attribute", "initializer_shape"][int(rng.integers(6))]
    if kind == "drop" and node.input:
        node.input[int(rng.integers(len(node.input)))] = ""
    elif kind == "rewire" and node.input:
        node.input[int(rng.integers(len(node.input)))] = names[int(rng.integers(len(names)))]
    elif kind == "dtype":
        target = graph.input[0].type.tensor_type if rng.random() < 0.5 else None
        dtype = [TensorProto.INT64, TensorProto.DOUBLE, TensorProto.BOOL, TensorProto.FLOAT16][int(rng.integers(4))]
        if target is not None:
            target.elem_type = dtype
        else:
            graph.initializer[int(rng.integers(len(graph.initializer)))].data_type = dtype
    elif kind == "shape":
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[int(rng.integers(len(dims)))].dim_value = int(rng.choice([0, 1, 3, 15, 17]))
    elif kind == "attribute" and node.attribute:
        attribute = node.attribute[int(rng.integers(len(node.attribute)))]
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = int(rng.choice([-4, -1, 0, 2, 7]))
        elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
            attribute.ints[int(rng.integers(len(attribute.ints)))] = int(rng.choice([0, 1, 2, 5]))
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = float(rng.choice([0.0, -1.0, float("nan")]))
    elif kind == "initializer_shape":
        tensor = graph.initializer[int(rng.integers(len(graph.initializer)))]
        if tensor.dims:
            tensor.dims[0] = int(rng.choice([1, 8, 32]))
    return model, f"{kind} at {node.op_type}"


def _check(args, capsys, out, what):
    start = time.perf_counter()
    code = main(args)  # an exception escaping here is the traceback the test forbids
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert elapsed < CASE_S, f"{what}: {elapsed:.0f} s"
    assert "Traceback" not in err, (what, err)
    if code == 0:
        return "ok"
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("kernelize: error:"), (what, code, err)
    assert out is None or not out.exists(), f"{what}: partial output {out}"
    return "refused"


@pytest.mark.slow
def test_mutated_models_end_cleanly(tmp_path, capsys):
    rng = np.random.default_rng(20261204)
    base = _attention_model()
    outcomes, start, case = {"ok": 0, "refused": 0}, time.perf_counter(), 0
    while time.perf_counter() - start < BUDGET_S and case < 150:
        model, what = _mutate(base, rng)
        path, out = tmp_path / f"m{case}.onnx", tmp_path / f"out{case}"
        path.write_bytes(model.SerializeToString())
        result = _check(["optimize", str(path), "-o", str(out), "-q"], capsys, out, what)
        if result == "ok":
            assert (out / "manifest.json").exists(), what
        outcomes[result] += 1
        case += 1
    print(f"fuzz: {case} mutated models, {outcomes}")
    assert case >= 10 and outcomes["refused"] > 0


@pytest.mark.slow
def test_random_inputs_to_an_artifact_end_cleanly(tmp_path, capsys):
    path, art = tmp_path / "model.onnx", tmp_path / "art"
    path.write_bytes(_attention_model().SerializeToString())
    assert main(["optimize", str(path), "-o", str(art), "-q"]) == 0
    capsys.readouterr()
    rng = np.random.default_rng(7)
    makers = [
        lambda: {"x": rng.standard_normal((1, 5, 16)).astype(np.float32)},  # valid
        lambda: {"x": rng.standard_normal((2, 3, 15)).astype(np.float32)},  # wrong hidden size
        lambda: {"x": rng.integers(0, 9, (1, 5, 16))},  # wrong dtype
        lambda: {"y": rng.standard_normal((1, 5, 16)).astype(np.float32)},  # wrong name
        lambda: {"x": rng.standard_normal((1, 5, 16)).astype(np.float32), "extra": np.zeros(3)},
        lambda: {"x": np.array([{"a": 1}], dtype=object)},  # an object array
        lambda: {"x": rng.standard_normal((16,)).astype(np.float32)},  # wrong rank
        lambda: {"x": np.full((1, 5, 16), np.nan, np.float32)},
    ]
    outcomes = {"ok": 0, "refused": 0}
    for i, make in enumerate(makers * 2):
        inputs = tmp_path / f"in{i}.npz"
        np.savez(inputs, **make())
        outcomes[_check(["run", str(art), "--input", str(inputs), "--output", str(tmp_path / f"y{i}.npz")],
                        capsys, None, f"inputs {i % len(makers)}")] += 1
    print(f"fuzz: {2 * len(makers)} input files, {outcomes}")
    assert outcomes["ok"] >= 2 and outcomes["refused"] >= 2
