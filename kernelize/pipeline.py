"""The compilation pipeline behind ``kernelize.optimize``: named passes over one context.

A pass is a function that takes the :class:`Context` and returns it; a recipe is the list of
passes it runs (:data:`RECIPES`). Each pass reads what the earlier ones left in the context
(the model, the reference models, the options), adds its report sections and timings, and
says what it is doing through ``ctx.progress``. A pass that does not apply (no custom
rewrites registered, no TVM build to check, latency off, no output folder) returns the
context unchanged.

The passes call into the layers below: frontends (capture), passes (canonicalize, fuse,
approximate, verify), backends (lower, build) and deploy (the artifact). This module is
above them all, beside :mod:`kernelize.api`, which is why it is not under ``passes/``: those
are model-to-model transforms that know nothing of backends, timings or output folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_ir as ir

from kernelize import progress as progress_mod
from kernelize.backends import BACKENDS
from kernelize.errors import KernelizeError, UsageError

LATENCY_SHAPE = (1, 128)  # (batch, sequence) for the before/after latency
# The report's sections in the order report.json lists them (a section a run does not
# produce is left out; one not named here goes after these).
REPORT_ORDER = ("model", "sites", "near_misses", "summary", "recipe", "backend", "canonicalization", "lowered",
                "custom_rewrites", "end_to_end", "tolerance", "timings", "approximate", "tvm", "latency", "size")


@dataclasses.dataclass
class Options:
    """What ``optimize`` was asked to do (its keyword arguments; see its docstring)."""

    recipe: str = "exact"
    backend: str = "ort"
    target: str = "cpu"
    shape: dict | None = None
    tune_trials: int = 0
    tuning_db: str | os.PathLike | None = None
    output_dir: str | os.PathLike | None = None
    force: bool = False
    measure_latency: bool = True
    latency_runs: int = 20
    threads: int = 1
    calib: Any = None
    max_error: float | None = None
    rewrites: list[str] | None = None
    layers: str | None = None
    metric: Any = None
    method_options: dict | None = None
    calibration_cache: dict | None = None

    @property
    def approximating(self) -> bool:
        return self.recipe != "exact" or bool(self.rewrites)


@dataclasses.dataclass
class Context:
    """One compilation: the input, the options, and what the passes have made of them."""

    source: Any  # what the user passed: a path, bytes, a ModelProto, an IR model, a torch module
    example_inputs: Any
    options: Options
    progress: Callable[[str], None] | None = None
    model: ir.Model | None = None  # the model being compiled (rewritten in place or replaced by the passes)
    name: str = ""  # a short description of the source
    original: onnx.ModelProto | None = None  # as captured: the reference for the end-to-end check
    canonical: onnx.ModelProto | None = None  # before fusion: the reference for the per-site checks
    fused: onnx.ModelProto | None = None  # fused, before lowering (what TVM compiles; absorbed values)
    sites: list = dataclasses.field(default_factory=list)
    misses: list = dataclasses.field(default_factory=list)
    built: Any = None  # the TVM build (backend tvm)
    report: dict = dataclasses.field(default_factory=dict)  # report sections, by name
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    output: Path | None = None  # the output folder asked for
    path: Path | None = None  # the artifact written
    # parsed options
    rewrite_spec: dict | None = None
    layer_set: set[int] | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    @contextlib.contextmanager
    def step(self, label: str, timing: str | None = None):
        """Say ``label``; with ``timing``, record the block's seconds under that name."""
        self.say(label)
        started = time.perf_counter()
        yield
        if timing is not None:
            self.timings[timing] = time.perf_counter() - started

    @property
    def approximate_section(self) -> dict | None:
        return self.report.get("approximate")


Pass = Callable[[Context], Context]


# ----------------------------------------------------------------------------- input

def check_choices(recipe: str, backend: str) -> None:
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r} (choose from: {', '.join(RECIPES)})")
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from: {', '.join(BACKENDS)})")


