"""Match the built-in patterns and replace each site by its fused operator.

Matching is linear in graph size: patterns are indexed by root op type, each node is
visited once per phase, and a node already claimed by a site is never matched again.
"""

from __future__ import annotations

import onnx_ir as ir

from kernelize import ops
from kernelize.patterns.registry import BUILTIN_PATTERNS
from kernelize.patterns.site import NearMiss, Pattern, Site


def find_sites(model: ir.Model, patterns: list[Pattern] | None = None, phase: int | None = None):
    """All sites and near misses, without changing the model."""
    patterns = BUILTIN_PATTERNS if patterns is None else patterns
    by_root: dict[str, list[Pattern]] = {}
    for p in patterns:
        if phase is None or p.phase == phase:
            for root in p.roots:
                by_root.setdefault(root, []).append(p)
    sites: list[Site] = []
    misses: list[NearMiss] = []
    claimed: set[ir.Node] = set()
    for node in model.graph:
        if node in claimed or node.domain not in ("", "ai.onnx"):
            continue
        for pattern in by_root.get(node.op_type, ()):
            result = pattern.match(node, model)
            if result is None:
                continue
            if isinstance(result, str):
                misses.append(NearMiss(pattern.kind, pattern.name, node.name or node.outputs[0].name, result))
                continue
            if claimed.intersection(result.nodes):
                misses.append(NearMiss(pattern.kind, pattern.name, node.name or node.outputs[0].name,
                                       "overlaps a site already taken"))
                continue
            claimed.update(result.nodes)
            sites.append(result)
            break
    return sites, misses


def apply_site(model: ir.Model, site: Site, moved: dict[ir.Value, ir.Value] | None = None) -> ir.Node | None:
    """Replace the site's nodes with one node of its operator.

    Sites of one phase are matched before any is applied, so a site may name a value that
    an earlier rewrite replaced: ``moved`` maps each replaced value to its replacement (and
    is extended with this site's outputs).
    """
    graph = model.graph
    if not site.nodes:
        return None  # recognized, already in fused form
    position = site.outputs[0].producer()  # a site's first output is its last computation
    moved = {} if moved is None else moved
    site.inputs = [_current(v, moved) for v in site.inputs]
    for extra in site.extra_nodes:
        for i, v in enumerate(extra.inputs):
            if v is not None and v in moved:
                extra.replace_input_with(i, _current(v, moved))
    if site.op.startswith("onnx::"):
        op_type = site.op.split("::", 1)[1]
        inputs = list(site.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        node = ir.Node("", op_type, inputs, num_outputs=len(site.outputs),
                       attributes=[ir.convenience.convert_attribute(k, v) for k, v in site.attrs.items()])
    else:
        node = ops.get(site.op).make_node(model, list(site.inputs), site.attrs)
    new_values = list(site.inputs) + [v for extra in site.extra_nodes for v in extra.inputs]
    for v in new_values:  # constants a pattern created (zero bias, mask fill values)
        if v is not None and v.const_value is not None and v.producer() is None and not v.is_initializer():
            ops.base.add_initializer(graph, v)
    graph.insert_before(position, [*site.extra_nodes, node])
    pairs = [(old, new, old.name) for old, new in zip(site.outputs, node.outputs) if old is not None]
    for old, new, _ in pairs:
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        moved[old] = new
    graph.remove(list(set(site.nodes)), safe=True)
    for old, new, name in pairs:
        new.name, new.shape, new.type = name, old.shape, old.type
    return node


def _current(value: ir.Value | None, moved: dict) -> ir.Value | None:
    while value is not None and value in moved:
        value = moved[value]
    return value


def fuse(model: ir.Model, kinds: set[str] | None = None) -> tuple[list[Site], list[NearMiss]]:
    """Match and rewrite in two phases; return the sites (in graph order per kind) and the
    near misses. A phase-1 site built on a phase-0 result (a residual Add in front of a
    LayerNorm that was decomposed) absorbs it, so each norm is reported once."""
    applied: list[Site] = []
    misses: list[NearMiss] = []
    made_by: dict[ir.Node, Site] = {}
    moved: dict[ir.Value, ir.Value] = {}
    for phase in (0, 1):
        sites, phase_misses = find_sites(model, phase=phase)
        misses += phase_misses
        for site in sites:
            if kinds is not None and site.kind not in kinds:
                continue
            if not site.nodes and site.outputs and site.outputs[0].producer() in made_by:
                continue  # the standard op a phase-0 site just produced: reported there
            for n in site.nodes:
                earlier = made_by.pop(n, None)
                if earlier is not None:
                    applied.remove(earlier)
                    site.info["decomposed"] = True
            node = apply_site(model, site, moved)
            if node is not None:
                made_by[node] = site
            applied.append(site)
    _number(applied, {id(site): node for node, site in made_by.items()})
    return applied, misses


def _number(sites: list[Site], nodes: dict[int, ir.Node]) -> None:
    """Index the sites per kind in the order they were taken and name their nodes by it (a
    site absorbed by a later phase leaves no gap and no duplicate name)."""
    counters: dict[str, int] = {}
    for site in sites:
        site.index = counters.get(site.kind, 0)
        counters[site.kind] = site.index + 1
        if id(site) in nodes:
            nodes[id(site)].name = f"kernelize/{site.id}"
