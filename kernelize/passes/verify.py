"""Numerical verification: run two models on the same random inputs at several shapes and
measure how far apart their outputs (and chosen intermediate values) are."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.backends import ort as ort_backend

# (batch, sequence) shapes for exactness checks: batch 1 and > 1, odd lengths.
CHECK_SHAPES = ((1, 7), (2, 13), (3, 32))
EXACT_ATOL = 1e-4


def _embedding_rows(model: ir.Model, value: ir.Value) -> int | None:
    """If an int input indexes an embedding table, the table's row count."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1:
            table = node.inputs[0]
            if table.shape is not None and isinstance(table.shape[0], int):
                return table.shape[0]
    return None


def random_inputs(model: ir.Model, batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs following the model's signature: symbolic axis 0 = batch, others = seq.

    Token ids index within the embedding table; masks keep the first tokens and pad the
    tail of the second row (right padding); other ints are zero; floats are N(0, 1).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        dims = []
        for axis, d in enumerate(value.shape or []):
            dims.append(d if isinstance(d, int) else (batch if axis == 0 else seq))
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        name = value.name or ""
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif "mask" in name.lower():
            mask = np.ones(dims, dtype)
            if len(dims) == 2 and dims[0] > 1 and dims[1] > 2:
                mask[1, dims[1] - dims[1] // 3:] = 0
            feeds[name] = mask
        elif dtype == np.bool_:
            feeds[name] = np.ones(dims, dtype)
        else:
            rows = _embedding_rows(model, value)
            feeds[name] = rng.integers(0, rows, dims).astype(dtype) if rows else np.zeros(dims, dtype)
    return feeds


def compare(reference, candidate, ref_ir: ir.Model, shapes=CHECK_SHAPES, values=(), seed: int = 0):
    """Max abs difference per graph output and per named intermediate value over ``shapes``.

    ``reference`` and ``candidate`` are models (IR or proto) with the same inputs/outputs.
    Returns {"outputs": {name: err}, "values": {name: err}, "shapes": [...]}; "values"
    covers every requested name, graph outputs included.
    """
    outputs = [o.name for o in ref_ir.graph.outputs]
    values = [v for v in dict.fromkeys(values) if v and v not in outputs]
    ref = ort_backend.session(reference, extra_outputs=values)
    cand = ort_backend.session(candidate, extra_outputs=values)
    errors = {n: 0.0 for n in outputs}
    value_errors = {n: 0.0 for n in values}
    scale = {n: 0.0 for n in outputs}
    for i, (batch, seq) in enumerate(shapes):
        feeds = random_inputs(ref_ir, batch, seq, seed + i)
        a = ort_backend.run(ref, feeds, outputs + values)
        b = ort_backend.run(cand, feeds, outputs + values)
        for n in outputs:
            errors[n] = max(errors[n], _max_abs(a[n], b[n]))
            scale[n] = max(scale[n], float(np.max(np.abs(a[n]))) if a[n].size else 0.0)
        for n in values:
            value_errors[n] = max(value_errors[n], _max_abs(a[n], b[n]))
    value_errors.update({n: errors[n] for n in outputs})
    return {"outputs": errors, "values": value_errors, "output_scale": scale,
            "shapes": [list(s) for s in shapes]}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.dtype.kind not in "fc":
        return float(np.max(a != b)) if a.size else 0.0
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
    return float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
