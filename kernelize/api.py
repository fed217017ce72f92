"""``kernelize.optimize`` and ``kernelize.inspect``: the flow from a model to an artifact."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_ir as ir

from kernelize.backends import BACKENDS
from kernelize.backends import ort as ort_backend
from kernelize.errors import KernelizeError, UsageError
from kernelize.frontends import onnx as onnx_frontend
from kernelize.passes import verify
from kernelize.passes.canonicalize import canonicalize
from kernelize.passes.fuse import find_sites, fuse
from kernelize.patterns.registry import custom_rewrites

RECIPES = ("exact", "fast", "edge")  # fast: approximate attention; edge: approximate projections
LATENCY_SHAPE = (1, 128)  # (batch, sequence) for the before/after latency


@dataclasses.dataclass
class Result:
    model: ir.Model  # the optimized model, lowered for its backend
    path: Path | None  # the artifact folder (None when no output_dir was given)
    report: dict


def load_model(model: Any, example_inputs: Any = None) -> tuple[ir.Model, str]:
    """Any supported input -> (IR model, a short description)."""
    if isinstance(model, ir.Model):
        return onnx_frontend.load(ir.to_proto(model)), model.graph.name or "<ir model>"
    if isinstance(model, (onnx.ModelProto, bytes, bytearray)):
        return onnx_frontend.load(model), "<in-memory ONNX>"
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if not text.endswith(".onnx") and ":" in text and not os.path.exists(text):
            from kernelize.frontends import torch as torch_frontend

            module, inputs = torch_frontend.load_builder(text)
            return torch_frontend.capture(module, inputs), text
        return onnx_frontend.load(text), text
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise UsageError("a torch.nn.Module needs example_inputs")
        from kernelize.frontends import torch as torch_frontend

        return torch_frontend.capture(model, example_inputs), type(model).__name__
    raise UsageError(f"cannot optimize a {type(model).__name__}: pass an ONNX path/bytes/ModelProto, "
                     "a torch.nn.Module with example_inputs, or 'package.module:function'")


def _check_choices(recipe: str, backend: str) -> None:
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r} (choose from: {', '.join(RECIPES)})")
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from: {', '.join(BACKENDS)})")


def inspect(model: Any, example_inputs: Any = None, *, calib: Any = None, recipe: str | None = None,
            rewrites: list[str] | None = None, layers: str | None = None, metric: Any = None,
            calibration_cache: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Sites found (after canonicalization) and near misses, without rewriting.

    With ``calib`` (or a ``recipe`` other than exact, or ``rewrites``), also every candidate
    approximate rewrite per site: its site error, end-to-end error and estimated and
    measured speed on the calibration inputs (synthesized when ``calib`` is None).
    """
    ir_model, name = load_model(model, example_inputs)
    canonicalize(ir_model)
    candidates = None
    if calib is not None or (recipe not in (None, "exact")) or rewrites:
        from kernelize.passes import approximate, select

        if recipe is not None:
            _check_choices(recipe, "ort")
        _, candidates = select.approximate_model(
            ir_model, recipe or "fast", calib=calib, rewrites=approximate.parse_rewrites(rewrites) or None,
            layers=approximate.parse_layers(layers), metric=metric, select=False,
            calibration_cache=calibration_cache, say=progress or (lambda m: None))
        ir_model = ir.from_proto(ir.to_proto(ir_model))
    sites, misses = fuse(ir_model)
    report = _sites_report(name, sites, misses)
    if candidates is not None:
        report["approximate"] = candidates
    return report


def _sites_report(name, sites, misses) -> dict:
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return {"model": name, "sites": [s.describe() for s in sites],
            "near_misses": [m.describe() for m in misses],
            "summary": {"sites": counts}}


