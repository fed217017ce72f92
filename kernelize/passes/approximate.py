"""Approximate rewrites: find the sites they apply to, capture their activations, fit each
candidate method and measure what it costs in accuracy and gains in speed.

Works on the canonical model, before the exact fusions: an attention core (Softmax-anchored,
head-split Q, K, V) or a projection (MatMul by a constant weight, optional bias Add) that
gets an approximate operator is no longer seen by the exact patterns; everything else is
fused exactly afterwards. Selection under the accuracy budget is :mod:`kernelize.passes.select`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

import kernelize.methods  # noqa: F401  (importing registers every approximation method)
from kernelize import ops
from kernelize.backends import ort as ort_backend
from kernelize.errors import UsageError
from kernelize.graph import const_array, only_user, producer, rank
from kernelize.methods.base import METHODS, CapturedAttention, CapturedProjection, Fitted, exact_attention_cost
from kernelize.passes import calibrate
from kernelize.passes.fuse import apply_site
from kernelize.patterns.attention import AttentionPattern
from kernelize.patterns.site import NearMiss, Site

KINDS = ("attention", "projection")
MAX_PROJECTION_TOKENS = 8192  # calibration tokens kept per projection site


@dataclasses.dataclass
class ApproxSite:
    """A site an approximate rewrite may replace."""

    id: str  # "attention[3]", "projection[12]"
    kind: str
    layer: int | None  # transformer layer (attention order), None when unknown
    site: Site
    toeplitz: Any = None  # kernelize.patterns.positional.Toeplitz, for relative-position biases
    name: str = ""  # a readable label: "layer 3 attention", "layer 3 MatMul(384x1536)"

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "name": self.name,
                **{k: v for k, v in self.site.info.items() if k in ("heads", "head_size", "mask", "in_features",
                                                                     "out_features")}}


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
    names = [n for n, m in METHODS.items() if m.kind == kind]
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
        if not sep or kind not in KINDS or not spec.strip():
            raise UsageError(f"bad --rewrite {item!r}: expected KIND=METHOD[|METHOD...] with KIND one of "
                             f"{', '.join(KINDS)} (e.g. attention=linear:hedgehog)")
        result[kind] = methods_for(kind, spec.replace(",", "|").split("|"))
    return result


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
def find(model: ir.Model, kinds=KINDS, layers: set[int] | None = None, toeplitz: bool = False):
    """The sites approximate rewrites may take, in graph order, and near misses."""
    pattern = AttentionPattern()
    attention: list[Site] = []
    misses: list[NearMiss] = []
    nodes = list(model.graph)
    position = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            result = pattern.core(node, model)
            if isinstance(result, Site):
                attention.append(result)
            elif isinstance(result, str):
                misses.append(NearMiss("attention", "attention", node.name or node.outputs[0].name, result))
    starts = [min((position[p] for p in _feeding_projections(s)), default=position[s.nodes[-1]])
              for s in attention]

    def layer_of(node: ir.Node) -> int | None:
        before = [i for i, start in enumerate(starts) if start <= position[node]]
        return before[-1] if before else None

    sites: list[ApproxSite] = []
    if "attention" in kinds:
        for i, s in enumerate(attention):
            s.index = i
            entry = ApproxSite(f"attention[{i}]", "attention", i, s, name=f"layer {i} attention")
            if toeplitz and s.inputs[3] is not None:
                entry.toeplitz = _match_toeplitz(s.inputs[3], model)
            sites.append(entry)
    if "projection" in kinds:
        count = 0
        for node in nodes:
            result = _projection(node)
            if result is None:
                continue
            if isinstance(result, str):
                misses.append(NearMiss("projection", "projection", node.name or node.outputs[0].name, result))
                continue
            result.index = count
            layer = layer_of(node)
            label = f"layer {layer} " if layer is not None else ""
            sites.append(ApproxSite(f"projection[{count}]", "projection", layer, result,
                                    name=f"{label}MatMul({result.info['in_features']}x{result.info['out_features']})"))
            count += 1
    if layers is not None:
        sites = [s for s in sites if s.layer in layers]
    return sites, misses


def _match_toeplitz(bias: ir.Value, model: ir.Model):
    try:
        from kernelize.patterns.positional import match_toeplitz
    except ImportError:  # pragma: no cover - the positional patterns are optional
        return "relative-position patterns unavailable"
    return match_toeplitz(bias, model)


def _feeding_projections(site: Site) -> list[ir.Node]:
    """The MatMuls by constant weights that Q, K and V come from (through reshapes,
    transposes, bias adds and scalings)."""
    found = []
    for value in site.inputs[:3]:
        for _ in range(8):
            node = producer(value)
            if node is None:
                break
            if node.op_type == "MatMul" and const_array(node.inputs[1]) is not None:
                found.append(node)
                break
            value = node.inputs[0]
    return found


def _projection(node: ir.Node) -> Site | str | None:
    """x @ W (+ b) with a constant 2-D W: a projection site (None: not a MatMul at all)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    x, w = node.inputs
    weight = const_array(w)
    if weight is None:
        if producer(w) is not None and producer(w).op_type == "Transpose" and rank(w) == 4:
            return None  # Q.K^T inside attention: not a projection
        if rank(w) == 2:
            return "projection weight is not a constant: left dense"
        return None
    if weight.ndim != 2 or rank(x) not in (2, 3):
        return None
    nodes, out, bias = [node], node.outputs[0], None
    add = only_user(out, "Add")
    if add is not None and not out.is_graph_output():
        b = const_array(add.inputs[1])
        if b is not None and b.ndim == 1 and b.shape[0] == weight.shape[1]:
            nodes, out, bias = [node, add], add.outputs[0], add.inputs[1]
    info = {"in_features": int(weight.shape[0]), "out_features": int(weight.shape[1]), "bias": bias is not None}
    return Site("projection", "projection", "", nodes, [x, w, bias], [out], {}, info)


