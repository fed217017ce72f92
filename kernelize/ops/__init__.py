"""kernelize-domain operators, one module each.

Every operator has three parts that agree with each other: its schema (inputs,
attributes), a NumPy reference and an ONNX function body in standard ops (so any ONNX
runtime can run the model); where ONNX Runtime has a faster kernel, a lowering to it
(``lower_ort``). Compiler backends keep their own lowerings, registered by operator name
(TVM: ``kernelize/backends/tvm/lower/``); nothing here imports a backend. Every module in
this package is imported here, which registers its operators; modules that only hold shared
helpers define none.
"""

import importlib
import pkgutil

from kernelize.ops.base import DOMAIN, Operator, get, registered  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
