"""What an approximation method provides, and the activations it is calibrated on."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np

METHODS: dict[str, "Method"] = {}


@dataclasses.dataclass
class CapturedAttention:
    """One attention site's inputs over the calibration samples (head-split tensors).

    ``bias`` is the additive mask as the model computes it, broadcastable to
    ``[N, H, S, Sk]`` (0 keeps, a large negative number drops), or None.
    """

    query: np.ndarray  # [N, H, S, D] float32
    key: np.ndarray  # [N, H, Sk, D]
    value: np.ndarray  # [N, H, Sk, Dv]
    bias: np.ndarray | None
    scale: float
    causal: bool  # the mask is the causal one (possibly plus padding)
    rel_bias: np.ndarray | None = None  # [H, 2S-1] Toeplitz relative-position bias, when the site has one
    rel_linear: bool = False  # the pattern proved rel_bias linear in the offset at every length (ALiBi)
    rel_far_from: int = 0  # the pattern found rel_bias constant beyond this offset on each side (T5), or 0

    @property
    def count(self) -> int:
        """How many samples :meth:`take` indexes."""
        return len(self.query)

    def take(self, index) -> "CapturedAttention":
        """The samples ``index`` (a slice or index array over N)."""
        bias = None
        if self.bias is not None:
            bias = self.bias[index] if self.bias.shape[0] == self.query.shape[0] else self.bias
        return dataclasses.replace(self, query=self.query[index], key=self.key[index],
                                   value=self.value[index], bias=bias)


@dataclasses.dataclass
class CapturedProjection:
    """One projection site ``y = x @ weight + bias`` over the calibration samples.

    ``rows_per_call``: how many consecutive rows of ``x`` one model call sees (one
    calibration sample), for methods whose quantization depends on the whole tensor of a
    call. Fits match ``x @ weight + bias`` also when ``x`` comes from a model whose earlier
    sites are rewritten (sequential calibration): regressing on the original model's output
    instead shrinks the weights (the upstream error in ``x`` is noise uncorrelated with it),
    and moving the bias by the mean drift, though it lowered each site's own error, made
    MiniLM's combined error 30x worse.
    """

    x: np.ndarray  # [tokens, in_features] float32 (padding tokens removed)
    weight: np.ndarray  # [in_features, out_features]
    bias: np.ndarray | None  # [out_features]
    rows_per_call: int | None = None

    @property
    def count(self) -> int:
        """How many tokens :meth:`take` indexes."""
        return len(self.x)

    def take(self, index) -> "CapturedProjection":
        """The tokens ``index`` (a slice or index array)."""
        return dataclasses.replace(self, x=self.x[index])

    def calls(self) -> list[slice]:
        """The rows of ``x`` one model call at a time (all at once without ``rows_per_call``)."""
        step = max(self.rows_per_call or len(self.x), 1)
        return [slice(start, start + step) for start in range(0, len(self.x), step)]

    def exact(self) -> np.ndarray:
        """The site's exact output on ``x``: ``x @ weight + bias`` (float64)."""
        y = np.asarray(self.x, np.float64) @ np.asarray(self.weight, np.float64)
        return y + self.bias if self.bias is not None else y


@dataclasses.dataclass
class Fitted:
    """A calibrated operator call for one site.

    ``reads`` names the site's own inputs the operator reads, in its schema order (None: its
    site kind's usual ones, attention ``query, key, value, bias``, projection ``x``; the site
    kinds, :mod:`kernelize.passes.site_kinds`, say what each name is). ``inputs`` are the
    weights that follow them in the schema, None for an absent optional one. ``info`` is shown
    in the report (features, window, recall, ...).
    """

    method: str
    op: str
    attrs: dict[str, Any]
    inputs: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    reads: tuple[str, ...] | None = None

    def reference(self, *site_inputs):
        """The operator's NumPy reference on the site's inputs."""
        from kernelize import ops

        return ops.get(self.op).reference(*site_inputs, *self.inputs, **self.attrs)


class Method(abc.ABC):
    """One approximation, e.g. ``linear:hedgehog`` or ``sparse:window``.

    ``kind`` is the site kind it applies to ("attention" or "projection"); ``reads`` the site
    inputs its operator reads (None: the kind's usual ones; see :class:`Fitted`). A class that
    names itself is registered on definition; a family of methods that differ only in
    parameters registers one instance per entry of its table (:func:`register`).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    causal_ok: ClassVar[bool] = True  # can handle a causal site
    reads: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete method names itself; shared bases do not
            register(cls())

    @abc.abstractmethod
    def fit(self, captured, **options) -> Fitted | str:
        """Calibrate on ``captured``; a string says why the method does not apply."""

    @abc.abstractmethod
    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        """Multiply-adds of one call at ``shape`` (attention: batch, heads, seq, head_size;
        projection: tokens, in_features, out_features)."""


def register(method: Method) -> Method:
    """Make ``method`` available by its name (in :data:`METHODS`)."""
    METHODS[method.name] = method
    return method


def methods_of(kind: str) -> list[str]:
    """Names of the methods for sites of ``kind``, in registration order."""
    return [name for name, method in METHODS.items() if method.kind == kind]


def exact_attention_cost(shape: dict[str, int]) -> float:
    """Multiply-adds of exact attention: Q K^T and P V."""
    b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_size"]
    return 2.0 * b * h * s * s * d
