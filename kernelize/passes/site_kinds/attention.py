"""Attention sites: a Softmax-anchored core on head-split Q, K, V (and its additive mask).

Site inputs an operator may read: ``query``, ``key``, ``value``; ``bias``, the whole additive
mask (None when the mask is exactly the causal one: then the operator's ``causal`` attribute
says it); and, where the bias was proven a Toeplitz relative-position bias plus a mask
(:mod:`kernelize.patterns.positional`), ``rel_bias`` (the vector ``[H, 2S-1]``) and ``mask``
(what is left beside it). An operator that reads ``rel_bias`` is fitted on the positional view
of the activations: the same Q, K, V with ``bias`` = that remaining mask, ``rel_bias`` and the
Toeplitz match's causality. The attention sites number the layers: a layer starts at the first
projection feeding its Q, K or V.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from kernelize import ops
from kernelize.graph import const_array, producer
from kernelize.methods.base import CapturedAttention, Fitted, Method, exact_attention_cost
from kernelize.ops.attention import exact_attention
from kernelize.patterns.attention import AttentionPattern
from kernelize.patterns.site import NearMiss, Site
from kernelize.passes.site_kinds.base import ApproxSite, Scan, SiteKind, one_node


def positional_key(site_id: str) -> str:
    """Key of a site's positional view in the captured activations."""
    return f"{site_id}/rpe"


class AttentionKind(SiteKind):
    name = "attention"
    site_inputs = ("query", "key", "value", "bias", "rel_bias", "mask")
    reads = ("query", "key", "value", "bias")
    numbers_layers = True

    def find(self, scan: Scan):
        pattern = AttentionPattern()
        cores, misses = [], []
        for node in scan.nodes:
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                result = pattern.core(node, scan.model)
                if isinstance(result, Site):
                    cores.append(result)
                elif isinstance(result, str):
                    misses.append(NearMiss("attention", "attention", node.name or node.outputs[0].name, result))
        scan.starts = [min((scan.position[p] for p in _feeding_projections(s)), default=scan.position[s.nodes[-1]])
                       for s in cores]
        sites = []
        for i, core in enumerate(cores):
            core.index = i
            entry = ApproxSite(f"attention[{i}]", "attention", i, core, name=f"layer {i} attention")
            if "rel_bias" in scan.reads and core.inputs[3] is not None:
                entry.toeplitz = _match_toeplitz(core.inputs[3], scan.model)
            sites.append(entry)
        return sites, misses

    def prepare(self, model, s):
        """The new nodes the operator reads (a boolean mask's Where, the nodes computing the
        relative-position vector), before the site."""
        groups = [s.site.extra_nodes] + ([s.toeplitz.nodes] if _has_toeplitz(s) else [])
        for nodes in groups:
            if nodes:
                model.graph.insert_before(s.site.nodes[0], nodes)
                _register_constants(model, nodes)
        s.site.extra_nodes = []
        if _has_toeplitz(s):
            s.toeplitz.nodes = []

    def capture_names(self, s):
        names = [v.name for v in s.site.inputs if v is not None]
        if _has_toeplitz(s):
            names += [v.name for v in (s.toeplitz.rel_bias, s.toeplitz.mask) if v is not None]
        return names

    def capture(self, s, values, mask):
        q, k, v, bias = (values[x.name] if x is not None else None for x in s.site.inputs)
        causal = _is_causal(s)
        # a causal mask is the operators' ``causal`` attribute, not a bias
        entry = CapturedAttention(q, k, v, None if causal else bias, float(s.site.attrs["scale"]), causal)
        captured = {s.id: entry}
        if _has_toeplitz(s):  # the positional view: the Toeplitz vector and the remaining mask
            t = s.toeplitz
            rel = values[t.rel_bias.name]
            rel = rel.reshape(rel.shape[-2:]) if rel.ndim > 2 else rel
            captured[positional_key(s.id)] = dataclasses.replace(
                entry, bias=values[t.mask.name] if t.mask is not None else None, rel_bias=rel,
                causal=bool(t.causal) or entry.causal, rel_linear=t.source == "alibi",
                rel_far_from=int(t.info.get("far_from", 0)))
        return captured

    def view(self, captured, s, method: Method):
        if "rel_bias" not in (method.reads or self.reads):
            return captured[s.id]
        view = captured.get(positional_key(s.id))
        if view is None:
            return s.toeplitz if isinstance(s.toeplitz, str) else "the attention has no relative-position bias"
        return view

    def refuses(self, method, captured):
        if captured.causal and not method.causal_ok:
            return "does not support causal attention"
        return None

    def shape(self, captured, batch=1):
        _, heads, seq, head_size = captured.query.shape
        return {"batch": batch, "heads": heads, "seq": seq, "head_size": head_size}

    def exact_cost(self, shape):
        return exact_attention_cost(shape)

    def exact_output(self, captured):
        c = captured
        return exact_attention(c.query, c.key, c.value, c.bias, scale=c.scale, causal=c.causal).astype(np.float32)

    def arrays(self, captured):
        # in the positional view ``bias`` holds the mask beside the Toeplitz term
        return {"query": captured.query, "key": captured.key, "value": captured.value, "bias": captured.bias,
                "rel_bias": captured.rel_bias, "mask": captured.bias}

    def graph_inputs(self, s):
        q, k, v, bias = s.site.inputs
        t = s.toeplitz if _has_toeplitz(s) else None
        return {"query": q, "key": k, "value": v, "bias": None if _is_causal(s) else bias,
                "rel_bias": t.rel_bias if t is not None else None, "mask": t.mask if t is not None else None}

    def timing_key(self, captured):
        return tuple(captured.query.shape[1:])

    def timing_models(self, captured, fitted: Fitted, seq):
        rng = np.random.default_rng(0)
        _, heads, length, head_size = captured.query.shape
        length = seq or length
        arrays = [rng.standard_normal((1, heads, length, head_size)).astype(np.float32) for _ in range(3)]
        exact_model = one_node("Attention", arrays + [None], [], {"scale": captured.scale})
        timing = dict(zip(("query", "key", "value"), arrays), bias=None, mask=None)
        reads = self.reads_of(fitted)
        if "rel_bias" in reads:
            timing["rel_bias"] = _timing_rel_bias(captured, heads, length)
        approx_model = one_node(fitted.op, [timing[n] for n in reads], fitted.inputs, fitted.attrs)
        return exact_model, approx_model, {f"in{i}": a for i, a in enumerate(arrays)}


