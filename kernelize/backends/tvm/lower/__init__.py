"""The TVM lowerings, one module per kernelize operator (named after the operator's module in
``kernelize/ops``), each registered with :func:`kernelize.backends.tvm.registry.lowering`.
Importing this package imports every module in it, which registers the lowerings; modules
that only hold shared helpers (``feature_maps``, ``rpe_fft``) register none, and
``block_sparse_attention`` also holds the banded kernel, dense-row and exact passes that the
sliding-window and top-k lowerings use. These modules import TVM.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
