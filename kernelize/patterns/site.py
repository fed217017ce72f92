"""A site is one match of a pattern in one model; a near miss says why one was not taken."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import onnx_ir as ir


@dataclasses.dataclass
class Site:
    """One match: the nodes it covers, the operator that replaces them and its bindings.

    ``inputs`` follow the operator's schema; ``outputs`` are the original values the
    operator's outputs take over (None where the operator output has no counterpart).
    """

    kind: str  # "attention" | "normalization" | "ffn"
    pattern: str
    op: str  # kernelize operator, or "onnx::<OpType>" for a standard ONNX op
    nodes: list[ir.Node]
    inputs: list[ir.Value | None]
    outputs: list[ir.Value | None]
    attrs: dict[str, Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_nodes: list[ir.Node] = dataclasses.field(default_factory=list)  # new nodes feeding inputs
    index: int = -1  # position among sites of its kind (set by the matcher)

    @property
    def id(self) -> str:
        return f"{self.kind}[{self.index}]"

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "pattern": self.pattern, "rewrite": self.op,
            "output": self.outputs[0].name if self.outputs and self.outputs[0] is not None else None,
            "nodes": len(self.nodes), **self.info,
        }


@dataclasses.dataclass
class NearMiss:
    kind: str
    pattern: str
    node: str
    reason: str

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Pattern:
    """A built-in pattern: ``match(node)`` on nodes whose op type is in ``roots``.

    Returns a :class:`Site`, a string (the reason a near miss was not taken), or None
    when the node does not look like this pattern at all.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    roots: ClassVar[Sequence[str]]
    phase: ClassVar[int] = 1  # phase-0 patterns run first (they produce standard ops others match)

    def match(self, node: ir.Node, model: ir.Model) -> Site | str | None:
        raise TypeError(f"{type(self).__name__} must define match()")
