"""What a site kind provides to the approximate pass, and the table the pass looks kinds up in.

A site kind (attention, projection, and the ones to come) is a strategy: it finds its sites
in the canonical model, names the values to capture there and turns them into the activations
its methods are fitted on, gives the site's exact output, its shape and exact cost, evaluates
a fitted operator on the activations, wires the operator's inputs in the graph and builds the
one-node models its speed is timed with. :mod:`kernelize.passes.approximate` and
:mod:`kernelize.passes.select` only call these through :data:`KINDS`; they never ask which kind
a site is.

A fitted operator names the site inputs it reads (:attr:`kernelize.methods.base.Fitted.reads`,
None: the kind's :attr:`SiteKind.reads`); each kind says what those names are, as arrays of
the captured activations and as values of the graph.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from kernelize import ops
from kernelize.methods.base import Fitted, Method
from kernelize.patterns.site import NearMiss, Site

KINDS: dict[str, "SiteKind"] = {}  # by name, in registration order (the order sites are listed in)


@dataclasses.dataclass
class ApproxSite:
    """A site an approximate rewrite may replace."""

    id: str  # "attention[3]", "projection[12]"
    kind: str
    layer: int | None  # transformer layer (attention order), None when unknown
    site: Site
    toeplitz: Any = None  # attention: kernelize.patterns.positional.Toeplitz, or why the bias is not one
    name: str = ""  # a readable label: "layer 3 attention", "layer 3 MatMul(384x1536)"

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "name": self.name,
                **{k: v for k, v in self.site.info.items() if k in ("heads", "head_size", "mask", "in_features",
                                                                     "out_features")}}


class Scan:
    """One walk over the model's nodes for the kinds' :meth:`SiteKind.find`: the nodes in graph
    order, their positions, and the layer a node belongs to once a kind that numbers the layers
    has set :attr:`starts`. ``reads``: the site inputs some candidate method reads (a kind
    prepares only what is read)."""

    def __init__(self, model: ir.Model, reads=()):
        self.model = model
        self.nodes = list(model.graph)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.reads = frozenset(reads)
        self.starts: list[int] = []  # graph position where each layer starts

    def layer_of(self, node: ir.Node) -> int | None:
        before = [i for i, start in enumerate(self.starts) if start <= self.position[node]]
        return before[-1] if before else None


class SiteKind(abc.ABC):
    """One kind of site; a subclass that names itself is registered in :data:`KINDS`."""

    name: ClassVar[str]
    site_inputs: ClassVar[tuple[str, ...]]  # every site input an operator may read (:meth:`arrays`, :meth:`graph_inputs`)
    reads: ClassVar[tuple[str, ...]]  # the site inputs an operator reads unless its Fitted names others
    numbers_layers: ClassVar[bool] = False  # its sites number the layers: found first, whatever is asked for
    sequential: ClassVar[bool] = False  # chosen rewrites may be refit in model order (sequential calibration)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            KINDS[cls.name] = cls()

    # -- finding and capturing ----------------------------------------------------------
    @abc.abstractmethod
    def find(self, scan: Scan) -> tuple[list[ApproxSite], list[NearMiss]]:
        """The kind's sites in graph order, and its near misses."""

    def prepare(self, model: ir.Model, s: ApproxSite) -> None:
        """Put the nodes the site's operator reads, that the model lacks, into ``model`` (once)."""

    @abc.abstractmethod
    def capture_names(self, s: ApproxSite) -> list[str]:
        """The values to fetch from the model (after :meth:`prepare`)."""

    @abc.abstractmethod
    def capture(self, s: ApproxSite, values: dict, mask: np.ndarray | None) -> dict[str, Any]:
        """The site's activations from the fetched ``values`` (``mask``: [N, S] real tokens):
        ``{s.id: activations}``, plus other views of them under keys of the kind's own."""

    def view(self, captured: dict, s: ApproxSite, method: Method) -> Any:
        """The activations ``method`` is fitted on, or a string saying why it does not apply."""
        return captured[s.id]

    def refuses(self, method: Method, captured) -> str | None:
        """Why ``method`` cannot take the site at all (before fitting), or None."""
        return None

    # -- exact and fitted outputs -------------------------------------------------------
    @abc.abstractmethod
    def shape(self, captured, batch: int = 1) -> dict[str, int]:
        """The sizes cost estimates take (``Method.cost``)."""

    @abc.abstractmethod
    def exact_cost(self, shape: dict[str, int]) -> float:
        """Multiply-adds of the exact computation at ``shape``."""

    @abc.abstractmethod
    def exact_output(self, captured) -> np.ndarray:
        """The site's exact output on ``captured``."""

    @abc.abstractmethod
    def arrays(self, captured) -> dict[str, np.ndarray | None]:
        """The site inputs by name, as arrays of ``captured``."""

    def evaluate(self, captured, fitted: Fitted) -> np.ndarray:
        """The fitted operator's reference on ``captured`` (float64)."""
        arrays = self.arrays(captured)
        return fitted.reference(*[arrays[n] for n in self.reads_of(fitted)]).astype(np.float64)

    def reads_of(self, fitted: Fitted) -> tuple[str, ...]:
        return fitted.reads or self.reads

    # -- the graph ----------------------------------------------------------------------
    @abc.abstractmethod
    def graph_inputs(self, s: ApproxSite) -> dict[str, ir.Value | None]:
        """The site inputs by name, as values of the graph."""

    def operator_inputs(self, s: ApproxSite, fitted: Fitted) -> list[ir.Value | None]:
        """The values the fitted operator reads before its weights."""
        values = self.graph_inputs(s)
        return [values[n] for n in self.reads_of(fitted)]

    # -- timing -------------------------------------------------------------------------
    @abc.abstractmethod
    def timing_key(self, captured) -> tuple:
        """What besides the operator decides its timing (cached per key)."""

    @abc.abstractmethod
    def timing_models(self, captured, fitted: Fitted, seq: int | None) -> tuple[ir.Model, ir.Model, dict]:
        """(exact model, fitted operator's model, feeds) at batch 1, ``seq`` tokens or query
        positions (the captured length when None)."""


def get(kind: str) -> SiteKind:
    return KINDS[kind]


def one_node(op_name: str, site_arrays: list, weights: list, attrs: dict) -> ir.Model:
    """A model of one kernelize operator: the site's first three arrays (query, key, value, or
    a projection's x) are graph inputs ``in0..in2``, its others and the weights initializers."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20}, name=op_name)
    model = ir.Model(graph, ir_version=10)
    values = []
    for i, a in enumerate(site_arrays):
        if a is None:
            values.append(None)
            continue
        if i < 3:
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
