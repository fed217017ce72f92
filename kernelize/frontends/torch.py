"""Torch frontend: ``torch.nn.Module`` + example inputs, through ``torch.export`` and the
dynamo ONNX exporter, into the IR. Batch and sequence axes are exported as dynamic."""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

import onnx_ir as ir

from kernelize.errors import KernelizeError
from kernelize.frontends import onnx as onnx_frontend


def _dynamic_shapes(example_inputs: tuple) -> tuple:
    """Dim.AUTO on the batch axis and, for token-like inputs, the sequence axis.

    AUTO lets ``torch.export`` keep an axis static where the model requires it (for
    example the channel axes of an image), instead of failing.
    """
    import torch

    auto = torch.export.Dim.AUTO
    specs = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            specs.append(None)
        elif x.ndim in (2, 3):
            specs.append({0: auto, 1: auto})
        else:
            specs.append({0: auto})
    return tuple(specs)


def capture(module: Any, example_inputs: Any) -> ir.Model:
    """Export ``module`` called on ``example_inputs`` (a tensor, tuple or dict) to the IR."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise KernelizeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    kwargs = None
    if isinstance(example_inputs, dict):
        kwargs, args = dict(example_inputs), ()
        dynamic = {k: s for k, s in zip(kwargs, _dynamic_shapes(tuple(kwargs.values())))}
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        dynamic = _dynamic_shapes(args)
    module = module.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic,
                optimize=True, verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - export failures come in many types
            message = str(err).strip().splitlines()
            raise KernelizeError(
                f"torch export failed: {message[-1] if message else type(err).__name__}"
            ) from None
    proto = ir.to_proto(program.model)
    return onnx_frontend.load(proto)


def load_builder(spec: str):
    """Resolve ``pkg.module:function`` and call it; it returns (module, example_inputs)."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise KernelizeError(f"expected 'package.module:function', got {spec!r}")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as err:
        raise KernelizeError(f"cannot import {module_name!r}: {err}") from None
    func = getattr(mod, func_name, None)
    if not callable(func):
        raise KernelizeError(f"{module_name!r} has no function {func_name!r}")
    result = func()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise KernelizeError(f"{spec} must return (torch.nn.Module, example_inputs)")
    return result
