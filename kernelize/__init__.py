"""kernelize: find attention, normalization and feed-forward subgraphs in transformer models
and rewrite them into fused (exact) operators, verified against the original.

The compiler parts are imported on first use, so that loading an artifact
(:mod:`kernelize.deploy.runner`) needs neither onnxscript nor torch.
"""

import importlib

from kernelize.errors import KernelizeError, UsageError  # noqa: F401

__version__ = "0.1.0"

_LAZY = {"Result": "kernelize.api", "inspect": "kernelize.api", "optimize": "kernelize.api",
         "Rewrite": "kernelize.patterns.registry", "register_rewrite": "kernelize.patterns.registry",
         "unregister_rewrite": "kernelize.patterns.registry", "TextCalibration": "kernelize.frontends.text"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernelize' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