def optimize(model: Any, example_inputs: Any = None, *, recipe: str = "exact", backend: str = "ort",
             target: str = "cpu", shape: dict | None = None, tune_trials: int = 0,
             tuning_db: str | os.PathLike | None = None,
             output_dir: str | os.PathLike | None = None, force: bool = False,
             measure_latency: bool = True, latency_runs: int = 20, threads: int = 1,
             calib: Any = None, max_error: float | None = None, rewrites: list[str] | None = None,
             layers: str | None = None, metric: Any = None, method_options: dict | None = None,
             calibration_cache: dict | None = None, progress: Callable[[str], None] | None = None) -> Result:
    """Capture, canonicalize, fuse, verify, lower and (optionally) save ``model``.

    ``backend="ort"`` lowers to ONNX Runtime kernels (target ``cpu``); ``backend="tvm"``
    compiles with Apache TVM for ``target`` (``cpu``, ``cuda``, ``arm64`` or a TVM target as
    JSON), specialized to ``shape`` ({"batch": B, "seq": S}, default 1 x 128), with
    ``tune_trials`` MetaSchedule trials recorded in ``tuning_db``.
    ``calibration_cache`` (a dict) lets several calls on the same model and calibration
    inputs fit and measure each approximate candidate once.

    ``recipe="fast"`` (approximate attention) or ``"edge"`` (approximate projections), or
    ``rewrites`` such as ``["attention=linear:hedgehog"]``, calibrate on ``calib`` (an
    ``.npz`` path or a dict of arrays with samples on axis 0; synthesized from the signature
    when None) and keep the fastest rewrites whose end-to-end error, by ``metric``
    ("relative_l2", "cosine" or a function ``(reference, candidate, feeds) -> float`` of
    output dicts), stays within ``max_error``; ``layers`` ("3-5") limits the sites.

    Returns the optimized model, the artifact path and the report. Raises
    :class:`KernelizeError` for bad input and when an exact rewrite fails verification.
    """
    _check_choices(recipe, backend)
    approximating = recipe != "exact" or bool(rewrites)
    from kernelize.passes import approximate, select

    # bad specifications fail before any work, whatever the recipe
    rewrite_spec = approximate.parse_rewrites(rewrites) or None
    layer_set = approximate.parse_layers(layers)
    select.resolve_metric(metric)
    if max_error is not None and not (isinstance(max_error, (int, float)) and math.isfinite(max_error)
                                      and max_error >= 0):
        raise UsageError(f"--max-error must be a number >= 0 (got {max_error})")
    if isinstance(calib, (str, os.PathLike)) and not Path(calib).is_file():
        raise UsageError(f"calibration file not found: {calib}")
    if backend == "ort" and target not in ("cpu", "arm64"):
        raise UsageError(f"backend ort supports targets cpu and arm64 (got {target!r}); use --backend tvm")
    if backend == "tvm":
        from kernelize.backends import targets as targets_mod

        targets_mod.resolve(target)  # an unknown target fails before any work
    say = progress or (lambda message: None)
    out_path = Path(output_dir) if output_dir is not None else None
    if out_path is not None:  # fail before any work
        from kernelize.deploy.artifact import output_parent

        output_parent(out_path, force, inputs=[model] if isinstance(model, (str, os.PathLike)) and
                      os.path.exists(model) else [])
    timings: dict[str, float] = {}

    def step(label):
        say(label)
        return time.perf_counter()

    t = step("loading model")
    ir_model, name = load_model(model, example_inputs)
    original = ir.to_proto(ir_model)
    timings["capture_s"] = time.perf_counter() - t

    t = step("canonicalizing")
    canon_counts = canonicalize(ir_model)
    timings["canonicalize_s"] = time.perf_counter() - t
    custom = []
    rewrites = custom_rewrites()
    if rewrites:  # before the built-in fusions, so that their results can be fused further
        t = step(f"applying {len(rewrites)} custom rewrite(s)")
        ir_model, custom = _apply_custom(ir_model, rewrites)
        timings["custom_s"] = time.perf_counter() - t
    approx_section = None
    if approximating:
        t = step(f"approximate rewrites ({', '.join(rewrites) if rewrites else 'recipe ' + recipe})")
        ir_model, approx_section = select.approximate_model(
            ir_model, recipe, calib=calib, max_error=max_error, rewrites=rewrite_spec, layers=layer_set,
            metric=metric, method_options=method_options, calibration_cache=calibration_cache, threads=threads,
            backend=backend, target=target, say=say)
        timings["approximate_s"] = time.perf_counter() - t
    canonical = ir.to_proto(ir_model)  # the reference for the per-site checks
    t = step("fusing")
    sites, misses = fuse(ir_model)
    timings["fuse_s"] = time.perf_counter() - t
    timings["optimize_s"] = timings["canonicalize_s"] + timings["fuse_s"]

    site_values = [s.outputs[0].name for s in sites if s.nodes]
    fused = ir.to_proto(ir_model) if site_values or backend == "tvm" else None
    built = None
    if backend == "tvm":
        from kernelize.backends import tvm as tvm_backend

        t = step(f"compiling with TVM for {target}")
        built = tvm_backend.build(fused, target, shape=shape, tune_trials=tune_trials, tuning_db=tuning_db,
                                  progress=say)
        lowered = {"tvm_schedules": _count(built.schedules.values())}
    else:
        t = step(f"lowering for {backend}")
        lowered = ort_backend.lower(ir_model)
        ir.passes.common.RemoveUnusedNodesPass()(ir_model)
    timings["lower_s"] = time.perf_counter() - t

    t = step("verifying against the original")
    report_sites, end_to_end, worst, tolerance = _verify(original, canonical, fused, ir_model, sites, site_values)
    timings["verify_s"] = time.perf_counter() - t
    # The built-in rewrites are exact: checked against the model they started from (custom
    # rewrites declared approximate are applied before and report their own error).
    broken = [n for n, e in end_to_end["outputs"].items() if not math.isfinite(e)]
    if broken:  # NaN/inf (or a wrong shape) where the original model gives finite values
        raise KernelizeError(f"the optimized model gives non-finite values or wrong shapes in {', '.join(broken)} "
                             "where the original is finite; nothing written (this is a kernelize bug, please "
                             "report it with the model)")
    limit = _rounding_limit(tolerance, approx_section, end_to_end)
    if not worst <= limit:
        raise KernelizeError(f"exact rewrites changed the outputs by {worst:.3g} (tolerance {limit:.3g}); "
                             "this is a kernelize bug, please report it with the model")

    report = _sites_report(name, sites, misses)
    report.update(recipe=recipe, backend=backend, canonicalization=canon_counts,
                  lowered=lowered, custom_rewrites=custom, end_to_end=end_to_end,
                  tolerance=tolerance, timings=timings)
    if worst > tolerance:
        report["end_to_end"]["note"] = (f"the fused model differs from the unfused one by {worst:.3g}, more than "
                                        f"float rounding ({tolerance:.3g}) and less than the approximation's own "
                                        f"drift ({limit:.3g}): quantized activations round differently")
    report["sites"] = report_sites
    if approx_section is not None:
        report["approximate"] = approx_section

    batch, seq = (shape or {}).get("batch", LATENCY_SHAPE[0]), (shape or {}).get("seq", LATENCY_SHAPE[1])
    if built is not None:
        report["tvm"] = {"target": built.target.name, "target_json": built.target.config, "shapes": built.shapes,
                         "schedules": built.schedules, "tuning": built.tuning, "timings": built.timings}
        if built.target.runs_here:
            t = step("verifying the TVM build against ONNX Runtime")
            drift = tvm_backend.compare_with_onnx(built, canonical)
            report["tvm"]["max_abs_error_vs_ort"] = drift
            worst = max(drift.values(), default=0.0)
            limit = _rounding_limit(tolerance, approx_section, end_to_end)
            if not worst <= limit:
                raise KernelizeError(f"the TVM build differs from ONNX Runtime by {worst:.3g} "
                                     f"(tolerance {limit:.3g}); this is a kernelize bug")
            if worst > tolerance:
                report["tvm"]["note"] = (f"differs from ONNX Runtime by {worst:.3g}, more than float rounding "
                                         f"({tolerance:.3g}) and less than the approximation's own drift "
                                         f"({limit:.3g}): quantized activations round differently")
            timings["verify_tvm_s"] = time.perf_counter() - t
        else:
            report["tvm"]["max_abs_error_vs_ort"] = f"not run: {built.target.name} code cannot run here"

    if measure_latency and (built is None or built.target.runs_here):
        t = step("measuring latency")
        reference = ort_backend.session(original, threads)
        requested = seq
        if built is None and not shape:  # the default length, bounded by what the model takes
            seq = verify.accepted_length(reference, ir_model, seq, batch)
        feeds = verify.random_inputs(ir_model, batch, seq)
        before = ort_backend.latency_ms(reference, feeds, latency_runs)
        if built is None:
            after = ort_backend.latency_ms(ort_backend.session(ir_model, threads), feeds, latency_runs)
        else:
            after = built.runner(threads=threads).latency_ms(feeds, latency_runs)
        report["latency"] = {"batch": batch, "seq": seq, "threads": threads, "before": before, "after": after,
                             "speedup": before["median_ms"] / after["median_ms"],
                             "after_engine": "tvm" if built is not None else "onnxruntime"}
        if seq != requested:
            report["latency"]["note"] = f"measured at {seq} tokens: the model does not run at {requested}"
        if report["latency"]["speedup"] < 1.0:
            report["latency"]["warning"] = (f"warning: the optimized model is slower than the original "
                                            f"({report['latency']['speedup']:.2f}x at batch {batch}, seq {seq})")
            say(report["latency"]["warning"])
        timings["latency_s"] = time.perf_counter() - t

    path = None
    if out_path is not None:
        step(f"writing {out_path}")
        if built is None:
            path = write_artifact(ir_model, report, out_path, force, target=target)
        else:
            path = write_tvm_artifact(built, ir_model, report, out_path, force)
    return Result(ir_model, path, report)


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def write_tvm_artifact(built, model: ir.Model, report: dict, out_path: Path, force: bool = False) -> Path:
    """The compiled library (``model.so``; ``model.tar`` of objects when the target's cross
    linker is missing), manifest.json and the report, written atomically."""
    import shutil

    from kernelize.deploy import artifact

    out_path = Path(out_path)
    parent = artifact.output_parent(out_path, force)
    linker = built.target.linker
    name = "model.tar" if linker is not None and shutil.which(linker) is None else "model.so"
    _, outputs = artifact.signature_from_onnx(model)
    manifest = {"backend": "tvm", "entry": "main", "model": name, "inputs": built.inputs, "outputs": outputs,
                "target": artifact.describe_target("tvm", preset=built.target.name,
                                                   string=built.target.describe())}
    if name == "model.tar":
        report.setdefault("notes", []).append(f"{linker} not found: object files (model.tar) to link on the device")
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.lib.", dir=parent) as tmp:
        library = built.export_library(Path(tmp) / name)
        return artifact.write(out_path, {name: library}, manifest, report, force)


