"""Latency statistics: the one summary of a list of timed calls that kernelize reports.

Importing this module imports nothing beyond the standard library (numpy when called), so
the lightweight runtime (:mod:`kernelize.deploy.runner`) may use it as well as the backends.
"""

from __future__ import annotations


def latency_summary(times_ms) -> dict[str, float]:
    """Median, p10 and p90 (the calls at those ranks, no interpolation) of ``times_ms`` and
    how many calls there were."""
    import numpy as np

    times = sorted(times_ms)
    return {"median_ms": float(np.median(times)), "p10_ms": times[len(times) // 10],
            "p90_ms": times[(9 * len(times)) // 10], "runs": len(times)}