def load_model(model: Any, example_inputs: Any = None) -> tuple[ir.Model, str]:
    """Any supported input -> (IR model, a short description)."""
    from kernelize.frontends import onnx as onnx_frontend

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
        from kernelize.frontends import huggingface

        if huggingface.is_model_folder(text):  # a Hugging Face model folder
            return huggingface.load_folder(text)
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
    raise UsageError(f"cannot optimize a {type(model).__name__}: pass an ONNX path/bytes/ModelProto, a Hugging "
                     "Face model folder, a torch.nn.Module with example_inputs, or 'package.module:function'")


def sites_report(name, sites, misses) -> dict:
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return {"model": name, "sites": [s.describe() for s in sites],
            "near_misses": [m.describe() for m in misses],
            "summary": {"sites": counts}}


# ----------------------------------------------------------------------------- passes

def check_options(ctx: Context) -> Context:
    """Every option checked before any work, whatever the recipe."""
    from kernelize.passes import approximate, select

    o = ctx.options
    ctx.rewrite_spec = approximate.parse_rewrites(o.rewrites) or None
    ctx.layer_set = approximate.parse_layers(o.layers)
    select.resolve_metric(o.metric)
    if o.max_error is not None and not (isinstance(o.max_error, (int, float)) and math.isfinite(o.max_error)
                                        and o.max_error >= 0):
        raise UsageError(f"--max-error must be a number >= 0 (got {o.max_error})")
    if isinstance(o.calib, (str, os.PathLike)) and not Path(o.calib).is_file():
        raise UsageError(f"calibration file not found: {o.calib}")
    if hasattr(o.calib, "check"):  # text: passages there and a tokenizer known, before any loading
        o.calib.check(ctx.source)
    if o.backend == "ort" and o.target not in ("cpu", "arm64"):
        raise UsageError(f"backend ort supports targets cpu and arm64 (got {o.target!r}); use --backend tvm")
    if o.backend == "tvm":
        from kernelize.backends import targets as targets_mod

        targets_mod.resolve(o.target)  # an unknown target fails before any work
    ctx.output = Path(o.output_dir) if o.output_dir is not None else None
    if ctx.output is not None:
        from kernelize.deploy.artifact import output_parent

        source = ctx.source
        output_parent(ctx.output, o.force, inputs=[source] if isinstance(source, (str, os.PathLike)) and
                      os.path.exists(source) else [])
    return ctx


def capture(ctx: Context) -> Context:
    """The input as an IR model; a copy of it is the reference for the end-to-end check."""
    with ctx.step("loading model", "capture_s"):
        ctx.model, ctx.name = load_model(ctx.source, ctx.example_inputs)
        ctx.original = ir.to_proto(ctx.model)
    return ctx


def canonicalize(ctx: Context) -> Context:
    """One form per computation (:mod:`kernelize.passes.canonicalize`), so that the patterns match."""
    from kernelize.passes.canonicalize import canonicalize as canonicalize_model

    with ctx.step("canonicalizing", "canonicalize_s"):
        ctx.report["canonicalization"] = canonicalize_model(ctx.model)
    return ctx


def custom_rewrites(ctx: Context) -> Context:
    """The registered custom rewrites, before the built-in fusions so that their results can be
    fused further; one declared exact that changes the outputs is not applied."""
    from kernelize.patterns.registry import custom_rewrites as registered

    ctx.report["custom_rewrites"] = []
    rewrites = registered()
    if rewrites:
        with ctx.step(f"applying {len(rewrites)} custom rewrite(s)", "custom_s"):
            ctx.model, ctx.report["custom_rewrites"] = apply_custom(ctx.model, rewrites)
    return ctx


def approximate(ctx: Context) -> Context:
    """Calibrate the approximate rewrites and keep the ones within the error budget."""
    from kernelize.passes import select

    o = ctx.options
    with ctx.step(f"approximate rewrites (recipe {o.recipe})", "approximate_s"):
        ctx.model, ctx.report["approximate"] = select.approximate_model(
            ctx.model, o.recipe, calib=o.calib, max_error=o.max_error, rewrites=ctx.rewrite_spec,
            layers=ctx.layer_set, metric=o.metric, method_options=o.method_options,
            calibration_cache=o.calibration_cache, threads=o.threads, backend=o.backend, target=o.target,
            say=ctx.progress or _silent)
    return ctx


