"""Choose approximate rewrites under an accuracy budget.

For every site and candidate method: fit on the fitting half of the calibration set,
measure the site error on the held-out half, the operator's speed alone, and the
end-to-end error with only that rewrite. Then, per site, take the fastest candidate whose
error still fits what is left of the budget (sites with the best gain per error first),
verify the combination on the held-out half, and back off (drop the rewrite that costs the
most error, then choose again without it) while the measured error exceeds the budget. Sites where nothing fits stay
exact. A chosen rewrite carries ``exact_below``: the sequence length below which the exact
attention runs, from measured timings at several lengths.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import onnx_ir as ir

from kernelize import progress
from kernelize.errors import UsageError
from kernelize.passes import approximate, calibrate

RECIPE_KINDS = {"fast": ("attention", "projection"), "edge": ("projection",)}
# Methods a recipe tries by default, per kind (None: every method of the kind). ``fast`` takes
# the integer projections only: shift-add and LUT are slower than the dense MatMul on ONNX
# Runtime on x86 (benchmarks/projections.py), so they cannot make the model faster there.
RECIPE_METHODS = {"fast": {"projection": ["projection:int8", "projection:int8-static"]}}
DEFAULT_MAX_ERROR = 0.01
DISPATCH_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)
HOPELESS_SITE_ERROR = 0.5  # relative site error past which the end-to-end run is skipped

Metric = Callable[[dict, dict, dict], float]


def relative_l2(reference: dict, candidate: dict, feeds: dict) -> float:
    """Largest ||y - y_ref|| / ||y_ref|| over the float outputs."""
    worst = 0.0
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        diff = candidate[name].astype(np.float64) - ref
        worst = max(worst, float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)))
    return worst


def cosine(reference: dict, candidate: dict, feeds: dict) -> float:
    """1 - mean cosine similarity between the rows (last axis) of each float output, worst output."""
    worst = 0.0
    for name, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        b = candidate[name].reshape(a.shape).astype(np.float64)
        cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        worst = max(worst, float(1.0 - np.mean(cos)))
    return worst


METRICS: dict[str, Metric] = {"relative_l2": relative_l2, "cosine": cosine}


def _int8_fallback(names_by_kind: dict[str, list[str]], backend: str, target: str) -> list[str]:
    """Drop the ``projection:int8`` methods for a TVM CPU target without int8 dot products (on it the
    integer matmul is plain int32 arithmetic, slower than fp32); returns the notes saying so."""
    names = names_by_kind.get("projection", [])
    integer = [n for n in names if n.startswith("projection:int8")]
    if backend != "tvm" or not integer:
        return []
    from kernelize.backends import targets

    preset = targets.resolve(target)
    if targets.int8_dot_product(preset):
        return []
    names_by_kind["projection"] = [n for n in names if n not in integer]
    return [f"target {target} ({preset.config.get('mcpu') or preset.config.get('mtriple') or preset.config['kind']}) "
            f"has no int8 dot-product instructions ({', '.join(targets.INT8_DOT_PRODUCT)}): {', '.join(integer)} "
            "fall back to the dense fp32 projections"]


def resolve_metric(metric: str | Metric | None) -> tuple[str, Metric]:
    if metric is None:
        return "relative_l2", relative_l2
    if callable(metric):
        return getattr(metric, "__name__", "user metric"), metric
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r} (choose from: {', '.join(METRICS)}; or pass a function "
                         "through the API)")
    return metric, METRICS[metric]


def approximate_model(model: ir.Model, recipe: str, *, calib=None, max_error: float | None = None,
                      rewrites: dict[str, list[str]] | None = None, layers: set[int] | None = None,
                      metric: str | Metric | None = None, method_options: dict | None = None,
                      select: bool = True, calibration_cache: dict | None = None, sequential: bool = False,
                      threads: int = 1, backend: str = "ort", target: str = "cpu",
                      say: Callable[[str], None] = lambda m: None) -> tuple[ir.Model, dict]:
    """Fit, measure and (with ``select``) choose approximate rewrites for ``model`` (canonical
    form). Returns the rewritten model and the report section.

    ``calibration_cache``: a dict shared by several calls on the same model and calibration
    inputs (e.g. one inspection, then several budgets): each site's candidates are fitted and
    measured once. ``sequential``: the chosen projections are refit in model order on the
    activations of the model with the earlier choices applied (see :func:`_refit_sequentially`;
    off by default: on all-MiniLM-L6-v2 it did not lower the end-to-end error).
    ``threads``: ONNX Runtime threads for the speed measurements. ``backend``/``target``: where
    the model will run; a TVM CPU target without int8 dot-product instructions does not get
    ``projection:int8`` (the projections stay dense, and the section's ``notes`` say why)."""
    started = time.perf_counter()
    kinds = tuple(rewrites) if rewrites else RECIPE_KINDS.get(recipe, ("attention",))
    defaults = RECIPE_METHODS.get(recipe, {})
    names_by_kind = {k: (rewrites or {}).get(k) or defaults.get(k) or approximate.methods_for(k, None)
                     for k in kinds}
    notes = _int8_fallback(names_by_kind, backend, target)
    goal = "size" if recipe == "edge" else "time"
    forced = bool(rewrites) and max_error is None
    budget = float("inf") if forced else (DEFAULT_MAX_ERROR if max_error is None else float(max_error))
    if budget < 0:
        raise UsageError(f"--max-error must be >= 0 (got {max_error})")
    metric_name, metric_fn = resolve_metric(metric)
    # the site inputs the candidates read (a relative-position vector is matched only if one reads it)
    reads = approximate.inputs_read(n for names in names_by_kind.values() for n in names)

    say("calibration: loading inputs")
    calib = calib if isinstance(calib, calibrate.CalibrationSet) else calibrate.load(model, calib)
    approximate.name_values(model)  # captured values are fetched by name, in every variant
    base = ir.to_proto(model)  # every variant starts from this; capture works on a copy
    work = ir.from_proto(base)
    sites, misses = approximate.find(work, kinds, layers, reads)
    section = {"recipe": recipe, "kinds": list(kinds), "calibration": calib.source,
               "calibration_samples": {"fit": calib.fit.stop - calib.fit.start,
                                       "held_out": calib.held_out.stop - calib.held_out.start},
               "seq": calib.seq, "metric": metric_name, "max_error": None if forced else budget,
               "mode": "forced (--rewrite without --max-error)" if forced else "budget",
               "near_misses": [m.describe() for m in misses], "notes": notes, "sites": []}
    if not sites:
        reasons = sorted({m.reason for m in misses})
        section["summary"] = "no site for the approximate rewrites" + (f" ({'; '.join(reasons)})" if reasons else "")
        return model, section

    say(f"calibration: capturing activations at {len(sites)} site(s)")
    captured = approximate.capture(work, sites, calib)
    say("calibration: running the original model")
    reference_fit = calibrate.run(base, calib, calib.fit)
    reference_held = calibrate.run(base, calib, calib.held_out)
    fit_feeds, held_feeds = calib.part(calib.fit), calib.part(calib.held_out)

    def end_to_end(choices, which="fit"):
        candidate = approximate.variant(base, kinds, layers, reads, choices)
        if which == "fit":
            return metric_fn(reference_fit, calibrate.run(candidate, calib, calib.fit), fit_feeds)
        return metric_fn(reference_held, calibrate.run(candidate, calib, calib.held_out), held_feeds)

    all_candidates: dict[str, list[approximate.Candidate]] = {}
    cache = {} if calibration_cache is None else calibration_cache

    def judge(s, c, view) -> None:
        """The candidate's speed alone and (unless hopeless or without gain) its end-to-end error."""
        exact_ms, approx_ms = approximate.measure_times(s, view, c.fitted, seq=calib.seq, threads=threads)
        c.measured_speedup, c.saved_ms = exact_ms / approx_ms, exact_ms - approx_ms
        screen = select and not forced  # inspection measures every candidate
        if screen and c.site_error is not None and c.site_error > HOPELESS_SITE_ERROR:
            c.reason = f"site error {c.site_error:.3g} > {HOPELESS_SITE_ERROR}: end-to-end run skipped"
            return
        if screen and gain(c, goal) <= 0:
            c.reason = (f"no gain at seq {calib.seq} (measured x{c.measured_speedup:.2f}"
                        + (", slower than exact: edge takes no rewrite that slows the model)"
                           if goal == "size" and c.measured_speedup < 1 else ")"))
            return
        bar.say(f"{s.id}: end-to-end error of {c.method}")
        c.error = end_to_end({s.id: c.fitted})

    total = sum(len(names_by_kind[s.kind]) for s in sites)
    with progress.bar(say, total, f"calibrating {len(sites)} site(s)", "candidate") as bar:
        for s in sites:
            key = (s.id, tuple(names_by_kind[s.kind]), calib.fingerprint, metric_name, repr(method_options),
                   threads)
            if key in cache:  # fitted and measured by an earlier call on the same model and calibration
                all_candidates[s.id] = cache[key]
                bar.update(len(names_by_kind[s.kind]))
                continue
            bar.say(f"{s.id} ({s.name}): fitting {len(names_by_kind[s.kind])} candidate(s)")
            cands = approximate.fit_candidates(s, captured, names_by_kind[s.kind], method_options, bar.say)
            for c in cands:
                if c.fitted is not None:
                    judge(s, c, captured[s.id])
                bar.update(1)
            bar.update(max(0, len(names_by_kind[s.kind]) - len(cands)))
            all_candidates[s.id] = cache[key] = cands

    # a method the user named that has too little data at every site is an error; a recipe's
    # default methods just leave such sites to the other candidates (the reason is reported)
    for name in {n for names in (rewrites or {}).values() for n in names or ()}:
        tried = [c for cands in all_candidates.values() for c in cands if c.method == name]
        if tried and all(c.refused for c in tried):
            raise UsageError(tried[0].refused)

    chosen: dict[str, approximate.Candidate] = {}
    backed_off: list[dict] = []
    held_out_error = 0.0
    if select:
        chosen = {k: _copy(c) for k, c in _choose(sites, all_candidates, budget, forced, goal).items()}
        excluded: set[tuple[str, str]] = set()
        while chosen:
            if sequential:
                _refit_sequentially(base, sites, chosen, calib, method_options, (kinds, layers, reads), say)
            say(f"verifying {len(chosen)} rewrite(s) together on held-out samples")
            held_out_error = end_to_end({k: c.fitted for k, c in chosen.items()}, "held_out")
            if held_out_error <= budget:
                break
            # back off: drop the rewrite costing the most error, then choose again without it
            worst = max(chosen.values(), key=lambda c: (c.error or 0.0))
            backed_off.append({"site": worst.site, "method": worst.method, "combined_error": held_out_error})
            excluded.add((worst.site, worst.method))
            remaining = {sid: [c for c in cands if (sid, c.method) not in excluded]
                         for sid, cands in all_candidates.items()}
            chosen = {k: _copy(c) for k, c in _choose(sites, remaining, budget, forced, goal).items()}
        for site_id, c in chosen.items():
            s = next(x for x in sites if x.id == site_id)
            if "exact_below" in c.fitted.attrs:  # an operator that runs exact below some length
                say(f"{site_id}: timing {c.method} against exact attention at several lengths")
                c.fitted.attrs["exact_below"], c.fitted.info["speedup_by_length"] = \
                    _crossover(s, captured[s.id], c.fitted, calib.seq)

    if select and chosen and goal == "time" and not forced:
        say("timing the rewritten model against the exact one (batch 1)")
        section["latency"] = latency = _compare_latency(base, approximate.variant(
            base, kinds, layers, reads, {k: c.fitted for k, c in chosen.items()}), calib, threads, say=say)
        if latency["speedup"] < 1.0:  # a rewrite is taken for speed only: none pays off
            section["not_faster"] = {k: c.method for k, c in chosen.items()}
            chosen = {}
    left = budget - sum((c.error or 0.0) for c in chosen.values())  # after the chosen rewrites
    for s in sites:
        entry = s.describe()
        entry["candidates"] = [c.describe() for c in all_candidates[s.id]]
        pick = chosen.get(s.id)
        entry["chosen"] = pick.method if pick else None
        if pick:
            entry.update(site_error=pick.site_error, end_to_end_error=pick.error,
                         estimated_speedup=pick.estimated_speedup, measured_speedup=pick.measured_speedup,
                         saved_ms=pick.saved_ms, exact_below=pick.fitted.attrs.get("exact_below"),
                         sequential=pick.fitted.info.get("sequential", False),
                         weight_bytes=pick.fitted.info.get("weight_bytes"),
                         dense_weight_bytes=pick.fitted.info.get("dense_weight_bytes"))
        elif s.id in section.get("not_faster", {}):
            entry["why_exact"] = (f"the rewritten model was not faster than the exact one end to end "
                                  f"(x{section['latency']['speedup']:.2f}): nothing is taken for speed")
        else:
            entry["why_exact"] = _why_exact(all_candidates[s.id], budget, forced, select, left, backed_off, goal)
        section["sites"].append(entry)
    section.update(chosen={k: c.method for k, c in chosen.items()}, backed_off=backed_off,
                   estimated_error=sum((c.error or 0.0) for c in chosen.values()),
                   held_out_error=held_out_error if chosen else 0.0, fit_s=time.perf_counter() - started)
    size = [(pick.fitted.info.get("weight_bytes"), pick.fitted.info.get("dense_weight_bytes"))
            for pick in chosen.values()]
    section["weight_bytes_saved"] = int(sum(d - w for w, d in size if w is not None and d is not None))
    if section.get("not_faster"):
        section["summary"] = (f"the chosen rewrites were not faster end to end (x{section['latency']['speedup']:.2f} "
                              "at batch 1); all sites stay exact")
    elif select and not chosen:
        section["summary"] = (f"no approximate rewrite fits the budget ({metric_name} <= {budget:g}); "
                              "all sites stay exact")
    else:
        section["summary"] = f"{len(chosen)} of {len(sites)} site(s) rewritten; held-out {metric_name} " \
                             f"{section['held_out_error']:.4g}"
    if not chosen:
        return ir.from_proto(base), section
    return approximate.variant(base, kinds, layers, reads, {k: c.fitted for k, c in chosen.items()}), section


def _refit_sequentially(base, sites, chosen: dict, calib, method_options, variant_args, say) -> None:
    """Refit the chosen rewrites of the kinds that allow it (projections) in model order
    (GPTQ's order): each layer's sites on the activations of the model with every earlier
    choice applied (already refit), so that each fit sees the inputs it will get. Fitting half
    of the calibration set only; other choices (attention) keep their fit."""
    from kernelize.methods.base import METHODS
    from kernelize.passes.site_kinds import KINDS

    order = {s.id: i for i, s in enumerate(sites)}
    refits = sorted((s for s in sites if KINDS[s.kind].sequential and s.id in chosen), key=lambda s: order[s.id])
    if not refits:
        return
    mask = calib.token_mask(calib.fit)
    applied = {k: c.fitted for k, c in chosen.items() if k not in {s.id for s in refits}}
    layers = list(dict.fromkeys(s.layer for s in refits))
    for layer in layers:
        group = [s for s in refits if s.layer == layer]
        say(f"sequential calibration: {len(group)} {'/'.join(dict.fromkeys(s.kind for s in group))}(s) "
            f"of layer {layer}")
        model = approximate.variant(base, *variant_args, applied) if applied else base
        values = calibrate.run(model, calib, calib.fit,
                               names=[n for s in group for n in KINDS[s.kind].capture_names(s)])
        for s in group:
            c = chosen[s.id]
            refit = METHODS[c.method].fit(KINDS[s.kind].capture(s, values, mask)[s.id],
                                          **(method_options or {}).get(c.method, {}))
            if not isinstance(refit, str):
                refit.info["sequential"] = True
                c.fitted = refit
            applied[s.id] = c.fitted


def _compare_latency(base, rewritten: ir.Model, calib, threads: int, rounds: int = 15, say=None) -> dict:
    """Batch-1 latency of the exact and the rewritten model as they will run: fused and
    lowered for ONNX Runtime (one held-out calibration sample, interleaved rounds, medians)."""
    from kernelize.backends import ort as ort_backend
    from kernelize.passes.fuse import fuse

    def deployed(proto):
        model = ir.from_proto(proto)
        fuse(model)
        ort_backend.lower(model)
        return ort_backend.session(model, threads=threads)

    feeds = {k: v[calib.held_out.start:calib.held_out.start + 1] for k, v in calib.feeds.items()}
    exact, fast = deployed(base), deployed(ir.to_proto(rewritten))
    with progress.bar(say, rounds, "timing exact against rewritten", "round") as bar:
        times = ort_backend.interleaved_ms([exact, fast], feeds, rounds, tick=progress.ticker(bar))
    return {"batch": 1, "seq": calib.seq, "threads": threads, "exact_ms": times[0], "rewritten_ms": times[1],
            "speedup": times[0]["median_ms"] / times[1]["median_ms"],
            "note": "both fused and lowered for ONNX Runtime"}


def _copy(c: approximate.Candidate) -> approximate.Candidate:
    """A chosen candidate whose attributes may change (``exact_below``) without touching the
    cached one."""
    return dataclasses.replace(c, fitted=dataclasses.replace(c.fitted, attrs=dict(c.fitted.attrs),
                                                             info=dict(c.fitted.info)))


def gain(c: approximate.Candidate, goal: str = "time") -> float:
    """What a candidate saves at its site. ``time`` (recipe fast): the milliseconds saved at
    batch 1 (measured); ``size`` (recipe edge): the fraction of weight bytes saved, for
    candidates that are not slower than exact (0 otherwise)."""
    if goal == "time":
        return c.saved_ms or 0.0
    info = c.fitted.info if c.fitted is not None else {}
    if not info.get("dense_weight_bytes") or (c.measured_speedup or 0.0) < 1.0:
        return 0.0
    return 1.0 - info["weight_bytes"] / info["dense_weight_bytes"]


def _choose(sites, candidates, budget: float, forced: bool, goal: str = "time") -> dict:
    """Per site the candidate with the largest gain that fits what is left of the budget,
    sites with the best gain per unit of error first."""
    if forced:  # the user named the rewrite: the first fitted candidate per site
        return {s.id: next(c for c in candidates[s.id] if c.fitted is not None)
                for s in sites if any(c.fitted is not None for c in candidates[s.id])}
    options = {s.id: sorted((c for c in candidates[s.id] if c.error is not None and c.error <= budget
                             and gain(c, goal) > 0), key=lambda c: -gain(c, goal)) for s in sites}

    def value(c):
        return gain(c, goal) / max(c.error, 1e-9)

    order = sorted((sid for sid in options if options[sid]), key=lambda sid: -max(map(value, options[sid])))
    chosen, spent = {}, 0.0
    for sid in order:
        for c in options[sid]:
            if spent + c.error <= budget:
                chosen[sid], spent = c, spent + c.error
                break
    return chosen


def _crossover(s, captured, fitted, seq: int | None) -> tuple[int, dict]:
    """The shortest measured length from which on the approximate operator is faster."""
    exact_below = fitted.attrs.get("exact_below", 0)
    fitted.attrs["exact_below"] = 0
    top = max(seq or 0, 512)
    speed = {}
    for length in [n for n in DISPATCH_LENGTHS if n <= top]:
        speed[length] = round(approximate.measure_speedup(s, captured, fitted, seq=length), 3)
    faster = [n for n in speed if all(speed[m] >= 1.0 for m in speed if m >= n)]
    exact_below = min(faster) if faster else exact_below
    return int(exact_below), speed


def _why_exact(cands, budget, forced, select, left, backed_off, goal) -> str:
    if not select:
        return "inspection only"
    fitted = [c for c in cands if c.fitted is not None]
    if not fitted:
        return "no candidate applies: " + "; ".join(f"{c.method}: {c.reason}" for c in cands)
    errors = [c.error for c in fitted if c.error is not None and gain(c, goal) > 0]
    if not errors:
        return "no candidate is worth an end-to-end run: " + "; ".join(
            f"{c.method}: {c.reason}" for c in fitted if c.reason)
    if any(b["site"] == c.site for b in backed_off for c in fitted):
        return "dropped: the chosen rewrites together exceeded the budget on held-out samples (back-off)"
    return (f"smallest end-to-end error {min(errors):.3g} exceeds what the other sites leave of the budget "
            f"({max(left, 0.0):.3g} of {budget:g})")
