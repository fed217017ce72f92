"""``kernelize.optimize`` and ``kernelize.inspect``: the flow from a model to an artifact."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_ir as ir

from kernelize import report as report_mod
from kernelize.backends import BACKENDS
from kernelize.backends import ort as ort_backend
from kernelize.errors import KernelizeError, UsageError
from kernelize.frontends import onnx as onnx_frontend
from kernelize.passes import verify
from kernelize.passes.canonicalize import canonicalize
from kernelize.passes.fuse import find_sites, fuse
from kernelize.patterns.registry import custom_rewrites

RECIPES = ("exact",)
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


def inspect(model: Any, example_inputs: Any = None) -> dict:
    """Sites found (after canonicalization) and near misses, without rewriting."""
    ir_model, name = load_model(model, example_inputs)
    canonicalize(ir_model)
    sites, misses = fuse(ir_model)
    return _sites_report(name, sites, misses)


def _sites_report(name, sites, misses) -> dict:
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return {"model": name, "sites": [s.describe() for s in sites],
            "near_misses": [m.describe() for m in misses],
            "summary": {"sites": counts}}


def optimize(model: Any, example_inputs: Any = None, *, recipe: str = "exact", backend: str = "ort",
             output_dir: str | os.PathLike | None = None, force: bool = False,
             measure_latency: bool = True, latency_runs: int = 20, threads: int = 1,
             progress: Callable[[str], None] | None = None) -> Result:
    """Capture, canonicalize, fuse, verify, lower and (optionally) save ``model``.

    Returns the optimized model, the artifact path and the report. Raises
    :class:`KernelizeError` for bad input and when an exact rewrite fails verification.
    """
    _check_choices(recipe, backend)
    say = progress or (lambda message: None)
    out_path = Path(output_dir) if output_dir is not None else None
    if out_path is not None and out_path.exists() and not force:
        raise KernelizeError(f"output folder {out_path} exists (use --force to replace it)")
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
    canonical = ir.to_proto(ir_model)  # the reference for the per-site checks
    t = step("fusing")
    sites, misses = fuse(ir_model)
    timings["fuse_s"] = time.perf_counter() - t
    timings["optimize_s"] = timings["canonicalize_s"] + timings["fuse_s"]

    site_values = [s.outputs[0].name for s in sites if s.nodes]
    fused = ir.to_proto(ir_model) if site_values else None
    t = step(f"lowering for {backend}")
    lowered = ort_backend.lower(ir_model)
    timings["lower_s"] = time.perf_counter() - t

    t = step("verifying against the original")
    # Each site's output is compared in the lowered model; a value a kernel absorbed (a bias
    # folded into the next one) is compared in the fused model, before lowering.
    present = {v.name for node in ir_model.graph for v in node.outputs}
    per_site = verify.compare(canonical, ir_model, ir_model, values=[n for n in site_values if n in present])
    absorbed = [n for n in site_values if n not in present]
    before_lowering = verify.compare(canonical, fused, ir_model, values=absorbed)["values"] if absorbed else {}
    end_to_end = verify.compare(original, ir_model, ir_model)
    timings["verify_s"] = time.perf_counter() - t
    site_reports = []
    for s in sites:
        entry = s.describe()
        if entry["output"] in before_lowering:
            entry.update(max_abs_error=before_lowering[entry["output"]], error_measured="before lowering")
        elif s.nodes:
            entry["max_abs_error"] = per_site["values"].get(entry["output"])
        site_reports.append(entry)
    # The built-in rewrites are exact: checked against the model they started from (custom
    # rewrites declared approximate are applied before and report their own error).
    worst = max(per_site["outputs"].values(), default=0.0)
    scale = max(per_site["output_scale"].values(), default=1.0)
    tolerance = verify.EXACT_ATOL * max(1.0, scale)
    if not worst <= tolerance:
        raise KernelizeError(f"exact rewrites changed the outputs by {worst:.3g} (tolerance {tolerance:.3g}); "
                             "this is a kernelize bug, please report it with the model")

    report = _sites_report(name, sites, misses)
    report.update(recipe=recipe, backend=backend, canonicalization=canon_counts,
                  lowered=lowered, custom_rewrites=custom, end_to_end=end_to_end,
                  tolerance=tolerance, timings=timings)
    report["sites"] = site_reports

    if measure_latency:
        t = step("measuring latency")
        batch, seq = LATENCY_SHAPE
        feeds = verify.random_inputs(ir_model, batch, seq)
        before = ort_backend.latency_ms(ort_backend.session(original, threads), feeds, latency_runs)
        after = ort_backend.latency_ms(ort_backend.session(ir_model, threads), feeds, latency_runs)
        report["latency"] = {"batch": batch, "seq": seq, "threads": threads, "before": before, "after": after,
                             "speedup": before["median_ms"] / after["median_ms"]}
        timings["latency_s"] = time.perf_counter() - t

    path = None
    if out_path is not None:
        step(f"writing {out_path}")
        path = write_artifact(ir_model, report, out_path, force)
    return Result(ir_model, path, report)


def _apply_custom(model: ir.Model, rewrites) -> tuple[ir.Model, list[dict]]:
    """Apply each custom rewrite to a copy; keep the copy unless the rewrite claims to be
    exact and changes the outputs. Returns the resulting model and one entry per rewrite."""
    from onnxscript.rewriter.pattern import RewriteRuleSet

    results = []
    for rewrite in rewrites:
        before = ir.to_proto(model)
        candidate = ir.from_proto(before)
        count = RewriteRuleSet([rewrite.rule()]).apply_to_model(candidate)
        ir.passes.common.RemoveUnusedNodesPass()(candidate)
        entry = {"name": rewrite.name, "exact": rewrite.exact, "sites": int(count or 0)}
        if not count:
            entry.update(status="no match", detail="pattern not found")
            results.append(entry)
            continue
        check = verify.compare(before, candidate, model)
        err = max(check["outputs"].values(), default=0.0)
        entry["max_abs_error"] = err
        scale = max(check["output_scale"].values(), default=1.0)
        if rewrite.exact and not err <= verify.EXACT_ATOL * max(1.0, scale):
            entry.update(status="rejected",
                         detail=f"declared exact but changed the outputs by {err:.3g}; not applied")
        else:
            model = candidate
            entry.update(status="applied", detail=f"{count} site(s), max abs error {err:.3g}")
        results.append(entry)
    return model, results


def write_artifact(model: ir.Model, report: dict, out_path: Path, force: bool = False) -> Path:
    """Write model.onnx, report.json and report.txt into a temp folder, then rename it."""
    out_path = Path(out_path)
    parent = out_path.resolve().parent
    if not parent.exists():
        raise KernelizeError(f"parent folder of the output does not exist: {parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=parent))
    try:
        proto = ir.to_proto(model)
        if proto.ByteSize() > 1_800_000_000:
            onnx.save_model(proto, tmp / "model.onnx", save_as_external_data=True,
                            location="model.onnx.data", all_tensors_to_one_file=True)
        else:
            onnx.save_model(proto, tmp / "model.onnx")
        (tmp / "report.json").write_text(report_mod.dumps(report))
        (tmp / "report.txt").write_text(report_mod.table(report))
        if out_path.exists():
            if not force:
                raise KernelizeError(f"output folder {out_path} exists (use --force to replace it)")
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path