def fuse(ctx: Context) -> Context:
    """The built-in patterns replaced by their fused operators."""
    from kernelize.passes.fuse import fuse as fuse_model

    ctx.canonical = ir.to_proto(ctx.model)  # the reference for the per-site checks
    with ctx.step("fusing", "fuse_s"):
        ctx.sites, ctx.misses = fuse_model(ctx.model)
    ctx.timings["optimize_s"] = ctx.timings["canonicalize_s"] + ctx.timings["fuse_s"]
    ctx.report.update(sites_report(ctx.name, ctx.sites, ctx.misses))
    if _site_values(ctx) or ctx.options.backend == "tvm":
        ctx.fused = ir.to_proto(ctx.model)
    return ctx


def lower(ctx: Context) -> Context:
    """ONNX Runtime kernels (backend ort) or a TVM build of the fused model (backend tvm)."""
    o = ctx.options
    if o.backend == "tvm":
        from kernelize.backends import tvm as tvm_backend

        with ctx.step(f"compiling with TVM for {o.target}", "lower_s"):
            ctx.built = tvm_backend.build(ctx.fused, o.target, shape=o.shape, tune_trials=o.tune_trials,
                                          tuning_db=o.tuning_db, progress=ctx.progress)
            ctx.report["lowered"] = {"tvm_schedules": _count(ctx.built.schedules.values())}
    else:
        from kernelize.backends import ort as ort_backend

        with ctx.step(f"lowering for {o.backend}", "lower_s"):
            ctx.report["lowered"] = ort_backend.lower(ctx.model)
            ir.passes.common.RemoveUnusedNodesPass()(ctx.model)
    return ctx


def verify(ctx: Context) -> Context:
    """Every site and the outputs checked against the original; stops when the built-in
    rewrites, which are exact, changed the outputs."""
    with ctx.step("verifying against the original", "verify_s"):
        report_sites, end_to_end, worst, tolerance = check_sites(ctx.original, ctx.canonical, ctx.fused, ctx.model,
                                                                 ctx.sites, _site_values(ctx))
    # Custom rewrites declared approximate are applied before and report their own error.
    broken = [n for n, e in end_to_end["outputs"].items() if not math.isfinite(e)]
    if broken:  # NaN/inf (or a wrong shape) where the original model gives finite values
        raise KernelizeError(f"the optimized model gives non-finite values or wrong shapes in {', '.join(broken)} "
                             "where the original is finite; nothing written (this is a kernelize bug, please "
                             "report it with the model)")
    limit = rounding_limit(tolerance, ctx.approximate_section, end_to_end)
    if not worst <= limit:
        raise KernelizeError(f"exact rewrites changed the outputs by {worst:.3g} (tolerance {limit:.3g}); "
                             "this is a kernelize bug, please report it with the model")
    if worst > tolerance:
        end_to_end["note"] = (f"the fused model differs from the unfused one by {worst:.3g}, more than "
                              f"float rounding ({tolerance:.3g}) and less than the approximation's own "
                              f"drift ({limit:.3g}): quantized activations round differently")
    ctx.report.update(sites=report_sites, end_to_end=end_to_end, tolerance=tolerance)
    return ctx


def verify_tvm(ctx: Context) -> Context:
    """The TVM build's section, and its outputs against ONNX Runtime's where its code runs here."""
    built = ctx.built
    if built is None:
        return ctx
    section = ctx.report["tvm"] = {"target": built.target.name, "target_json": built.target.config,
                                   "shapes": built.shapes, "schedules": built.schedules, "tuning": built.tuning,
                                   "timings": built.timings}
    if not built.target.runs_here:
        section["max_abs_error_vs_ort"] = f"not run: {built.target.name} code cannot run here"
        return ctx
    from kernelize.backends import tvm as tvm_backend

    with ctx.step("verifying the TVM build against ONNX Runtime", "verify_tvm_s"):
        drift = tvm_backend.compare_with_onnx(built, ctx.canonical)
        section["max_abs_error_vs_ort"] = drift
        worst = max(drift.values(), default=0.0)
        tolerance = ctx.report["tolerance"]
        limit = rounding_limit(tolerance, ctx.approximate_section, ctx.report["end_to_end"])
        if not worst <= limit:
            raise KernelizeError(f"the TVM build differs from ONNX Runtime by {worst:.3g} "
                                 f"(tolerance {limit:.3g}); this is a kernelize bug")
        if worst > tolerance:
            section["note"] = (f"differs from ONNX Runtime by {worst:.3g}, more than float rounding "
                               f"({tolerance:.3g}) and less than the approximation's own drift "
                               f"({limit:.3g}): quantized activations round differently")
    return ctx