def _rounding_limit(tolerance: float, approx_section: dict | None, end_to_end: dict) -> float:
    """How far two exact forms of a model with approximate rewrites may differ. Operators that
    quantize activations turn float rounding differences (~1e-6, from fusion or another
    backend) into whole quantization steps; the forms must still agree better than the
    approximation agrees with the original model."""
    if approx_section is None or not approx_section.get("chosen"):
        return tolerance
    return max(tolerance, max(end_to_end["outputs"].values(), default=0.0))


def _verify(original, canonical, fused, final: ir.Model, sites, site_values):
    """Run the original, the canonical (pre-fusion), the fused and the final model once each
    at the check shapes. Each site's output is compared in the final model; a value a kernel
    absorbed (a bias folded into the next one) is compared in the fused model instead.

    Returns (site entries, end-to-end errors, worst error of the built-in rewrites, tolerance).
    """
    outputs = [o.name for o in final.graph.outputs]
    present = {v.name for node in final.graph for v in node.outputs}
    kept = [n for n in site_values if n in present]
    absorbed = [n for n in site_values if n not in present]
    shapes = verify.accepted_shapes(original, final)
    runs_original = verify.run_at_shapes(original, final, shapes=shapes)
    runs_canonical = verify.run_at_shapes(canonical, final, site_values, shapes=shapes)
    runs_final = verify.run_at_shapes(final, final, kept, shapes=shapes)
    site_errors = verify.errors(runs_canonical, runs_final, kept)
    if absorbed:
        site_errors.update(verify.errors(runs_canonical, verify.run_at_shapes(fused, final, absorbed, shapes=shapes),
                                         absorbed))
    end_to_end = {"outputs": verify.errors(runs_original, runs_final, outputs),
                  "output_scale": verify.scale(runs_original, outputs),
                  "shapes": [list(s) for s in shapes]}
    entries = []
    for s in sites:
        entry = s.describe()
        if s.nodes:
            entry["max_abs_error"] = site_errors[entry["output"]]
            if entry["output"] in absorbed:
                entry["error_measured"] = "before lowering (value absorbed by the next kernel)"
        entries.append(entry)
    builtin = verify.errors(runs_canonical, runs_final, outputs)
    worst = max(builtin.values(), default=0.0)
    tolerance = verify.EXACT_ATOL * max(1.0, verify.scale(runs_canonical, outputs))
    return entries, end_to_end, worst, tolerance


