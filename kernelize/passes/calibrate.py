"""Calibration data: the inputs approximate rewrites are fitted and judged on, and the
activations captured at their sites.

Calibration inputs come from the user (an ``.npz`` with one array per model input, samples
along axis 0, or text tokenized by an object with ``inputs_for(model) -> (arrays,
description)``: :class:`kernelize.frontends.text.TextCalibration`) or are synthesized from the model's signature (random token ids, full
masks), which the report states. They are split into a fitting half and a held-out half.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from kernelize.backends import ort as ort_backend
from kernelize.errors import KernelizeError, UsageError
from kernelize.passes import verify

DEFAULT_SAMPLES = 16  # synthesized calibration samples
DEFAULT_SEQ = 128  # their sequence length
RUN_BATCH = 1  # samples per ONNX Runtime call: one, as a deployed model at batch 1 runs (dynamic
# activation quantization takes its range from the whole call, so batching would change the results)


@dataclasses.dataclass
class CalibrationSet:
    """Model inputs with samples along axis 0, split into a fitting and a held-out part."""

    feeds: dict[str, np.ndarray]
    source: str  # "user: <path>" or "synthesized: ..."
    fit: slice
    held_out: slice

    @property
    def samples(self) -> int:
        return len(next(iter(self.feeds.values())))

    @property
    def seq(self) -> int | None:
        shapes = [a.shape for a in self.feeds.values() if a.ndim >= 2]
        return int(shapes[0][1]) if shapes else None

    @property
    def fingerprint(self) -> str:
        """Identifies the calibration inputs (for caches of fitted candidates)."""
        import hashlib

        digest = hashlib.sha1()
        for name in sorted(self.feeds):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.feeds[name]).tobytes())
        return digest.hexdigest()[:16]

    def part(self, which: slice) -> dict[str, np.ndarray]:
        return {k: v[which] for k, v in self.feeds.items()}

    def batches(self, which: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
        feeds = self.feeds if which is None else self.part(which)
        n = len(next(iter(feeds.values())))
        for start in range(0, n, RUN_BATCH):
            yield {k: v[start:start + RUN_BATCH] for k, v in feeds.items()}

    def token_mask(self, which: slice | None = None) -> np.ndarray | None:
        """[N, S] bool of real (not padding) tokens, from an input named like a mask."""
        for name, array in (self.part(which) if which is not None else self.feeds).items():
            if "mask" in name.lower() and array.ndim == 2:
                return array != 0
        return None


def load(model: ir.Model, calib: str | os.PathLike | dict | None, samples: int = DEFAULT_SAMPLES,
         seq: int = DEFAULT_SEQ) -> CalibrationSet:
    """The calibration set for ``model``: a user's ``.npz`` / dict of arrays, or synthesized."""
    names = [v.name for v in model.graph.inputs]
    if calib is None:
        feeds, seq = _synthesize(model, samples, seq)
        source = f"synthesized from the model's signature: {samples} random samples at seq {seq}"
    else:
        if hasattr(calib, "inputs_for"):  # text, tokenized for this model
            feeds, source = calib.inputs_for(model)
        elif isinstance(calib, dict):
            feeds, source = {k: np.asarray(v) for k, v in calib.items()}, "user: arrays"
        else:
            feeds, source = _read_npz(Path(calib)), f"user: {calib}"
        missing = [n for n in names if n not in feeds]
        if missing:
            raise UsageError(f"calibration inputs lack {', '.join(missing)} (the model takes {', '.join(names)})")
        feeds = {n: feeds[n] for n in names}
        counts = {len(a) for a in feeds.values()}
        if len(counts) != 1:
            raise UsageError("calibration arrays have different sample counts along axis 0")
        _check_signature(model, feeds)
        _check_token_ids(model, feeds)
    n = len(next(iter(feeds.values())))
    if n < 2:
        raise UsageError(f"calibration needs at least 2 samples (got {n}): half fit, half held out")
    half = (n + 1) // 2
    return CalibrationSet(feeds, source, slice(0, half), slice(half, n))


def _synthesize(model: ir.Model, samples: int, seq: int) -> tuple[dict[str, np.ndarray], int]:
    """Random inputs at ``seq``, or at the longest shorter length the model runs at (a model
    with a short position table fails at 128: :func:`verify.accepted_length`)."""
    names = [v.name for v in model.graph.inputs]
    try:
        length = verify.accepted_length(ort_backend.session(model), model, seq)
    except KernelizeError as err:
        raise UsageError(f"{err}; pass calibration inputs with --calib") from None
    halves = [verify.random_inputs(model, max(samples // 2, 1), length, seed=s) for s in (101, 202)]
    for half in halves:  # synthesized masks keep every token (no padding rows)
        for k, a in half.items():
            if "mask" in k.lower():
                half[k] = np.ones_like(a)
    return {k: np.concatenate([h[k] for h in halves]) for k in names}, length


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"calibration file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # noqa: BLE001 - numpy raises several types for bad files
        raise UsageError(f"cannot read calibration file {path}: {err}") from None


def _check_signature(model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    for value in model.graph.inputs:
        array = feeds[value.name]
        dims = list(value.shape or [])
        if array.ndim != len(dims):
            raise UsageError(f"calibration input {value.name} has rank {array.ndim}, the model takes {len(dims)}")
        for axis, (got, want) in enumerate(zip(array.shape, dims)):
            if isinstance(want, int) and axis > 0 and got != want:
                raise UsageError(f"calibration input {value.name} has size {got} on axis {axis}, "
                                 f"the model takes {want}")
        dtype = value.dtype.numpy() if value.dtype is not None else None
        if dtype is not None and array.dtype != dtype:
            if np.can_cast(array.dtype, dtype, casting="same_kind"):
                feeds[value.name] = array.astype(dtype)
            else:
                raise UsageError(f"calibration input {value.name} is {array.dtype}, the model takes {dtype}")


def _check_token_ids(model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """Token ids past the model's embedding table (a tokenizer of another model) stop here,
    in one line, instead of inside ONNX Runtime's Gather."""
    for value in model.graph.inputs:
        rows = verify.embedding_rows(model, value)
        array = feeds[value.name]
        if rows and array.dtype.kind in "iu" and array.size and int(array.max()) >= rows:
            raise UsageError(f"calibration input {value.name} has ids up to {int(array.max())}, the model's "
                             f"embedding table has {rows} rows (a tokenizer of another model?)")


def run(model, calib: CalibrationSet, which: slice | None = None, names=(), threads: int = 2) -> dict:
    """Run ``model`` (IR, proto or bytes) over the calibration samples in batches; return
    each graph output and each named intermediate value, concatenated along axis 0."""
    sess = ort_backend.session(model, threads=threads, extra_outputs=list(names))
    wanted = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    sizes = []  # samples per call
    for feeds in calib.batches(which):
        sizes.append(len(next(iter(feeds.values()))))
        for name, array in ort_backend.run(sess, feeds, wanted).items():
            parts[name].append(array)
    return {n: _concat(p, sizes) for n, p in parts.items()}


def _concat(parts: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Calls along axis 0; a value that does not depend on the batch (its first axis is not
    the call's sample count: a broadcast mask, a relative-position table) is kept once."""
    per_call = all(p.ndim and p.shape[0] == n for p, n in zip(parts, sizes))
    if not per_call and all(p.shape == parts[0].shape and np.array_equal(p, parts[0]) for p in parts[1:]):
        return parts[0]
    return np.concatenate(parts)