def latency(ctx: Context) -> Context:
    """Before/after latency at the build shape (default 1 x 128, bounded by what the model takes)."""
    o, built = ctx.options, ctx.built
    if not o.measure_latency or (built is not None and not built.target.runs_here):
        return ctx
    from kernelize.backends import ort as ort_backend
    from kernelize.passes import verify as verify_mod

    batch, seq = (o.shape or {}).get("batch", LATENCY_SHAPE[0]), (o.shape or {}).get("seq", LATENCY_SHAPE[1])
    with ctx.step("measuring latency", "latency_s"):
        reference = ort_backend.session(ctx.original, o.threads)
        requested = seq
        if built is None and not o.shape:  # the default length, bounded by what the model takes
            seq = verify_mod.accepted_length(reference, ctx.model, seq, batch)
        feeds = verify_mod.random_inputs(ctx.model, batch, seq)
        with progress_mod.bar(ctx.progress, 2 * o.latency_runs, "latency runs (before, after)", "run") as bar:
            tick = progress_mod.ticker(bar)
            before = ort_backend.latency_ms(reference, feeds, o.latency_runs, tick=tick)
            if built is None:
                after = ort_backend.latency_ms(ort_backend.session(ctx.model, o.threads), feeds, o.latency_runs,
                                               tick=tick)
            else:
                after = built.runner(threads=o.threads).latency_ms(feeds, o.latency_runs, tick=tick)
        section = ctx.report["latency"] = {
            "batch": batch, "seq": seq, "threads": o.threads, "before": before, "after": after,
            "speedup": before["median_ms"] / after["median_ms"],
            "after_engine": "tvm" if built is not None else "onnxruntime"}
        if seq != requested:
            section["note"] = f"measured at {seq} tokens: the model does not run at {requested}"
        if section["speedup"] < 1.0:
            section["warning"] = (f"warning: the optimized model is slower than the original "
                                  f"({section['speedup']:.2f}x at batch {batch}, seq {seq})")
            ctx.say(section["warning"])
    return ctx


def report(ctx: Context) -> Context:
    """The report's sections in their order (:data:`REPORT_ORDER`)."""
    o = ctx.options
    ctx.report["size"] = {"original_onnx_bytes": ctx.original.ByteSize(),
                          "optimized_onnx_bytes": ir.to_proto(ctx.model).ByteSize()}
    sections = {**ctx.report, "recipe": o.recipe, "backend": o.backend, "timings": ctx.timings}
    ctx.report = {key: sections.pop(key) for key in REPORT_ORDER if key in sections}
    ctx.report.update(sections)
    return ctx


def write(ctx: Context) -> Context:
    """The artifact folder (:mod:`kernelize.deploy.export`), when an output folder was named."""
    if ctx.output is None:
        return ctx
    from kernelize.deploy import export

    ctx.say(f"writing {ctx.output}")
    if ctx.built is None:
        ctx.path = export.write_artifact(ctx.model, ctx.report, ctx.output, ctx.options.force,
                                         target=ctx.options.target)
    else:
        ctx.path = export.write_tvm_artifact(ctx.built, ctx.model, ctx.report, ctx.output, ctx.options.force)
    return ctx


# ----------------------------------------------------------------------------- recipes

EXACT: tuple[Pass, ...] = (check_options, capture, canonicalize, custom_rewrites, fuse, lower, verify, verify_tvm,
                           latency, report, write)
APPROXIMATE: tuple[Pass, ...] = (check_options, capture, canonicalize, custom_rewrites, approximate, fuse, lower,
                                 verify, verify_tvm, latency, report, write)
