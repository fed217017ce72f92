"""What every kernelize-domain operator provides, and how its function body is attached."""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Callable, ClassVar, Sequence

import numpy as np
import onnx_ir as ir

DOMAIN = "kernelize"
DOMAIN_VERSION = 1
_REGISTRY: dict[str, "Operator"] = {}


class Operator(abc.ABC):
    """Base of the operator definitions in ``kernelize/ops``: the contract every operator keeps.

    Required: :attr:`name`, :attr:`inputs` (names; a trailing ``?`` marks an optional
    input), :attr:`attributes` (name -> Python type), :attr:`outputs` (default one, ``Y``),
    :meth:`reference` (NumPy) and :meth:`body` (standard ONNX ops, so any runtime can run the
    model). Optional: :meth:`lower_ort`, a faster ONNX Runtime form (the default keeps the
    body). Nothing else: an operator module knows no compiler backend. A backend that compiles
    the operators keeps its lowerings itself, registered by operator name (TVM:
    ``kernelize.backends.tvm.registry``, one module per operator in
    ``kernelize/backends/tvm/lower/``), and treats an operator it has no lowering for as
    unsupported.
    """

    name: ClassVar[str]
    inputs: ClassVar[Sequence[str]]
    outputs: ClassVar[Sequence[str]] = ("Y",)
    attributes: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete operator names itself; shared bases do not
            _REGISTRY[cls.name] = cls()

    # -- the four parts -------------------------------------------------------------
    @abc.abstractmethod
    def reference(self, *inputs: np.ndarray | None, **attrs) -> np.ndarray:
        """NumPy semantics of the operator (float64 inside, float32 out)."""

    @abc.abstractmethod
    def body(self, tape: ir.tape.Tape, inputs: list[ir.Value | None], attrs: dict) -> list[ir.Value]:
        """Emit the standard-op computation into ``tape``; return the outputs."""

    def lower_ort(self, node: ir.Node, graph: ir.Graph) -> bool:
        """Replace ``node`` by ONNX Runtime kernels; False keeps the function body."""
        return False

    # -- helpers shared by all operators ----------------------------------------------
    def overload(self, attrs: dict) -> str:
        """One function per attribute set: the overload id names it."""
        text = json.dumps({k: attrs[k] for k in sorted(attrs)}, sort_keys=True, default=float)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def function(self, attrs: dict, present: Sequence[bool]) -> ir.Function:
        """The ONNX function body for one attribute set and one set of present inputs."""
        names = [n.rstrip("?") for n, p in zip(self.inputs, present) if p]
        params = [ir.Value(name=n) for n in names]
        tape = ir.tape.Tape()
        it = iter(params)
        args = [next(it) if p else None for p in present]
        outs = self.body(tape, args, attrs)
        for value, name in zip(outs, self.outputs):
            value.name = name
        graph = ir.Graph(params, outs, nodes=tape.nodes, opset_imports={"": 20},
                         name=f"{self.name}_{self.overload(attrs)}")
        return ir.Function(DOMAIN, self.name, self.function_overload(attrs, present),
                           graph=graph, attributes=[])

    def function_overload(self, attrs: dict, present: Sequence[bool]) -> str:
        mask = "".join("1" if p else "0" for p in present)
        return f"{self.overload(attrs)}_{mask}"

    def make_node(self, model: ir.Model, inputs: list[ir.Value | None], attrs: dict,
                  outputs: Sequence[ir.Value] | None = None, name: str | None = None) -> ir.Node:
        """A call of this operator, with its function body registered in ``model``."""
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        present = [v is not None for v in inputs] + [False] * (len(self.inputs) - len(inputs))
        overload = self.function_overload(attrs, present)
        key = (DOMAIN, self.name, overload)
        if key not in model.functions:
            model.functions[key] = self.function(attrs, present)
        model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
        call_inputs = [v for v in inputs if v is not None]
        node = ir.Node(DOMAIN, self.name, call_inputs, overload=overload,
                       outputs=outputs, num_outputs=None if outputs else len(self.outputs),
                       name=name)
        for k, v in attrs.items():
            node.attributes[k] = ir.convenience.convert_attribute(k, v)
        return node


def attributes_of(node: ir.Node) -> dict:
    return {k: a.value if not isinstance(a.value, tuple) else list(a.value) for k, a in node.attributes.items()}


def get(name: str) -> Operator:
    return _REGISTRY[name]


def registered() -> dict[str, Operator]:
    return dict(_REGISTRY)


def const(tape: ir.tape.Tape, array, dtype=np.float32) -> ir.Value:
    """A Constant node in ``tape`` holding ``array``."""
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(array, dtype=dtype))})


def function_inputs(node: ir.Node, op: Operator) -> list[ir.Value | None]:
    """The node's inputs aligned to the operator's schema (absent optional -> None)."""
    mask = node.overload.rsplit("_", 1)[-1]
    it = iter(node.inputs)
    return [next(it) if flag == "1" else None for flag in mask]


def add_initializer(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """Register ``value`` (with a const_value) as an initializer of ``graph``."""
    tensor = value.const_value
    value.shape, value.type = ir.Shape(tensor.shape), ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value


def swap_in(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put ``new_nodes`` in place of ``old``; the last new node's first output takes over
    ``old``'s first output (uses, graph-output role and name)."""
    out = old.outputs[0]
    replacement = new_nodes[-1].outputs[0]
    graph.insert_before(old, new_nodes)
    ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
    name = out.name
    graph.remove(old, safe=True)
    replacement.name = name
    replacement.shape, replacement.type = out.shape, out.type


def emit_length_dispatch(tape: ir.tape.Tape, query: ir.Value, exact_below: int,
                         exact: Callable[[ir.tape.Tape], ir.Value],
                         approximate: Callable[[ir.tape.Tape], ir.Value]) -> ir.Value:
    """``exact`` below ``exact_below`` query positions (axis -2 of ``query``), else
    ``approximate``: an ONNX ``If`` whose branches each emit into their own tape.
    With ``exact_below <= 0`` only the approximate computation is emitted."""
    if exact_below <= 0:
        return approximate(tape)
    branches = {}
    for key, emit in (("then_branch", exact), ("else_branch", approximate)):
        sub = ir.tape.Tape()
        out = emit(sub)
        for i, node in enumerate(sub.nodes):  # unique names: the branches share one scope
            for j, value in enumerate(node.outputs):
                value.name = f"{key}_{i}_{j}"
        branches[key] = ir.Graph([], [out], nodes=sub.nodes, name=key)
    shape = tape.op("Shape", [query], {"start": -2, "end": -1})
    length = tape.op("Squeeze", [shape, const(tape, [0], np.int64)])
    short = tape.op("Less", [length, const(tape, exact_below, np.int64)])
    return tape.op("If", [short], branches)
