"""Approximate rewrites: find the sites they apply to, capture their activations, fit each
candidate method and measure what it costs in accuracy and gains in speed.

Works on the canonical model, before the exact fusions: an attention core (Softmax-anchored,
head-split Q, K, V) or a projection (MatMul by a constant weight, optional bias Add) that
gets an approximate operator is no longer seen by the exact patterns; everything else is
fused exactly afterwards. What differs between kinds of site is each kind's strategy
(:mod:`kernelize.passes.site_kinds`, looked up by ``site.kind``); this module holds what they
share. Selection under the accuracy budget is :mod:`kernelize.passes.select`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

import kernelize.methods  # noqa: F401  (importing registers every approximation method)
from kernelize.backends import ort as ort_backend
from kernelize.errors import UsageError
from kernelize.methods.base import METHODS, Fitted, methods_of
from kernelize.passes import calibrate
from kernelize.passes.fuse import apply_site
from kernelize.passes.site_kinds import KINDS as SITE_KINDS
from kernelize.passes.site_kinds import ApproxSite, Scan  # noqa: F401  (ApproxSite: part of this module's API)
from kernelize.patterns.site import NearMiss, Site

KINDS = tuple(SITE_KINDS)  # the built-in kinds: "attention", "projection"


@dataclasses.dataclass
class Candidate:
    """One method fitted at one site, with its measured accuracy and estimated speed."""

    site: str
    method: str
    fitted: Fitted | None
    reason: str | None = None  # why it does not apply
    site_error: float | None = None  # relative Frobenius error of the site output (held out)
    site_max_abs: float | None = None
    error: float | None = None  # end-to-end error with only this rewrite (fitting half, metric)
    estimated_speedup: float | None = None  # exact cost / approximate cost (multiply-adds)
    measured_speedup: float | None = None  # this operator alone vs the exact one, ONNX Runtime
    saved_ms: float | None = None  # exact ms - approximate ms of that measurement (batch 1)
    fit_s: float = 0.0
    refused: str | None = None  # the method refused the calibration data (too little of it)

    def describe(self) -> dict:
        entry = {"method": self.method}
        if self.fitted is None:
            entry["status"] = "not applicable"
            entry["reason"] = self.reason
            return entry
        entry.update(status=self.reason or "fitted", site_error=self.site_error, site_max_abs=self.site_max_abs,
                     end_to_end_error=self.error, estimated_speedup=self.estimated_speedup,
                     measured_speedup=self.measured_speedup, saved_ms=self.saved_ms, fit_s=round(self.fit_s, 3),
                     attrs=self.fitted.attrs, **self.fitted.info)
        return entry


# -- rewrite specifications ---------------------------------------------------------------
def methods_for(kind: str, specs: list[str] | None) -> list[str]:
    """Method names of ``kind`` named by ``specs`` ("linear", "linear:favor+", "sparse:window",
    "shiftadd", ...); all of that kind when ``specs`` is None."""
    names = methods_of(kind)
    if specs is None:
        return names
    chosen = []
    for spec in specs:
        key = spec.strip().lower().rstrip("+")
        hits = [n for n in names if n == key or n.startswith(key + ":") or n.split(":", 1)[-1] == key]
        if not hits:
            raise UsageError(f"unknown {kind} rewrite {spec!r} (choose from: {', '.join(sorted(names))})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def parse_rewrites(items: list[str] | None) -> dict[str, list[str]]:
    """``["attention=linear:favor+", "projection=shiftadd|lut"]`` -> {kind: method names}."""
    result: dict[str, list[str]] = {}
    for item in items or []:
        kind, sep, spec = item.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in SITE_KINDS or not spec.strip():
            raise UsageError(f"bad --rewrite {item!r}: expected KIND=METHOD[|METHOD...] with KIND one of "
                             f"{', '.join(SITE_KINDS)} (e.g. attention=linear:hedgehog)")
        result[kind] = methods_for(kind, spec.replace(",", "|").split("|"))
    return result


def inputs_read(method_names) -> set[str]:
    """The site inputs the named methods' operators read (each method's ``reads``, or its
    kind's usual ones)."""
    return {name for n in method_names for name in (METHODS[n].reads or SITE_KINDS[METHODS[n].kind].reads)}