# fast: approximate attention (and int8 projections); edge: approximate projections
RECIPES: dict[str, tuple[Pass, ...]] = {"exact": EXACT, "fast": APPROXIMATE, "edge": APPROXIMATE}


def passes_for(options: Options) -> tuple[Pass, ...]:
    """The recipe's passes; rewrites named with ``rewrites`` are approximate whatever the recipe."""
    check_choices(options.recipe, options.backend)
    return APPROXIMATE if options.approximating else RECIPES[options.recipe]


def run(passes, ctx: Context) -> Context:
    for step in passes:
        ctx = step(ctx)
    return ctx


# ----------------------------------------------------------------------------- helpers

def _silent(message: str) -> None:
    pass


def _site_values(ctx: Context) -> list[str]:
    return [s.outputs[0].name for s in ctx.sites if s.nodes]


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def rounding_limit(tolerance: float, approx_section: dict | None, end_to_end: dict) -> float:
    """How far two exact forms of a model with approximate rewrites may differ. Operators that
    quantize activations turn float rounding differences (~1e-6, from fusion or another
    backend) into whole quantization steps; the forms must still agree better than the
    approximation agrees with the original model."""
    if approx_section is None or not approx_section.get("chosen"):
        return tolerance
    return max(tolerance, max(end_to_end["outputs"].values(), default=0.0))


def check_sites(original, canonical, fused, final: ir.Model, sites, site_values):
    """Run the original, the canonical (pre-fusion), the fused and the final model once each
    at the check shapes. Each site's output is compared in the final model; a value a kernel
    absorbed (a bias folded into the next one) is compared in the fused model instead.

    Returns (site entries, end-to-end errors, worst error of the built-in rewrites, tolerance).
    """
    from kernelize.passes import verify as verify_mod

    outputs = [o.name for o in final.graph.outputs]
    present = {v.name for node in final.graph for v in node.outputs}
    kept = [n for n in site_values if n in present]
    absorbed = [n for n in site_values if n not in present]
    shapes = verify_mod.accepted_shapes(original, final)
    runs_original = verify_mod.run_at_shapes(original, final, shapes=shapes)
    runs_canonical = verify_mod.run_at_shapes(canonical, final, site_values, shapes=shapes)
    runs_final = verify_mod.run_at_shapes(final, final, kept, shapes=shapes)
    site_errors = verify_mod.errors(runs_canonical, runs_final, kept)
    if absorbed:
        site_errors.update(verify_mod.errors(
            runs_canonical, verify_mod.run_at_shapes(fused, final, absorbed, shapes=shapes), absorbed))
    end_to_end = {"outputs": verify_mod.errors(runs_original, runs_final, outputs),
                  "output_scale": verify_mod.scale(runs_original, outputs),
                  "shapes": [list(s) for s in shapes]}
    entries = []
    for s in sites:
        entry = s.describe()
        if s.nodes:
            entry["max_abs_error"] = site_errors[entry["output"]]
            if entry["output"] in absorbed:
                entry["error_measured"] = "before lowering (value absorbed by the next kernel)"
        entries.append(entry)
    builtin = verify_mod.errors(runs_canonical, runs_final, outputs)
    worst = max(builtin.values(), default=0.0)
    tolerance = verify_mod.EXACT_ATOL * max(1.0, verify_mod.scale(runs_canonical, outputs))
    return entries, end_to_end, worst, tolerance


def apply_custom(model: ir.Model, rewrites) -> tuple[ir.Model, list[dict]]:
    """Apply each custom rewrite to a copy; keep the copy unless the rewrite claims to be
    exact and changes the outputs. Returns the resulting model and one entry per rewrite."""
    from onnxscript.rewriter.pattern import RewriteRuleSet

    from kernelize.passes import verify as verify_mod

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
        check = verify_mod.compare(before, candidate, model)
        err = max(check["outputs"].values(), default=0.0)
        entry["max_abs_error"] = err
        if rewrite.exact and not err <= verify_mod.EXACT_ATOL * max(1.0, check["output_scale"]):
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
