"""``kernelize.optimize`` and ``kernelize.inspect``: the flow from a model to an artifact.

``optimize`` runs its recipe's passes (:mod:`kernelize.pipeline`); the artifact is written by
:mod:`kernelize.deploy.export`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from kernelize import pipeline
from kernelize.deploy.export import write_artifact, write_tvm_artifact  # noqa: F401 - importable from here
from kernelize.passes.canonicalize import canonicalize
from kernelize.passes.fuse import fuse
from kernelize.pipeline import LATENCY_SHAPE, load_model  # noqa: F401 - importable from here

RECIPES = tuple(pipeline.RECIPES)  # exact; fast: approximate attention; edge: approximate projections


@dataclasses.dataclass
class Result:
    model: ir.Model  # the optimized model, lowered for its backend
    path: Path | None  # the artifact folder (None when no output_dir was given)
    report: dict


def inspect(model: Any, example_inputs: Any = None, *, calib: Any = None, recipe: str | None = None,
            rewrites: list[str] | None = None, layers: str | None = None, metric: Any = None,
            calibration_cache: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Sites found (after canonicalization) and near misses, without rewriting.

    With ``calib`` (or a ``recipe`` other than exact, or ``rewrites``), also every candidate
    approximate rewrite per site: its site error, end-to-end error and estimated and
    measured speed on the calibration inputs (synthesized when ``calib`` is None).
    """
    if hasattr(calib, "check"):  # text: passages there and a tokenizer known, before loading the model
        calib.check(model)
    ir_model, name = pipeline.load_model(model, example_inputs)
    canonicalize(ir_model)
    candidates = None
    if calib is not None or (recipe not in (None, "exact")) or rewrites:
        from kernelize.passes import approximate, select

        if recipe is not None:
            pipeline.check_choices(recipe, "ort")
        _, candidates = select.approximate_model(
            ir_model, recipe or "fast", calib=calib, rewrites=approximate.parse_rewrites(rewrites) or None,
            layers=approximate.parse_layers(layers), metric=metric, select=False,
            calibration_cache=calibration_cache, say=progress or (lambda m: None))
        ir_model = ir.from_proto(ir.to_proto(ir_model))
    sites, misses = fuse(ir_model)
    report = pipeline.sites_report(name, sites, misses)
    if candidates is not None:
        report["approximate"] = candidates
    return report


def optimize(model: Any, example_inputs: Any = None, *, recipe: str = "exact", backend: str = "ort",
             target: str = "cpu", shape: dict | None = None, tune_trials: int = 0,
             tuning_db: str | os.PathLike | None = None,
             output_dir: str | os.PathLike | None = None, force: bool = False,
             measure_latency: bool = True, latency_runs: int = 20, threads: int = 1,
             calib: Any = None, max_error: float | None = None, rewrites: list[str] | None = None,
             layers: str | None = None, metric: Any = None, method_options: dict | None = None,
             calibration_cache: dict | None = None, progress: Callable[[str], None] | None = None) -> Result:
    """Capture, canonicalize, fuse, verify, lower and (optionally) save ``model``: the passes
    of :data:`kernelize.pipeline.RECIPES` for ``recipe``.

    ``backend="ort"`` lowers to ONNX Runtime kernels (target ``cpu``); ``backend="tvm"``
    compiles with Apache TVM for ``target`` (``cpu``, ``cuda``, ``arm64`` or a TVM target as
    JSON), specialized to ``shape`` ({"batch": B, "seq": S}, default 1 x 128), with
    ``tune_trials`` MetaSchedule trials recorded in ``tuning_db``.
    ``calibration_cache`` (a dict) lets several calls on the same model and calibration
    inputs fit and measure each approximate candidate once.

    ``recipe="fast"`` (approximate attention) or ``"edge"`` (approximate projections), or
    ``rewrites`` such as ``["attention=linear:hedgehog"]``, calibrate on ``calib`` (an
    ``.npz`` path, a dict of arrays with samples on axis 0, or text:
    :class:`kernelize.TextCalibration`, tokenized with the model folder's tokenizer;
    synthesized from the signature when None) and keep the fastest rewrites whose end-to-end error, by ``metric``
    ("relative_l2", "cosine" or a function ``(reference, candidate, feeds) -> float`` of
    output dicts), stays within ``max_error``; ``layers`` ("3-5") limits the sites.

    Returns the optimized model, the artifact path and the report. Raises
    :class:`KernelizeError` for bad input and when an exact rewrite fails verification.
    """
    options = pipeline.Options(
        recipe=recipe, backend=backend, target=target, shape=shape, tune_trials=tune_trials, tuning_db=tuning_db,
        output_dir=output_dir, force=force, measure_latency=measure_latency, latency_runs=latency_runs,
        threads=threads, calib=calib, max_error=max_error, rewrites=rewrites, layers=layers, metric=metric,
        method_options=method_options, calibration_cache=calibration_cache)
    context = pipeline.Context(model, example_inputs, options, progress)
    context = pipeline.run(pipeline.passes_for(options), context)
    return Result(context.model, context.path, context.report)
