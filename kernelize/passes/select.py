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

from kernelize.errors import UsageError
from kernelize.passes import approximate, calibrate

RECIPE_KINDS = {"fast": ("attention",), "edge": ("projection",)}
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
                      select: bool = True, calibration_cache: dict | None = None, say: Callable[[str], None] = lambda m: None) -> tuple[ir.Model, dict]:
    """Fit, measure and (with ``select``) choose approximate rewrites for ``model`` (canonical
    form). Returns the rewritten model and the report section.

    ``calibration_cache``: a dict shared by several calls on the same model and calibration
    inputs (e.g. one inspection, then several budgets): each site's candidates are fitted and
    measured once."""
    started = time.perf_counter()
    kinds = tuple(rewrites) if rewrites else RECIPE_KINDS.get(recipe, ("attention",))
    names_by_kind = {k: (rewrites or {}).get(k) or approximate.methods_for(k, None) for k in kinds}
    forced = bool(rewrites) and max_error is None
    budget = float("inf") if forced else (DEFAULT_MAX_ERROR if max_error is None else float(max_error))
    if budget < 0:
        raise UsageError(f"--max-error must be >= 0 (got {max_error})")
    metric_name, metric_fn = resolve_metric(metric)
    toeplitz = any(n.startswith("rpe:") for names in names_by_kind.values() for n in names)

    say("calibration: loading inputs")
    calib = calib if isinstance(calib, calibrate.CalibrationSet) else calibrate.load(model, calib)
    base = ir.to_proto(model)  # every variant starts from this; capture works on a copy
    work = ir.from_proto(base)
    sites, misses = approximate.find(work, kinds, layers, toeplitz)
    section = {"recipe": recipe, "kinds": list(kinds), "calibration": calib.source,
               "calibration_samples": {"fit": calib.fit.stop - calib.fit.start,
                                       "held_out": calib.held_out.stop - calib.held_out.start},
               "seq": calib.seq, "metric": metric_name, "max_error": None if forced else budget,
               "mode": "forced (--rewrite without --max-error)" if forced else "budget",
               "near_misses": [m.describe() for m in misses], "sites": []}
    if not sites:
        section["summary"] = "no site for the approximate rewrites"
        return model, section

    say(f"calibration: capturing activations at {len(sites)} site(s)")
    captured = approximate.capture(work, sites, calib)
    say("calibration: running the original model")
    reference_fit = calibrate.run(base, calib, calib.fit)
    reference_held = calibrate.run(base, calib, calib.held_out)
    fit_feeds, held_feeds = calib.part(calib.fit), calib.part(calib.held_out)

    def end_to_end(choices, which="fit"):
        candidate = approximate.variant(base, kinds, layers, toeplitz, choices)
        if which == "fit":
            return metric_fn(reference_fit, calibrate.run(candidate, calib, calib.fit), fit_feeds)
        return metric_fn(reference_held, calibrate.run(candidate, calib, calib.held_out), held_feeds)

    all_candidates: dict[str, list[approximate.Candidate]] = {}
    cache = {} if calibration_cache is None else calibration_cache
    for s in sites:
        key = (s.id, tuple(names_by_kind[s.kind]), calib.fingerprint, metric_name, repr(method_options))
        if key in cache:  # fitted and measured by an earlier call on the same model and calibration
            all_candidates[s.id] = cache[key]
            continue
        say(f"{s.id} ({s.name}): fitting {len(names_by_kind[s.kind])} candidate(s)")
        cands = approximate.fit_candidates(s, captured, names_by_kind[s.kind], method_options, say)
        view = captured[s.id]
        for c in cands:
            if c.fitted is None:
                continue
            c.measured_speedup = approximate.measure_speedup(s, view, c.fitted)
            screen = select and not forced  # inspection measures every candidate
            if screen and c.site_error is not None and c.site_error > HOPELESS_SITE_ERROR:
                c.reason = f"site error {c.site_error:.3g} > {HOPELESS_SITE_ERROR}: end-to-end run skipped"
                continue
            if screen and gain(c) <= 0:
                c.reason = f"no gain at seq {calib.seq} (measured x{c.measured_speedup:.2f})"
                continue
            say(f"  {s.id}: end-to-end error of {c.method}")
            c.error = end_to_end({s.id: c.fitted})
        all_candidates[s.id] = cache[key] = cands

    for name in {n for names in names_by_kind.values() for n in names}:  # too little data everywhere
        tried = [c for cands in all_candidates.values() for c in cands if c.method == name]
        if tried and all(c.refused for c in tried):
            raise UsageError(tried[0].refused)

    chosen: dict[str, approximate.Candidate] = {}
    backed_off: list[dict] = []
    held_out_error = 0.0
    if select:
        chosen = {k: _copy(c) for k, c in _choose(sites, all_candidates, budget, forced).items()}
        excluded: set[tuple[str, str]] = set()
        while chosen:
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
            chosen = {k: _copy(c) for k, c in _choose(sites, remaining, budget, forced).items()}
        for site_id, c in chosen.items():
            s = next(x for x in sites if x.id == site_id)
            if s.kind == "attention" and "exact_below" in c.fitted.attrs:
                say(f"{site_id}: timing {c.method} against exact attention at several lengths")
                c.fitted.attrs["exact_below"], c.fitted.info["speedup_by_length"] = \
                    _crossover(s, captured[s.id], c.fitted, calib.seq)

    left = budget - sum((c.error or 0.0) for c in chosen.values())  # after the chosen rewrites
    for s in sites:
        entry = s.describe()
        entry["candidates"] = [c.describe() for c in all_candidates[s.id]]
        pick = chosen.get(s.id)
        entry["chosen"] = pick.method if pick else None
        if pick:
            entry.update(site_error=pick.site_error, end_to_end_error=pick.error,
                         estimated_speedup=pick.estimated_speedup, measured_speedup=pick.measured_speedup,
                         exact_below=pick.fitted.attrs.get("exact_below"))
        else:
            entry["why_exact"] = _why_exact(all_candidates[s.id], budget, forced, select, left, backed_off)
        section["sites"].append(entry)
    section.update(chosen={k: c.method for k, c in chosen.items()}, backed_off=backed_off,
                   estimated_error=sum((c.error or 0.0) for c in chosen.values()),
                   held_out_error=held_out_error if chosen else 0.0, fit_s=time.perf_counter() - started)
    if select and not chosen:
        section["summary"] = (f"no approximate rewrite fits the budget ({metric_name} <= {budget:g}); "
                              "all sites stay exact")
    else:
        section["summary"] = f"{len(chosen)} of {len(sites)} site(s) rewritten; held-out {metric_name} " \
                             f"{section['held_out_error']:.4g}"
    if not chosen:
        return ir.from_proto(base), section
    return approximate.variant(base, kinds, layers, toeplitz, {k: c.fitted for k, c in chosen.items()}), section


