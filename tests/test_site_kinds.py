"""Site kinds as strategies: the approximate pass and the selection never branch on the kind
of a site, every method's operator reads inputs its kind provides, and a kind registered from
outside is found, captured and fitted by the pass unchanged."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernelize.methods.base import METHODS, Fitted, Method
from kernelize.passes import approximate, calibrate
from kernelize.passes.site_kinds import KINDS, ApproxSite, SiteKind
from kernelize.patterns.site import Site

PASSES = Path(__file__).resolve().parent.parent / "kernelize" / "passes"


def _is_dtype(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "dtype"  # ``array.dtype.kind``: NumPy's, not a site's


def _kind_comparisons(path: Path) -> list[str]:
    """``x.kind == "..."``, ``kind != "..."``, ``kind in ("...", ...)`` and RPE special cases
    (the operator name, the ``rpe:`` prefix) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [s.attr if isinstance(s, ast.Attribute) and not _is_dtype(s.value) else getattr(s, "id", None)
                     for s in sides]
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides) or any(
                isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(isinstance(e, ast.Constant) for e in s.elts)
                for s in sides)
            if "kind" in names and literal:
                found.append(f"line {node.lineno}: compares a kind with a literal")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value == "RPEAttention" or node.value.startswith("rpe:")):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


@pytest.mark.parametrize("name", ["approximate.py", "select.py"])
def test_the_pass_has_no_kind_branch(name):
    assert _kind_comparisons(PASSES / name) == []


def test_the_check_sees_a_kind_branch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('if s.kind == "attention":\n    pass\nif kind in ("projection",):\n    pass\n'
                     'ok = fitted.op == "RPEAttention"\nfloats = ref.dtype.kind == "f"\n')
    assert len(_kind_comparisons(probe)) == 3


def test_methods_read_what_their_kind_provides():
    assert list(KINDS)[:2] == ["attention", "projection"]
    for kind in KINDS.values():
        assert set(kind.reads) <= set(kind.site_inputs), kind.name
    for name, method in METHODS.items():
        kind = KINDS[method.kind]
        assert set(method.reads or kind.reads) <= set(kind.site_inputs), name
    assert METHODS["rpe:elu"].reads == ("query", "key", "value", "rel_bias", "mask")


def _attention_and_projection() -> ir.Model:
    """A bare attention core on q, k, v [batch, 2, seq, 4] with an additive mask, and a
    projection x [batch, seq, 8] @ W + b beside it."""
    rng = np.random.default_rng(0)
    heads = ["q", "k", "v"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, "seq", 4]) for n in heads]
    inputs += [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "seq"]),
               helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "half"], ["scaled"]),
             helper.make_node("Add", ["scaled", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"]),
             helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["z"])]
    weights = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
               numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _calib(n=4, seq=6):
    rng = np.random.default_rng(1)
    feeds = {k: rng.standard_normal((n, 2, seq, 4)).astype(np.float32) for k in ("q", "k", "v")}
    mask = np.zeros((n, 1, 1, seq), np.float32)
    mask[1, ..., -2:] = -1e4
    feeds.update(mask=mask, x=rng.standard_normal((n, seq, 8)).astype(np.float32))
    return feeds


def test_every_site_input_is_an_array_and_a_graph_value():
    model = _attention_and_projection()
    sites, _ = approximate.find(model)
    assert [s.kind for s in sites] == ["attention", "projection"]
    calib = calibrate.load(model, _calib())
    captured = approximate.capture(model, sites, calib)
    for s in sites:
        kind = KINDS[s.kind]
        assert set(kind.arrays(captured[s.id])) == set(kind.site_inputs)
        assert set(kind.graph_inputs(s)) == set(kind.site_inputs)
        exact = kind.exact_output(captured[s.id])
        assert np.all(np.isfinite(exact)) and exact.shape[0] == captured[s.id].count


# -- a kind from outside: Relu sites, "approximated" by a leaky floor --------------------------
@dataclasses.dataclass
class CapturedRelu:
    x: np.ndarray

    @property
    def count(self) -> int:
        return len(self.x)

    def take(self, index) -> "CapturedRelu":
        return CapturedRelu(self.x[index])


@pytest.fixture
def relu_kind():
    """A site kind and its one method that exist only while the test runs (defining them
    registers them)."""

    class ReluKind(SiteKind):
        name = "test_relu"
        site_inputs = reads = ("x",)

        def find(self, scan):
            sites = []
            for node in scan.nodes:
                if node.op_type == "Relu":
                    site = Site("test_relu", "test_relu", "", [node], [node.inputs[0]], [node.outputs[0]], {}, {},
                                index=len(sites))
                    sites.append(ApproxSite(f"test_relu[{len(sites)}]", "test_relu", scan.layer_of(node), site))
            return sites, []

        def capture_names(self, s):
            return [s.site.inputs[0].name]

        def capture(self, s, values, mask):
            return {s.id: CapturedRelu(values[s.site.inputs[0].name])}

        def shape(self, captured, batch=1):
            return {"elements": int(captured.x[0].size)}

        def exact_cost(self, shape):
            return float(shape["elements"])

        def exact_output(self, captured):
            return np.maximum(captured.x, 0.0).astype(np.float64)

        def arrays(self, captured):
            return {"x": captured.x}

        def evaluate(self, captured, fitted):
            return np.maximum(captured.x, fitted.attrs["slope"] * captured.x).astype(np.float64)

        def graph_inputs(self, s):
            return {"x": s.site.inputs[0]}

        def timing_key(self, captured):
            return ()

        def timing_models(self, captured, fitted, seq):
            raise NotImplementedError

    class LeakyMethod(Method):
        name = "test_relu:leaky"
        kind = "test_relu"

        def fit(self, captured, slope=0.1, **_):
            return Fitted(self.name, "LeakyRelu", {"slope": slope})

        def cost(self, fitted, shape):
            return float(shape["elements"]) / 2

    try:
        yield KINDS["test_relu"]
    finally:
        KINDS.pop("test_relu", None)
        METHODS.pop("test_relu:leaky", None)


def test_a_new_kind_goes_through_the_pass_unchanged(relu_kind):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 20)])
    model = ir.from_proto(proto)
    assert approximate.parse_rewrites(["test_relu=leaky"]) == {"test_relu": ["test_relu:leaky"]}
    sites, _ = approximate.find(model, kinds=("test_relu",))
    assert [s.id for s in sites] == ["test_relu[0]"]
    feeds = {"x": np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32)}
    captured = approximate.capture(model, sites, calibrate.load(model, feeds))
    [candidate] = approximate.fit_candidates(sites[0], captured, ["test_relu:leaky"], {"test_relu:leaky": {"slope": 0.0}})
    assert candidate.fitted.attrs == {"slope": 0.0} and candidate.site_error == 0.0
    assert candidate.estimated_speedup == 2.0
    [leaky] = approximate.fit_candidates(sites[0], captured, ["test_relu:leaky"])
    assert leaky.site_error > 0
