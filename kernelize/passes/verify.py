"""Numerical verification: run two models on the same random inputs at several shapes and
measure how far apart their outputs (and chosen intermediate values) are."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.backends import ort as ort_backend
from kernelize.errors import KernelizeError

# (batch, sequence) shapes for exactness checks: batch 1 and > 1, odd lengths.
CHECK_SHAPES = ((1, 7), (2, 13), (3, 32))
EXACT_ATOL = 1e-4


def embedding_rows(model: ir.Model, value: ir.Value) -> int | None:
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
            rows = embedding_rows(model, value)
            feeds[name] = rng.integers(0, rows, dims).astype(dtype) if rows else np.zeros(dims, dtype)
    return feeds


LONGEST_SEARCHED = 4096  # synthesized lengths tried upward when short ones do not run (attention memory grows
# with its square; wav2vec2's convolutions need 400 samples)


def _error_at(sess, signature: ir.Model, batch: int, length: int) -> str | None:
    """Why the session does not run on :func:`random_inputs` at (batch, length), or None."""
    try:
        ort_backend.run(sess, random_inputs(signature, batch, length))
    except KernelizeError as err:
        return str(err)
    return None


def accepted_length(sess, signature: ir.Model, seq: int, batch: int = 1) -> int:
    """The length nearest ``seq`` at which the session runs on :func:`random_inputs`: the
    longest up to ``seq`` (a position-embedding table bounds it: RoBERTa's positions start
    after the padding index, so a 514-row table takes 512 tokens), else the shortest above it
    (a convolution stack needs a receptive field of audio samples). Raises KernelizeError,
    with ONNX Runtime's reason, when no length runs."""
    first = _error_at(sess, signature, batch, seq)
    if first is None:
        return seq
    runs, fails = 0, seq  # the longest length known to run (0: none yet), the shortest known to fail
    while fails - runs > 1:
        mid = (runs + fails) // 2
        runs, fails = (mid, fails) if _error_at(sess, signature, batch, mid) is None else (runs, mid)
    if runs:
        return runs
    longer = seq * 2
    while longer <= LONGEST_SEARCHED and _error_at(sess, signature, batch, longer) is not None:
        longer *= 2
    if longer > LONGEST_SEARCHED:
        raise KernelizeError(f"the model does not run on synthesized inputs at batch {batch}, length 1 to "
                             f"{LONGEST_SEARCHED}: {first}")
    fails, runs = longer // 2, longer  # now the shortest that runs, above seq
    while runs - fails > 1:
        mid = (runs + fails) // 2
        runs, fails = (mid, fails) if _error_at(sess, signature, batch, mid) is None else (runs, mid)
    return runs


def accepted_shapes(model, signature: ir.Model, shapes=CHECK_SHAPES) -> list[tuple[int, int]]:
    """``shapes`` moved to lengths the model runs at: when the shortest does not run, every
    length is shifted up by the same amount (wav2vec2's convolutions need 400 samples, and
    the checks keep their distinct lengths); when the longest does not, every length is
    capped at the longest that runs."""
    sess = ort_backend.session(model)
    (batch, shortest), (top_batch, longest) = shapes[0], shapes[-1]
    if _error_at(sess, signature, batch, shortest) is not None:
        shift = accepted_length(sess, signature, shortest, batch) - shortest
        shapes = [(b, s + shift) for b, s in shapes]
        longest += shift
    cap = accepted_length(sess, signature, longest, top_batch)
    return [(b, min(s, cap)) for b, s in shapes]


def run_at_shapes(model, signature: ir.Model, names=(), shapes=CHECK_SHAPES, seed: int = 0) -> list[dict]:
    """Run ``model`` (IR, proto or bytes) on random inputs following ``signature`` at each
    shape; return, per shape, the graph outputs and the named intermediate values."""
    outputs = [o.name for o in signature.graph.outputs]
    wanted = outputs + [n for n in dict.fromkeys(names) if n and n not in outputs]
    sess = ort_backend.session(model, extra_outputs=wanted[len(outputs):])
    return [ort_backend.run(sess, random_inputs(signature, batch, seq, seed + i), wanted)
            for i, (batch, seq) in enumerate(shapes)]


def errors(reference: list[dict], candidate: list[dict], names) -> dict[str, float]:
    """Max abs difference per name over all shapes of two :func:`run_at_shapes` results."""
    return {n: max(_max_abs(a[n], b[n]) for a, b in zip(reference, candidate)) for n in names}


def scale(runs: list[dict], names) -> float:
    """Largest magnitude among the named values (sets the tolerance of a comparison)."""
    return max((float(np.max(np.abs(r[n]))) for r in runs for n in names if r[n].size), default=0.0)


def compare(reference, candidate, signature: ir.Model, shapes=CHECK_SHAPES, seed: int = 0) -> dict:
    """Max abs difference per graph output of two models over ``shapes``.

    Returns {"outputs": {name: err}, "output_scale": float, "shapes": [...]}.
    """
    outputs = [o.name for o in signature.graph.outputs]
    ref = run_at_shapes(reference, signature, shapes=shapes, seed=seed)
    cand = run_at_shapes(candidate, signature, shapes=shapes, seed=seed)
    return {"outputs": errors(ref, cand, outputs), "output_scale": scale(ref, outputs),
            "shapes": [list(s) for s in shapes]}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.dtype.kind not in "fc":
        return float(np.max(a != b)) if a.size else 0.0
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
    return float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