def _apply_custom(model: ir.Model, rewrites) -> tuple[ir.Model, list[dict]]:
    """Apply each custom rewrite to a copy; keep the copy unless the rewrite claims to be
    exact and changes the outputs. Returns the resulting model and one entry per rewrite."""
    from onnxscript.rewriter.pattern import RewriteRuleSet

    results = []
    for rewrite in rewrites:
        before = ir.to_proto(model)
        candidate = ir.from_proto(before)
        count = RewriteRuleSet([_once_per_node(rewrite.rule(), candidate)]).apply_to_model(candidate)
        ir.passes.common.RemoveUnusedNodesPass()(candidate)
        entry = {"name": rewrite.name, "exact": rewrite.exact, "sites": int(count or 0)}
        if not count:
            entry.update(status="no match", detail="pattern not found")
            results.append(entry)
            continue
        check = verify.compare(before, candidate, model)
        err = max(check["outputs"].values(), default=0.0)
        entry["max_abs_error"] = err
        if rewrite.exact and not err <= verify.EXACT_ATOL * max(1.0, check["output_scale"]):
            entry.update(status="rejected",
                         detail=f"declared exact but changed the outputs by {err:.3g}; not applied")
        else:
            model = candidate
            entry.update(status="applied", detail=f"{count} site(s), max abs error {err:.3g}")
        results.append(entry)
    return model, results


