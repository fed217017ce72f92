"""kernelize: find attention, normalization and feed-forward subgraphs in transformer models
and rewrite them into fused (exact) operators, verified against the original."""

from kernelize.api import Result, inspect, optimize  # noqa: F401
from kernelize.errors import KernelizeError, UsageError  # noqa: F401
from kernelize.patterns.registry import Rewrite, register_rewrite, unregister_rewrite  # noqa: F401

__version__ = "0.1.0"