def _timing_rel_bias(captured, heads: int, length: int) -> np.ndarray:
    """A Toeplitz vector for ``length`` positions: the captured one's offsets resampled, or 0."""
    rel = np.zeros((heads, 2 * length - 1), np.float32)
    if captured.rel_bias is not None:
        c = captured.rel_bias
        mid = c.shape[-1] // 2
        idx = np.clip(np.arange(-(length - 1), length) + mid, 0, c.shape[-1] - 1)
        rel = c[..., idx].reshape(-1, 2 * length - 1).astype(np.float32)
    return rel


def _match_toeplitz(bias: ir.Value, model: ir.Model):
    try:
        from kernelize.patterns.positional import match_toeplitz
    except ImportError:  # pragma: no cover - the positional patterns are optional
        return "relative-position patterns unavailable"
    return match_toeplitz(bias, model)


def _feeding_projections(site) -> list[ir.Node]:
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


def _is_causal(s: ApproxSite) -> bool:
    """The site's mask is exactly the causal one (then it becomes the ``causal`` attribute)."""
    return s.site.info.get("mask") == "causal"


def _has_toeplitz(s: ApproxSite) -> bool:
    return s.toeplitz is not None and not isinstance(s.toeplitz, str)


def _register_constants(model: ir.Model, nodes: list[ir.Node]) -> None:
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.const_value is not None and v.producer() is None and not v.is_initializer():
                ops.base.add_initializer(model.graph, v)
