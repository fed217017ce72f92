"""Projection sites: ``x @ W (+ b)`` with a constant 2-D weight ``W`` (and an optional constant
bias Add). The one site input an operator reads is ``x``; the activations are the input's
calibration rows (padding dropped). Chosen projections may be refit in model order on the
activations of the model with the earlier choices applied (sequential calibration).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize import ops
from kernelize.graph import const_array, only_user, producer, rank
from kernelize.methods.base import CapturedProjection
from kernelize.patterns.site import NearMiss, Site
from kernelize.passes.site_kinds.base import ApproxSite, Scan, SiteKind, one_node

MAX_PROJECTION_TOKENS = 8192  # calibration tokens kept per projection site


class ProjectionKind(SiteKind):
    name = "projection"
    site_inputs = ("x",)
    reads = ("x",)
    sequential = True

    def find(self, scan: Scan):
        sites, misses = [], []
        for node in scan.nodes:
            result = match(node)
            if result is None:
                continue
            if isinstance(result, str):
                misses.append(NearMiss("projection", "projection", node.name or node.outputs[0].name, result))
                continue
            result.index = count = len(sites)
            layer = scan.layer_of(node)
            label = f"layer {layer} " if layer is not None else ""
            sites.append(ApproxSite(f"projection[{count}]", "projection", layer, result,
                                    name=f"{label}MatMul({result.info['in_features']}x{result.info['out_features']})"))
        return sites, misses

    def capture_names(self, s):
        return [s.site.inputs[0].name]

    def capture(self, s, values, mask):
        site = s.site
        x, rows = projection_tokens(values[site.inputs[0].name], mask)
        return {s.id: CapturedProjection(x, const_array(site.inputs[1]),
                                         const_array(site.inputs[2]) if site.inputs[2] is not None else None,
                                         rows_per_call=rows)}

    def shape(self, captured, batch=1):
        return {"tokens": captured.x.shape[0], "in_features": captured.weight.shape[0],
                "out_features": captured.weight.shape[1]}

    def exact_cost(self, shape):
        return float(shape["tokens"] * shape["in_features"] * shape["out_features"])

    def exact_output(self, captured):
        return captured.exact()

    def arrays(self, captured):
        return {"x": captured.x}

    def evaluate(self, captured, fitted):
        """One model call's rows (``rows_per_call``) at a time, as the model runs them."""
        return np.concatenate([fitted.reference(captured.x[part]) for part in captured.calls()]).astype(np.float64)

    def graph_inputs(self, s):
        return {"x": s.site.inputs[0]}

    def timing_key(self, captured):
        return tuple(captured.weight.shape)

    def timing_models(self, captured, fitted, seq):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((seq or 128, captured.weight.shape[0])).astype(np.float32)
        exact_model = _matmul_model(x, captured.weight, captured.bias)
        approx_model = one_node(fitted.op, [x], fitted.inputs, fitted.attrs)
        return exact_model, approx_model, {"in0": x}


def match(node: ir.Node) -> Site | str | None:
    """x @ W (+ b) with a constant 2-D W: a projection site (None: not a MatMul at all)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    x, w = node.inputs
    weight = const_array(w)
    if weight is None:
        if producer(w) is not None and producer(w).op_type == "Transpose" and rank(w) == 4:
            return None  # Q.K^T inside attention: not a projection
        if rank(w) == 2:
            return "projection weight is not a constant: left dense"
        return None
    if weight.ndim != 2 or rank(x) not in (2, 3):
        return None
    nodes, out, bias = [node], node.outputs[0], None
    add = only_user(out, "Add")
    if add is not None and not out.is_graph_output():
        b = const_array(add.inputs[1])
        if b is not None and b.ndim == 1 and b.shape[0] == weight.shape[1]:
            nodes, out, bias = [node, add], add.outputs[0], add.inputs[1]
    info = {"in_features": int(weight.shape[0]), "out_features": int(weight.shape[1]), "bias": bias is not None}
    return Site("projection", "projection", "", nodes, [x, w, bias], [out], {}, info)


def projection_tokens(x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, int | None]:
    """A projection input's calibration rows ``[tokens, in]`` (padding dropped; a seeded
    subsample of ``MAX_PROJECTION_TOKENS`` beyond that) and the rows one sample holds on
    average (None for a 2-D input)."""
    samples = x.shape[0] if x.ndim == 3 else None
    if x.ndim == 3 and mask is not None and mask.shape == x.shape[:2]:
        x = x[mask]
    x = x.reshape(-1, x.shape[-1])
    rows = max(len(x) // samples, 1) if samples else None
    if len(x) > MAX_PROJECTION_TOKENS:
        x = x[np.sort(np.random.default_rng(0).choice(len(x), MAX_PROJECTION_TOKENS, replace=False))]
    return x, rows


def _matmul_model(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> ir.Model:
    xv = ir.Value(name="in0", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x.shape))
    graph = ir.Graph([xv], [], nodes=[], opset_imports={"": 20}, name="dense")
    w = ops.base.add_initializer(graph, ir.Value(name="w", const_value=ir.tensor(weight.astype(np.float32))))
    node = ir.Node("", "MatMul", [xv, w], num_outputs=1)
    graph.append(node)
    out = node.outputs[0]
    if bias is not None:
        b = ops.base.add_initializer(graph, ir.Value(name="b", const_value=ir.tensor(bias.astype(np.float32))))
        add = ir.Node("", "Add", [out, b], num_outputs=1)
        graph.append(add)
        out = add.outputs[0]
    out.name = "out"
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10)