# -- capture ------------------------------------------------------------------------------
def capture(model: ir.Model, sites: list[ApproxSite], calib: calibrate.CalibrationSet) -> dict[str, Any]:
    """Each site's activations over all calibration samples: CapturedAttention or
    CapturedProjection by site id. Nodes a site needs (a boolean mask's Where, the
    relative-position vector) are added to ``model`` first."""
    names: list[str] = []
    for s in sites:
        site = s.site
        if s.kind == "attention":
            _insert_feeding_nodes(model, s)
            names += [v.name for v in site.inputs if v is not None]
            if _has_toeplitz(s):
                names += [v.name for v in (s.toeplitz.rel_bias, s.toeplitz.mask) if v is not None]
        else:
            names.append(site.inputs[0].name)
    name_values(model)
    names = list(dict.fromkeys(names))
    values = calibrate.run(model, calib, names=names)
    mask = calib.token_mask()
    captured: dict[str, Any] = {}
    for s in sites:
        site = s.site
        if s.kind == "attention":
            q, k, v, bias = (values[x.name] if x is not None else None for x in site.inputs)
            causal = _is_causal(s)
            # a causal mask is the operators' ``causal`` attribute, not a bias
            entry = CapturedAttention(q, k, v, None if causal else bias, float(site.attrs["scale"]), causal)
            captured[s.id] = entry
            if _has_toeplitz(s):  # what the RPE methods see: the Toeplitz vector and the remaining mask
                rel = values[s.toeplitz.rel_bias.name]
                rel = rel.reshape(rel.shape[-2:]) if rel.ndim > 2 else rel
                mask_value = s.toeplitz.mask
                captured[rpe_key(s.id)] = dataclasses.replace(
                    entry, bias=values[mask_value.name] if mask_value is not None else None, rel_bias=rel,
                    causal=bool(s.toeplitz.causal) or entry.causal, rel_linear=s.toeplitz.source == "alibi",
                    rel_far_from=int(s.toeplitz.info.get("far_from", 0)))
        else:
            x, rows = projection_tokens(values[site.inputs[0].name], mask)
            captured[s.id] = CapturedProjection(x, const_array(site.inputs[1]),
                                                const_array(site.inputs[2]) if site.inputs[2] is not None else None,
                                                rows_per_call=rows)
    return captured


