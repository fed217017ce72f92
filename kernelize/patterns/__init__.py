"""Patterns: recognize attention, normalization and feed-forward sites in the IR."""

from kernelize.patterns.site import NearMiss, Pattern, Site  # noqa: F401