def _once_per_node(rule, model: ir.Model):
    """``rule`` tried only at the nodes ``model`` has now: onnxscript visits the nodes a
    replacement inserts too, so a replacement that contains its own pattern (Erf -> Erf)
    would rewrite forever. Each original node is rewritten at most once."""
    original = {node for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    for function in model.functions.values():
        original.update(function)
    try_rewrite = rule.try_rewrite

    def bounded(model, graph_or_function, node, *args, **kwargs):
        return try_rewrite(model, graph_or_function, node, *args, **kwargs) if node in original else None

    rule.try_rewrite = bounded
    return rule


def write_artifact(model: ir.Model, report: dict, out_path: Path, force: bool = False,
                   target: str | dict | None = None) -> Path:
    """Write the artifact folder through :mod:`kernelize.deploy.artifact`: model.onnx (+
    model.onnx.data past 1.8 GB), report.json, report.txt and manifest.json (signature,
    target, versions, rewrites with their errors, SHA-256 of every file), atomically."""
    from kernelize.deploy import artifact

    out_path = Path(out_path)
    parent = artifact.output_parent(out_path, force)
    inputs, outputs = artifact.signature_from_onnx(model)
    for entry, value in zip(inputs, model.graph.inputs):  # random token ids stay inside the table
        rows = verify.embedding_rows(model, value)
        if rows:
            entry["range"] = [0, int(rows)]
    proto = ir.to_proto(model)
    manifest = {"backend": "ort", "inputs": inputs, "outputs": outputs, "target": target,
                "opsets": {op.domain or "ai.onnx": op.version for op in proto.opset_import}}
    if target == "arm64":  # ONNX Runtime's mobile format beside the ONNX file (portable: no arch)
        data = proto.SerializeToString()
        with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.ort.", dir=parent) as tmp:
            mobile = Path(tmp) / "model.ort"
            ort_backend.save_ort_format(data, mobile)
            manifest["target"] = artifact.describe_target("ort", preset="arm64")
            manifest["mobile_model"] = "model.ort"
            return artifact.write(out_path, {"model.onnx": data, "model.ort": mobile}, manifest, report, force)
    if proto.ByteSize() <= 1_800_000_000:
        return artifact.write(out_path, {"model.onnx": proto.SerializeToString()}, manifest, report, force)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.model.", dir=parent) as tmp:
        onnx.save_model(proto, Path(tmp) / "model.onnx", save_as_external_data=True,
                        location="model.onnx.data", all_tensors_to_one_file=True)
        files = {"model.onnx": Path(tmp) / "model.onnx", "model.onnx.data": Path(tmp) / "model.onnx.data"}
        return artifact.write(out_path, files, manifest, report, force)
