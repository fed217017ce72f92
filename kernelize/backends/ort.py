"""ONNX Runtime backend: lower kernelize operators to ONNX Runtime's fused kernels, run,
time and save.

Operators without a faster ONNX Runtime kernel keep their ONNX function body, which ONNX
Runtime inlines at load time.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

from kernelize import ops
from kernelize.errors import KernelizeError
from kernelize.timing import latency_summary


def lower(model: ir.Model) -> dict[str, int]:
    """Swap kernelize nodes for ONNX Runtime kernels where one exists; count them."""
    counts: dict[str, int] = {}
    for node in list(model.graph):
        if node.domain != ops.DOMAIN:
            continue
        if ops.get(node.op_type).lower_ort(node, model.graph):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    used = {(n.domain, n.op_type, n.overload) for n in model.graph}
    for key in list(model.functions):
        if key not in used:
            del model.functions[key]
    if any(n.domain == "com.microsoft" for n in model.graph):
        model.opset_imports.setdefault("com.microsoft", 1)
    if not model.functions:
        model.opset_imports.pop(ops.DOMAIN, None)
    return counts


def serialize(model: ir.Model | onnx.ModelProto, extra_outputs=()) -> bytes:
    """The model's bytes, with intermediate values exposed as extra graph outputs.

    A ModelProto is changed only for the time of the serialization (no copy of the weights).
    """
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    added = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
             for n in dict.fromkeys(extra_outputs) if n not in present]
    proto.graph.output.extend(added)
    try:
        return proto.SerializeToString()
    finally:
        for _ in added:
            proto.graph.output.pop()


def session(model, threads: int = 1, extra_outputs=()):
    """An ONNX Runtime CPU session with all graph optimizations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else serialize(model, extra_outputs)
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
        raise KernelizeError(f"ONNX Runtime cannot load the model: {str(err).splitlines()[0]}") from None


def run(sess, feeds: dict[str, np.ndarray], names=None) -> dict[str, np.ndarray]:
    names = names or [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds)))
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
        raise KernelizeError(f"ONNX Runtime failed to run the model: {str(err).splitlines()[0]}") from None


def latency_ms(sess, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3,
               tick: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and spread of ``runs`` timed calls (after ``warmup`` calls): see
    :func:`kernelize.timing.latency_summary`. ``tick`` is called after each timed call."""
    names = [sess.get_outputs()[0].name]
    for _ in range(warmup):
        run(sess, feeds, names)  # a model that cannot run says why in one line
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(names, feeds)
        times.append((time.perf_counter() - start) * 1e3)
        if tick is not None:
            tick()
    return latency_summary(times)


def interleaved_ms(sessions, feeds: dict[str, np.ndarray], rounds: int = 15, warmup: int = 2,
                   tick: Callable[[], None] | None = None) -> list[dict]:
    """Latency of several sessions on the same feeds, timed in interleaved rounds (the order
    rotates each round, so load on the machine spreads over all): median, p10, p90 each.
    ``tick`` is called after each round."""
    names = [[s.get_outputs()[0].name] for s in sessions]
    for _ in range(warmup):
        for sess, out in zip(sessions, names):
            sess.run(out, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        for k in range(len(sessions)):
            i = (k + r) % len(sessions)
            start = time.perf_counter()
            sessions[i].run(names[i], feeds)
            times[i].append((time.perf_counter() - start) * 1e3)
        if tick is not None:
            tick()
    return [latency_summary(t) for t in times]


def save_ort_format(model_bytes: bytes, path) -> None:
    """Write ONNX Runtime's flatbuffer format (``.ort``, for mobile and edge builds of ONNX
    Runtime) with the graph optimizations applied."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        raise KernelizeError(f"ONNX Runtime could not write the .ort format: {str(err).splitlines()[0]}") from None