def projection_tokens(x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, int | None]:
    """A projection input's calibration rows ``[tokens, in]`` (padding dropped; a seeded
    subsample of ``MAX_PROJECTION_TOKENS`` beyond that) and the rows one sample holds on
    average (None for a 2-D input)."""
    samples = x.shape[0] if x.ndim == 3 else None
    if x.ndim == 3 and mask is not None and mask.shape == x.shape[:2]:
        x = x[mask]
    x = x.reshape(-1, x.shape[-1])
    rows = max(len(x) // samples, 1) if samples else None
    if len(x) > MAX_PROJECTION_TOKENS:
        x = x[np.sort(np.random.default_rng(0).choice(len(x), MAX_PROJECTION_TOKENS, replace=False))]
    return x, rows


def rpe_key(site_id: str) -> str:
    """Key of a site's activations as the relative-position methods see them."""
    return f"{site_id}/rpe"


def _is_causal(s: ApproxSite) -> bool:
    """The site's mask is exactly the causal one (then it becomes the ``causal`` attribute)."""
    return s.kind == "attention" and s.site.info.get("mask") == "causal"


def _has_toeplitz(s: ApproxSite) -> bool:
    return s.toeplitz is not None and not isinstance(s.toeplitz, str)


def _insert_feeding_nodes(model: ir.Model, s: ApproxSite) -> None:
    """Put the new nodes a site's operator reads (a boolean mask's Where, the nodes computing
    the relative-position vector) into ``model``, once, before the site."""
    groups = [s.site.extra_nodes] + ([s.toeplitz.nodes] if _has_toeplitz(s) else [])
    for nodes in groups:
        if nodes:
            model.graph.insert_before(s.site.nodes[0], nodes)
            _register_constants(model, nodes)
    s.site.extra_nodes = []
    if _has_toeplitz(s):
        s.toeplitz.nodes = []


def _register_constants(model: ir.Model, nodes: list[ir.Node]) -> None:
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.const_value is not None and v.producer() is None and not v.is_initializer():
                ops.base.add_initializer(model.graph, v)


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
def site_shape(s: ApproxSite, captured, batch: int = 1) -> dict[str, int]:
    if s.kind == "attention":
        _, heads, seq, head_size = captured.query.shape
        return {"batch": batch, "heads": heads, "seq": seq, "head_size": head_size}
    tokens = captured.x.shape[0]
    return {"tokens": tokens, "in_features": captured.weight.shape[0], "out_features": captured.weight.shape[1]}


def exact_output(s: ApproxSite, captured) -> np.ndarray:
    if s.kind == "attention":
        return _exact_attention(captured)
    return captured.exact()


def evaluate(s: ApproxSite, captured, fitted: Fitted) -> np.ndarray:
    """The fitted operator's reference output on the site's activations (float64); a
    projection's rows one model call (``rows_per_call``) at a time, as the model runs them."""
    if s.kind == "projection":
        return np.concatenate([fitted.reference(captured.x[part]) for part in captured.calls()]).astype(np.float64)
    return fitted.reference(*site_inputs(s, captured, fitted)).astype(np.float64)


def _exact_attention(c: CapturedAttention) -> np.ndarray:
    bias = c.bias
    if c.causal:
        s, sk = c.query.shape[-2], c.key.shape[-2]
        causal = np.where(np.tril(np.ones((s, sk), bool), sk - s), 0.0, -np.inf)
        bias = causal if bias is None else bias + causal
    return ops.get("Attention").reference(c.query, c.key, c.value, bias, scale=c.scale)


def site_inputs(s: ApproxSite, captured, fitted: Fitted) -> list:
    """The site's own inputs of ``fitted.op`` (before its weights), as arrays."""
    if s.kind == "projection":
        return [captured.x]
    if fitted.op == "RPEAttention":  # ``captured`` is the site's RPE view (see :func:`capture`)
        return [captured.query, captured.key, captured.value, captured.rel_bias, captured.bias]
    return [captured.query, captured.key, captured.value, captured.bias]


def fit_candidates(s: ApproxSite, captured: dict, method_names: list[str], options: dict | None = None,
                   say: Callable[[str], None] = lambda m: None) -> list[Candidate]:
    """Fit each method on the fitting half of the site's activations (``captured`` is the
    dict :func:`capture` returned) and measure the site error on the held-out half."""
    candidates = []
    for name in method_names:
        view = captured.get(rpe_key(s.id)) if name.startswith("rpe:") else captured[s.id]
        if view is None:
            reason = s.toeplitz if isinstance(s.toeplitz, str) else "the attention has no relative-position bias"
            candidates.append(Candidate(s.id, name, None, reason))
            continue
        candidates += _fit(s, view, captured[s.id], [name], options, say)
    return candidates


def _fit(s: ApproxSite, captured, full, method_names: list[str], options: dict | None,
         say: Callable[[str], None]) -> list[Candidate]:
    n = len(captured.query) if s.kind == "attention" else len(captured.x)
    half = (n + 1) // 2 if n > 1 else n
    if s.kind == "attention":
        fit_part, test_part = captured.take(slice(0, half)), captured.take(slice(half, n) if n > 1 else slice(0, n))
    else:  # tokens in sample order: the first half's tokens fit, the rest judge
        fit_part, test_part = captured.take(slice(0, half)), captured.take(slice(half, n) if n > 1 else slice(0, n))
    exact = exact_output(s, full.take(slice(half, n) if n > 1 else slice(0, n)) if s.kind == "attention"
                         else test_part)
    candidates = []
    shape = site_shape(s, captured)
    for name in method_names:
        method = METHODS[name]
        if s.kind == "attention" and captured.causal and not method.causal_ok:
            candidates.append(Candidate(s.id, name, None, "does not support causal attention"))
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
        approx = evaluate(s, test_part, fitted)
        rel = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))
        cost = method.cost(fitted, shape)
        base = exact_attention_cost(shape) if s.kind == "attention" else \
            float(shape["tokens"] * shape["in_features"] * shape["out_features"])
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
        if s.kind == "attention":
            q, k, v, bias = core.inputs
            inputs = [q, k, v, s.toeplitz.rel_bias, s.toeplitz.mask] if fitted.op == "RPEAttention" \
                else [q, k, v, None if _is_causal(s) else bias]
        else:
            inputs = [core.inputs[0]]
        site = Site(s.kind, fitted.method, fitted.op, core.nodes, inputs + weights, core.outputs,
                    dict(fitted.attrs), {}, [], core.index)
        node = apply_site(model, site)
        node.name = f"kernelize/{s.id}/{fitted.method}"
        nodes.append(node)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return nodes


