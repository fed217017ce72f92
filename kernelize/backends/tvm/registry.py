"""TVM lowerings of the kernelize operators, registered by operator name.

One module per operator in ``kernelize/backends/tvm/lower/`` holds its lowering::

    @lowering("RMSNorm")
    def rms_norm(bb, inputs, attrs):
        ...

``bb`` is the Relax ONNX frontend's BlockBuilder, ``inputs`` the node's inputs aligned to the
operator's schema (``None`` for an absent optional input), ``attrs`` its attributes converted
to the types ``Operator.attributes`` declares. A lowering returns one Relax expression, or a
list of them for an operator with several outputs. The frontend looks lowerings up here by
operator name; an operator without one cannot be built with TVM.
"""

from __future__ import annotations

import importlib
from typing import Callable

Lowering = Callable[..., object]
_LOWERINGS: dict[str, Lowering] = {}


def lowering(name: str) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the TVM lowering of operator ``name``."""

    def register(fn: Lowering) -> Lowering:
        if name in _LOWERINGS and _LOWERINGS[name] is not fn:
            raise ValueError(f"a TVM lowering of {name} is already registered ({_LOWERINGS[name].__module__})")
        _LOWERINGS[name] = fn
        return fn

    return register


def _load() -> None:
    importlib.import_module("kernelize.backends.tvm.lower")  # its modules register themselves


def lookup(name: str) -> Lowering | None:
    """The TVM lowering of operator ``name``, None when it has none."""
    _load()
    return _LOWERINGS.get(name)


def registered() -> dict[str, Lowering]:
    """Operator name -> TVM lowering, for every registered one."""
    _load()
    return dict(_LOWERINGS)
