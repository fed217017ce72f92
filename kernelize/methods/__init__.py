"""Approximation methods: how an approximate operator is calibrated for one site.

A method turns the activations captured at a site (:mod:`kernelize.passes.calibrate`)
into a :class:`~kernelize.methods.base.Fitted` operator call (operator name, attributes,
weights), and estimates its cost. One module per family; importing this package
registers every method in :data:`kernelize.methods.base.METHODS`.
"""

import importlib
import pkgutil

from kernelize.methods.base import METHODS, Fitted, Method, exact_attention_cost  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