def parse_layers(text: str | None) -> set[int] | None:
    """"3-5,8" -> {3, 4, 5, 8}."""
    if text is None:
        return None
    layers: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            layers.update(range(first, last + 1))
    except ValueError:
        raise UsageError(f"bad --layers {text!r}: expected e.g. 3-5 or 0,2,4") from None
    return layers


# -- sites --------------------------------------------------------------------------------
def find(model: ir.Model, kinds=None, layers: set[int] | None = None, reads=()):
    """The sites approximate rewrites may take, in graph order (kind by kind; ``kinds``: all
    registered ones when None), and near misses. ``reads``: the site inputs the candidate
    methods read (see :func:`inputs_read`)."""
    kinds = tuple(SITE_KINDS) if kinds is None else kinds
    scan = Scan(model, reads)
    sites: list[ApproxSite] = []
    misses: list[NearMiss] = []
    # a kind that numbers the layers is found first (the others' sites are placed in them),
    # whichever kinds are asked for; otherwise kinds come in registration order
    for name, kind in sorted(SITE_KINDS.items(), key=lambda item: not item[1].numbers_layers):
        if name not in kinds and not kind.numbers_layers:
            continue
        found, missed = kind.find(scan)
        misses += missed
        if name in kinds:
            sites += found
    if layers is not None:
        sites = [s for s in sites if s.layer in layers]
    return sites, misses


# -- capture ------------------------------------------------------------------------------
def capture(model: ir.Model, sites: list[ApproxSite], calib: calibrate.CalibrationSet) -> dict[str, Any]:
    """Each site's activations over all calibration samples (CapturedAttention,
    CapturedProjection, ...) by site id, and other views of them under their kinds' keys.
    Nodes a site needs (a boolean mask's Where, the relative-position vector) are added to
    ``model`` first."""
    names: list[str] = []
    for s in sites:
        kind = SITE_KINDS[s.kind]
        kind.prepare(model, s)
        names += kind.capture_names(s)
    name_values(model)
    names = list(dict.fromkeys(names))
    values = calibrate.run(model, calib, names=names)
    mask = calib.token_mask()
    captured: dict[str, Any] = {}
    for s in sites:
        captured.update(SITE_KINDS[s.kind].capture(s, values, mask))
    return captured


def name_values(model: ir.Model) -> None:
    """Give every unnamed value a name (captured values are fetched by name)."""
    taken = {v.name for n in model.graph for v in n.outputs if v.name}
    count = 0
    for node in model.graph:
        for v in node.outputs:
            if not v.name:
                while f"kz_value_{count}" in taken:
                    count += 1
                v.name = f"kz_value_{count}"
                taken.add(v.name)


# -- fitting and measuring ------------------------------------------------------------------
def fit_candidates(s: ApproxSite, captured: dict, method_names: list[str], options: dict | None = None,
                   say: Callable[[str], None] = lambda m: None) -> list[Candidate]:
    """Fit each method on the fitting half of the site's activations (``captured`` is the
    dict :func:`capture` returned; each method gets the view its kind gives it) and measure
    the site error on the held-out half."""
    kind = SITE_KINDS[s.kind]
    candidates = []
    for name in method_names:
        view = kind.view(captured, s, METHODS[name])
        if isinstance(view, str):  # why the method does not apply here
            candidates.append(Candidate(s.id, name, None, view))
            continue
        candidates += _fit(s, view, captured[s.id], [name], options, say)
    return candidates


def _fit(s: ApproxSite, captured, full, method_names: list[str], options: dict | None,
         say: Callable[[str], None]) -> list[Candidate]:
    """``captured``: the view the methods are fitted on; ``full``: the site's activations,
    whose exact output the fits are judged against. Samples (or tokens, in sample order):
    the first half fits, the rest judges."""
    kind = SITE_KINDS[s.kind]
    n = captured.count
    half = (n + 1) // 2 if n > 1 else n
    held_out = slice(half, n) if n > 1 else slice(0, n)
    fit_part, test_part = captured.take(slice(0, half)), captured.take(held_out)
    exact = kind.exact_output(full.take(held_out))
    candidates = []
    shape = kind.shape(captured)
    for name in method_names:
        method = METHODS[name]
        refused = kind.refuses(method, captured)
        if refused:
            candidates.append(Candidate(s.id, name, None, refused))
            continue
        say(f"  {s.id}: fitting {name}")
        start = time.perf_counter()
        try:
            fitted = method.fit(fit_part, **(options or {}).get(name, {}))
        except UsageError as err:  # too little calibration data for this site
            candidates.append(Candidate(s.id, name, None, str(err), refused=str(err)))
            continue
        elapsed = time.perf_counter() - start
        if isinstance(fitted, str):
            candidates.append(Candidate(s.id, name, None, fitted, fit_s=elapsed))
            continue
        approx = kind.evaluate(test_part, fitted)
        rel = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))
        cost = method.cost(fitted, shape)
        base = kind.exact_cost(shape)
        candidates.append(Candidate(s.id, name, fitted, site_error=rel,
                                    site_max_abs=float(np.max(np.abs(approx - exact))),
                                    estimated_speedup=base / cost if cost > 0 else None, fit_s=elapsed))
    return candidates