def _copy(c: approximate.Candidate) -> approximate.Candidate:
    """A chosen candidate whose attributes may change (``exact_below``) without touching the
    cached one."""
    return dataclasses.replace(c, fitted=dataclasses.replace(c.fitted, attrs=dict(c.fitted.attrs),
                                                             info=dict(c.fitted.info)))


def gain(c: approximate.Candidate) -> float:
    """What a candidate saves at its site, as a fraction: attention, the time (measured
    speed alone); a projection, the time or the weight bytes, whichever saves more."""
    saved = 1.0 - 1.0 / c.measured_speedup if c.measured_speedup else 0.0
    info = c.fitted.info if c.fitted is not None else {}
    if info.get("dense_weight_bytes"):
        saved = max(saved, 1.0 - info["weight_bytes"] / info["dense_weight_bytes"])
    return saved


def _choose(sites, candidates, budget: float, forced: bool) -> dict:
    """Per site the candidate with the largest gain that fits what is left of the budget,
    sites with the best gain per unit of error first."""
    if forced:  # the user named the rewrite: the first fitted candidate per site
        return {s.id: next(c for c in candidates[s.id] if c.fitted is not None)
                for s in sites if any(c.fitted is not None for c in candidates[s.id])}
    options = {s.id: sorted((c for c in candidates[s.id] if c.error is not None and c.error <= budget
                             and gain(c) > 0), key=lambda c: -gain(c)) for s in sites}

    def value(c):
        return gain(c) / max(c.error, 1e-9)

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


def _why_exact(cands, budget, forced, select, left, backed_off) -> str:
    if not select:
        return "inspection only"
    fitted = [c for c in cands if c.fitted is not None]
    if not fitted:
        return "no candidate applies: " + "; ".join(f"{c.method}: {c.reason}" for c in cands)
    errors = [c.error for c in fitted if c.error is not None and gain(c) > 0]
    if not errors:
        return "no candidate is worth an end-to-end run: " + "; ".join(
            f"{c.method}: {c.reason}" for c in fitted if c.reason)
    if any(b["site"] == c.site for b in backed_off for c in fitted):
        return "dropped: the chosen rewrites together exceeded the budget on held-out samples (back-off)"
    return (f"smallest end-to-end error {min(errors):.3g} exceeds what the other sites leave of the budget "
            f"({max(left, 0.0):.3g} of {budget:g})")
