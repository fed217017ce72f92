"""The built-in patterns, and the public way to add a rewrite of one's own.

A custom rewrite is an onnxscript rewrite rule (a pattern function, a replacement
function and an optional check) plus a flag saying whether it is exact. Plugins installed
with pip register rewrites through the entry-point group ``kernelize.rewrites``: each entry
point names a :class:`Rewrite` or a function returning a list of them.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Callable

from kernelize.errors import KernelizeError
from kernelize.patterns.attention import AttentionPattern
from kernelize.patterns.ffn import FeedForwardPattern, SwiGLUPattern
from kernelize.patterns.normalization import DecomposedLayerNorm, DecomposedRMSNorm, SkipLayerNormPattern
from kernelize.patterns.site import Pattern

ENTRY_POINT_GROUP = "kernelize.rewrites"

BUILTIN_PATTERNS: list[Pattern] = [
    DecomposedLayerNorm(), DecomposedRMSNorm(),
    AttentionPattern(), FeedForwardPattern(), SwiGLUPattern(), SkipLayerNormPattern(),
]


@dataclasses.dataclass
class Rewrite:
    """A user rewrite: ``pattern`` and ``replacement`` are onnxscript pattern functions
    (``def pattern(op, x, ...)``); ``check(context, **bindings)`` may veto a match.

    ``exact=True`` promises equal outputs up to float rounding; kernelize verifies it and
    rejects the rewrite if it does not hold. Approximate rewrites have their error reported.
    """

    name: str
    pattern: Callable
    replacement: Callable
    exact: bool = True
    check: Callable | None = None
    kind: str = "custom"

    def rule(self):
        from onnxscript.rewriter import pattern as onnx_pattern

        return onnx_pattern.RewriteRule(self.pattern, self.replacement, self.check, name=self.name)


_CUSTOM: dict[str, Rewrite] = {}


def register_rewrite(rewrite: Rewrite) -> Rewrite:
    """Add a custom rewrite; it runs after the built-in fusions, in registration order."""
    if not isinstance(rewrite, Rewrite):
        raise KernelizeError(f"register_rewrite expects a kernelize.Rewrite, got {type(rewrite).__name__}")
    _CUSTOM[rewrite.name] = rewrite
    return rewrite


def unregister_rewrite(name: str) -> None:
    _CUSTOM.pop(name, None)


def custom_rewrites() -> list[Rewrite]:
    """Rewrites registered in code and by installed plugins (entry points)."""
    found = dict(_CUSTOM)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must name itself
            raise KernelizeError(f"plugin {entry.name!r} ({entry.value}) failed to load: {err}") from None
        items = obj() if callable(obj) and not isinstance(obj, Rewrite) else obj
        for item in items if isinstance(items, (list, tuple)) else [items]:
            if not isinstance(item, Rewrite):
                raise KernelizeError(f"plugin {entry.name!r} did not provide kernelize.Rewrite objects")
            found.setdefault(item.name, item)
    return list(found.values())