# -- building rewritten models --------------------------------------------------------------
def rewrite(model: ir.Model, sites: list[ApproxSite], choices: dict[str, Fitted]) -> list[ir.Node]:
    """Replace each chosen site of ``model`` (whose sites are ``sites``) by its fitted operator."""
    nodes = []
    for s in sites:
        fitted = choices.get(s.id)
        if fitted is None:
            continue
        core = s.site
        weights = [None if w is None else ir.Value(name=f"{s.id}_{fitted.method}_w{i}",
                                                  const_value=ir.tensor(np.ascontiguousarray(w)))
                   for i, w in enumerate(fitted.inputs)]
        inputs = SITE_KINDS[s.kind].operator_inputs(s, fitted)
        site = Site(s.kind, fitted.method, fitted.op, core.nodes, inputs + weights, core.outputs,
                    dict(fitted.attrs), {}, [], core.index)
        node = apply_site(model, site)
        node.name = f"kernelize/{s.id}/{fitted.method}"
        nodes.append(node)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return nodes


def variant(base: onnx.ModelProto, kinds, layers, reads, choices: dict[str, Fitted]) -> ir.Model:
    """A fresh copy of ``base`` with ``choices`` applied (sites are found again in the copy)."""
    model = ir.from_proto(base)
    sites, _ = find(model, kinds, layers, reads)
    wanted = [s for s in sites if s.id in choices]
    for s in wanted:
        SITE_KINDS[s.kind].prepare(model, s)
    rewrite(model, wanted, choices)
    return model


_TIMINGS: dict[tuple, tuple[float, float]] = {}  # (op, attributes, shapes, threads) -> times


def measure_speedup(s: ApproxSite, captured, fitted: Fitted, seq: int | None = None, runs: int = 7,
                    threads: int = 1) -> float:
    """Exact time / approximate time of the site (see :func:`measure_times`)."""
    exact_ms, approx_ms = measure_times(s, captured, fitted, seq, runs, threads)
    return exact_ms / approx_ms


def measure_times(s: ApproxSite, captured, fitted: Fitted, seq: int | None = None, runs: int = 7,
                  threads: int = 1) -> tuple[float, float]:
    """The fitted operator alone against the exact computation of the site, batch 1, in ONNX
    Runtime (one-node models, same inputs, interleaved; ``seq`` tokens or query positions):
    (exact ms, approximate ms), from the fastest of ``runs`` calls each (the minimum is what
    other load on the machine disturbs least). Cached per operator, attributes, weight
    shapes and thread count: sites of the same shape are timed once."""
    key = (s.kind, fitted.op, repr(sorted(fitted.attrs.items())), seq, threads,
           tuple(None if w is None else np.shape(w) for w in fitted.inputs), SITE_KINDS[s.kind].timing_key(captured))
    if key not in _TIMINGS:
        _TIMINGS[key] = _time_site(s, captured, fitted, seq, runs, threads)
    return _TIMINGS[key]


def _time_site(s: ApproxSite, captured, fitted: Fitted, seq: int | None, runs: int,
               threads: int) -> tuple[float, float]:
    exact_model, approx_model, feeds = SITE_KINDS[s.kind].timing_models(captured, fitted, seq)
    sessions = [ort_backend.session(m, threads=threads) for m in (exact_model, approx_model)]
    times = [[], []]
    for _ in range(runs + 1):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, {k: v for k, v in feeds.items() if k in {x.name for x in sess.get_inputs()}})
            times[i].append(time.perf_counter() - start)
    exact_t, approx_t = (float(np.min(t[1:])) * 1e3 for t in times)
    return exact_t, approx_t
