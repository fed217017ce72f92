"""ONNX -> Relax: the model's kernelize nodes imported through their registered TVM lowerings
(``kernelize.backends.tvm.registry``), everything else through TVM's Relax ONNX frontend.

Shapes are specialized first: the model's symbolic axes become ``shape["batch"]`` (axis 0)
and ``shape["seq"]`` (any other symbolic axis), as ``kernelize.passes.verify`` feeds them,
and the shape computations that depend on them are folded.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np
import onnx
import onnx_ir as ir

from kernelize import ops
from kernelize.backends.tvm import registry
from kernelize.errors import KernelizeError, UsageError

DEFAULT_SHAPE = {"batch": 1, "seq": 128}
_OP_PREFIX = "kernelize__"  # kernelize nodes are renamed to this + op name before import
_FRONTEND_LOCK = threading.Lock()


def _converter(op: ops.Operator, lower: registry.Lowering):
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class KernelizeOp(onnx_frontend.OnnxOpConverter):
        """One kernelize operator: its registered TVM lowering (never the ONNX function body)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            args = [inputs[i] for i in range(len(op.inputs))]
            attrs = {}
            for name, kind in op.attributes.items():
                if name in attr:
                    value = attr[name]
                    attrs[name] = value.decode() if isinstance(value, bytes) else kind(value)
            out = lower(bb, args, attrs)
            if isinstance(out, (list, tuple)):
                return out[0] if len(out) == 1 else relax.Tuple(list(out))
            return out

    KernelizeOp.__name__ = f"Kernelize{op.name}"
    return KernelizeOp


@contextlib.contextmanager
def _kernelize_converters():
    """The relax ONNX frontend's convert map, extended with the kernelize operators (under
    their renamed op types, so no frontend converter of the same name is shadowed)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    lowerings = registry.registered()
    extra = {_OP_PREFIX + name: _converter(op, lowerings[name]) for name, op in ops.registered().items()
             if name in lowerings}
    with _FRONTEND_LOCK:
        original = onnx_frontend._get_convert_map
        onnx_frontend._get_convert_map = lambda: {**original(), **extra}
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = original


def _prepare_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model for the frontend: kernelize nodes renamed (the frontend ignores
    domains) and their inputs aligned to the schema ('' for an absent optional input)."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    known = ops.registered()
    for node in proto.graph.node:
        if node.domain != ops.DOMAIN:
            continue
        if node.op_type not in known:
            raise KernelizeError(f"unknown kernelize operator {node.op_type!r}")
        if registry.lookup(node.op_type) is None:
            raise KernelizeError(f"kernelize operator {node.op_type} has no TVM lowering "
                                 "(none registered in kernelize/backends/tvm/lower/)")
        mask = node.overload.rsplit("_", 1)[-1] if node.overload else ""
        if mask and set(mask) <= {"0", "1"} and mask.count("1") == len(node.input):
            it = iter(list(node.input))
            aligned = [next(it) if flag == "1" else "" for flag in mask]
            del node.input[:]
            node.input.extend(aligned)
        node.op_type = _OP_PREFIX + node.op_type
        node.domain = ""
    del proto.functions[:]  # the TVM path never inlines the function bodies
    _constants_to_initializers(proto.graph)
    return proto


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes (and ConstantOfShape of a constant shape) -> initializers: TVM's importer
    reads only a Constant's ``value`` tensor, not ``value_ints``/``value_float``/... (which the
    legacy exporter and the constant folder write)."""
    kept = []
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        array = None
        if node.domain in ("", "ai.onnx") and node.op_type == "Constant" and len(node.attribute) == 1:
            array = _constant_array(node.attribute[0])
        elif node.domain in ("", "ai.onnx") and node.op_type == "ConstantOfShape" and node.input[0] in initializers:
            # a constant shape, possibly empty (a scalar result), which TVM's importer cannot broadcast to
            shape = onnx.numpy_helper.to_array(initializers[node.input[0]]).astype(np.int64)
            fill = _constant_array(node.attribute[0]) if node.attribute else np.zeros(1, np.float32)
            array = np.full(shape, fill.reshape(-1)[0], fill.dtype)
        if array is None:
            kept.append(node)
            continue
        tensor = onnx.numpy_helper.from_array(array, node.output[0])
        graph.initializer.append(tensor)
        initializers[tensor.name] = tensor
    del graph.node[:]
    graph.node.extend(kept)


def _constant_array(attribute: onnx.AttributeProto):
    """The array a Constant's value / value_float(s) / value_int(s) attribute holds, else None."""
    value = onnx.helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return onnx.numpy_helper.to_array(value)
    dtypes = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    return np.asarray(value, dtypes[attribute.name]) if attribute.name in dtypes else None


def input_shapes(model: ir.Model | onnx.ModelProto, shape: dict | None) -> dict[str, list[int]]:
    """Concrete input shapes: symbolic axis 0 -> shape["batch"], other symbolic axes ->
    shape["seq"] (or a value given by the axis's own symbol name)."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    initializers = {t.name for t in proto.graph.initializer}
    symbols = {d.dim_param for v in proto.graph.input if v.name not in initializers
               for d in v.type.tensor_type.shape.dim if d.dim_param}
    unknown = sorted(set(shape or {}) - set(DEFAULT_SHAPE) - symbols)
    if unknown:
        raise UsageError(f"--shape names {', '.join(unknown)}, which the model does not have (use "
                         f"{', '.join(sorted(set(DEFAULT_SHAPE) | symbols))})")
    shape = {**DEFAULT_SHAPE, **(shape or {})}
    result = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.dim_param and dim.dim_param in shape:
                dims.append(int(shape[dim.dim_param]))
            else:
                dims.append(int(shape["batch"] if axis == 0 else shape["seq"]))
        result[value.name] = dims
    return result


def specialize(model: ir.Model | onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` with static input shapes and the shape computations that depend
    on them folded (the mask's Shape/Range/Expand chain): the frontend then sees constants
    instead of data-dependent shapes."""
    from onnxscript import optimizer

    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    copy = ir.from_proto(proto)
    for value in copy.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    for node in copy.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None  # inferred again from the static inputs
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)  # a node it cannot fold stays; the frontend handles it
    try:
        optimizer.fold_constants(copy)
    finally:
        folding_log.setLevel(level)
    ir.passes.common.RemoveUnusedNodesPass()(copy)
    return ir.to_proto(copy)


def to_relax(model: ir.Model | onnx.ModelProto, shape: dict | None = None):
    """The Relax IRModule of ``model`` with its inputs specialized to ``shape``."""
    import warnings

    from tvm.relax.frontend.onnx import from_onnx

    shapes = input_shapes(model, shape)
    proto = _prepare_proto(specialize(model, shapes))
    with _kernelize_converters(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return from_onnx(proto, shape_dict=shapes, keep_params_in_input=False), shapes
        except KernelizeError:
            raise
        except Exception as err:  # noqa: BLE001 - TVM raises its own error types
            lines = [l for l in str(err).strip().splitlines() if l.strip()]
            raise KernelizeError(f"TVM cannot import the model: {lines[-1] if lines else type(err).__name__}") \
                from err
