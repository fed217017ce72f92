"""ONNX frontend: a file, bytes or ``ModelProto`` into a checked ``onnx_ir.Model``.

The model is checked, upgraded to :data:`CANONICAL_OPSET` and shape-inferred. External
data is loaded from the model's folder; a location that leaves that folder is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from kernelize.errors import KernelizeError

CANONICAL_OPSET = 20


def load(source: str | os.PathLike | bytes | onnx.ModelProto) -> ir.Model:
    """Load, check, upgrade and shape-infer an ONNX model."""
    if isinstance(source, onnx.ModelProto):
        proto = source
        base_dir = None
    elif isinstance(source, (bytes, bytearray)):
        proto = _parse(bytes(source), "<bytes>")
        base_dir = None
    else:
        path = Path(source)
        if not path.exists():
            raise KernelizeError(f"model file not found: {path}")
        if not path.is_file():
            raise KernelizeError(f"not a file: {path}")
        proto = _parse(path.read_bytes(), str(path))
        base_dir = path.resolve().parent
    _load_external_data(proto, base_dir)
    proto = _upgrade(proto)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except Exception as err:  # noqa: BLE001 - onnx raises several types
        raise KernelizeError(f"invalid ONNX model: {_first_line(err)}") from None
    _check_initializer_sizes(proto.graph)
    _drop_trailing_empty_inputs(proto.graph)
    return ir.from_proto(infer_shapes(proto))


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes for every value, dims named after the inputs' where they provably are theirs.

    ONNX Runtime's symbolic shape inference follows the legacy exporter's Shape/Gather/Concat
    arithmetic, so a head split's ``[batch, sequence, heads, head_size]`` is known as such;
    ONNX's own inference names each such dim anew (``unk__12``). Where the symbolic one
    cannot (an op it does not know), ONNX's own is used. Like ONNX Runtime's transformers
    optimizer it merges dims that broadcasting says are equal (``auto_merge``).
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:  # its infer_shapes() saves the partial model into the working folder when incomplete
        inference = SymbolicShapeInference(2 ** 31 - 1, True, False, 0)
        inference._preprocess(proto)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
        if complete:
            return inference.out_mp_
    except Exception:  # noqa: BLE001 - it raises several types, and asserts
        pass
    finally:
        quiet.level = level
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as err:  # noqa: BLE001
        raise KernelizeError(f"shape inference failed: {_first_line(err)}") from None


def _drop_trailing_empty_inputs(graph: onnx.GraphProto) -> None:
    """An omitted optional input written as a trailing '' is the same as leaving it out, and
    ONNX Runtime 1.2x crashes (SIGSEGV) on LayerNormalization(x, scale, '')."""
    for node in graph.node:
        while node.input and node.input[-1] == "":
            node.input.pop()


def _check_initializer_sizes(graph: onnx.GraphProto) -> None:
    """Every initializer holds as many elements as its dims say (ONNX's checker does not
    look): a mismatch would surface as a NumPy error deep inside a pass."""
    typed = {"float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"}
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        count = 1
        for d in tensor.dims:
            count *= d
        if tensor.HasField("raw_data"):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, ValueError, TypeError):
                raise KernelizeError(f"invalid ONNX model: initializer {tensor.name!r} has an unknown "
                                     f"data type {tensor.data_type}") from None
            if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                continue  # packed two to a byte
            held, needed = len(tensor.raw_data), count * itemsize
        else:
            fields = [f.name for f, _ in tensor.ListFields() if f.name in typed]
            if not fields:
                continue
            held, needed = len(getattr(tensor, fields[0])), count * (
                2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1)
            if tensor.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.BOOL,
                                    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                                    onnx.TensorProto.UINT16):
                needed = count  # one int32_data entry per element
        if held != needed:
            raise KernelizeError(f"invalid ONNX model: initializer {tensor.name!r} holds {held} "
                                 f"{'bytes' if tensor.HasField('raw_data') else 'values'}, its dims "
                                 f"{list(tensor.dims)} and type need {needed}")


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise KernelizeError(f"{where} is not a valid ONNX file (truncated or corrupt)") from None
    if not proto.graph.node and not proto.graph.output:
        raise KernelizeError(f"{where} is not a valid ONNX file (no graph)")
    return proto


def _external_tensors(proto: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _load_external_data(proto: onnx.ModelProto, base_dir: Path | None) -> None:
    tensors = list(_external_tensors(proto))
    if not tensors:
        return
    if base_dir is None:
        raise KernelizeError("the model refers to external data; load it from its file path")
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base_dir / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base_dir):
            raise KernelizeError(
                f"external data {location!r} of tensor {tensor.name!r} points outside the model's folder"
            )
        if not target.is_file():
            raise KernelizeError(f"external data file missing: {target}")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base_dir))
    except Exception as err:  # noqa: BLE001
        raise KernelizeError(f"could not read external data: {_first_line(err)}") from None


def _upgrade(proto: onnx.ModelProto) -> onnx.ModelProto:
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise KernelizeError("the model imports no default ONNX opset")
    if version == CANONICAL_OPSET:
        return proto
    if version > CANONICAL_OPSET:
        # Newer than canonical: keep it; ONNX Runtime reads newer opsets and
        # downgrading could change semantics.
        return proto
    try:
        return onnx.version_converter.convert_version(proto, CANONICAL_OPSET)
    except Exception as err:  # noqa: BLE001
        raise KernelizeError(
            f"could not upgrade opset {version} to {CANONICAL_OPSET}: {_first_line(err)}"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