def variant(base: onnx.ModelProto, kinds, layers, toeplitz: bool, choices: dict[str, Fitted]) -> ir.Model:
    """A fresh copy of ``base`` with ``choices`` applied (sites are found again in the copy)."""
    model = ir.from_proto(base)
    sites, _ = find(model, kinds, layers, toeplitz)
    wanted = [s for s in sites if s.id in choices]
    for s in wanted:
        _insert_feeding_nodes(model, s)
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
           tuple(None if w is None else np.shape(w) for w in fitted.inputs),
           tuple(captured.query.shape[1:]) if s.kind == "attention" else tuple(captured.weight.shape))
    if key not in _TIMINGS:
        _TIMINGS[key] = _time_site(s, captured, fitted, seq, runs, threads)
    return _TIMINGS[key]


def _time_site(s: ApproxSite, captured, fitted: Fitted, seq: int | None, runs: int,
               threads: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    if s.kind == "attention":
        _, heads, length, head_size = captured.query.shape
        length = seq or length
        arrays = [rng.standard_normal((1, heads, length, head_size)).astype(np.float32) for _ in range(3)]
        exact_model = _one_node("Attention", arrays + [None], [], {"scale": captured.scale})
        approx_inputs = list(arrays)
        if fitted.op == "RPEAttention":
            rel = np.zeros((heads, 2 * length - 1), np.float32)
            if captured.rel_bias is not None:
                c = captured.rel_bias
                mid = c.shape[-1] // 2
                idx = np.clip(np.arange(-(length - 1), length) + mid, 0, c.shape[-1] - 1)
                rel = c[..., idx].reshape(-1, 2 * length - 1).astype(np.float32)
            approx_inputs += [rel, None]
        else:
            approx_inputs += [None]
        approx_model = _one_node(fitted.op, approx_inputs, fitted.inputs, fitted.attrs)
    else:
        x = rng.standard_normal((seq or 128, captured.weight.shape[0])).astype(np.float32)
        exact_model = _matmul_model(x, captured.weight, captured.bias)
        arrays = [x]
        approx_model = _one_node(fitted.op, [x], fitted.inputs, fitted.attrs)
    feeds = {f"in{i}": a for i, a in enumerate(arrays)}
    sessions = [ort_backend.session(m, threads=threads) for m in (exact_model, approx_model)]
    times = [[], []]
    for _ in range(runs + 1):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, {k: v for k, v in feeds.items() if k in {x.name for x in sess.get_inputs()}})
            times[i].append(time.perf_counter() - start)
    exact_t, approx_t = (float(np.min(t[1:])) * 1e3 for t in times)
    return exact_t, approx_t


def _one_node(op_name: str, site_arrays: list, weights: list, attrs: dict) -> ir.Model:
    """A model of one kernelize operator: the site's arrays are graph inputs, weights are
    initializers."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20}, name=op_name)
    model = ir.Model(graph, ir_version=10)
    values = []
    for i, a in enumerate(site_arrays):
        if a is None:
            values.append(None)
            continue
        if i < 3:  # query, key, value (or a projection's x): graph inputs
            v = ir.Value(name=f"in{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(a.shape))
            graph.inputs.append(v)
        else:
            v = ops.base.add_initializer(graph, ir.Value(name=f"c{i}", const_value=ir.tensor(a)))
        values.append(v)
    for i, w in enumerate(weights):
        values.append(None if w is None else
                      ops.base.add_initializer(graph, ir.Value(name=f"w{i}", const_value=ir.tensor(np.asarray(w)))))
    node = ops.get(op_name).make_node(model, values, attrs)
    graph.append(node)
    node.outputs[0].name = "out"
    graph.outputs.append(node.outputs[0])
    return model


def _matmul_model(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> ir.Model:
    xv = ir.Value(name="in0", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x.shape))
    graph = ir.Graph([xv], [], nodes=[], opset_imports={"": 20}, name="dense")
    w = ops.base.add_initializer(graph, ir.Value(name="w", const_value=ir.tensor(weight.astype(np.float32))))
    node = ir.Node("", "MatMul", [xv, w], num_outputs=1)
    graph.append(node)
    out = node.outputs[0]
    if bias is not None:
        b = ops.base.add_initializer(graph, ir.Value(name="b", const_value=ir.tensor(bias.astype(np.float32))))
        add = ir.Node("", "Add", [out, b], num_outputs=1)
        graph.append(add)
        out = add.outputs[0]
    out.name = "out"
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10)

