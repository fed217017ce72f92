"""TVM backend: kernelize's fused model (before ONNX Runtime lowering) -> Apache TVM Relax
-> compiled code for a target preset (``cpu``, ``cuda``, ``arm64`` or a TVM target JSON).

Flow::

    onnx_ir model --(relax ONNX frontend; kernelize ops through Operator.lower_tvm)--> Relax
      --LegalizeOps, FoldConstant, FuseOps, FuseTIR--> PrimFuncs
      --schedules: cpu -> kernelize.backends.tvm_schedule (own matmul rule + dlight CPU rules)
                   gpu -> dlight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback)
                   tune_trials > 0 -> MetaSchedule, database in tuning_db, reused next time
      --relax.build--> Built (export_library, run)

Shapes are specialized at build time: the model's symbolic axes become ``shape["batch"]``
(axis 0) and ``shape["seq"]`` (any other symbolic axis), as ``kernelize.passes.verify``
feeds them. Static shapes let the matmul schedule pick exact tiles; a built module runs
only at its shape (``Built.shapes`` records it; ``run`` checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from kernelize import ops
from kernelize.backends import targets as targets_mod
from kernelize.errors import KernelizeError, UsageError

DEFAULT_SHAPE = {"batch": 1, "seq": 128}
_OP_PREFIX = "kernelize__"  # kernelize nodes are renamed to this + op name before import
_FRONTEND_LOCK = threading.Lock()


# -- relax helpers shared by the operators' lower_tvm ------------------------------------
def linear(bb, x, w, b=None):
    """``x @ w (+ b)`` as Relax bindings (the bias add becomes the matmul's epilogue)."""
    from tvm import relax

    y = bb.emit(relax.op.matmul(x, w))
    return bb.emit(relax.op.add(y, b)) if b is not None else y


def softmax(bb, x):
    """Softmax over the last axis in TE: max, ``fast_exp`` (TVM's vectorizable polynomial,
    relative error < 3e-7; ``exp`` becomes a scalar libm call per element on CPU), sum, scale."""
    from tvm import te, topi

    def compute(data):
        *lead, width = data.shape
        k = te.reduce_axis((0, width), "k")
        peak = te.compute(lead, lambda *i: te.max(data[(*i, k)], axis=k), name="softmax_max")
        shifted = te.compute(data.shape, lambda *i: data[i] - peak[i[:-1]], name="softmax_shift")
        e = topi.fast_exp(shifted)
        k2 = te.reduce_axis((0, width), "k2")
        total = te.compute(lead, lambda *i: te.sum(e[(*i, k2)], axis=k2), name="softmax_sum")
        inverse = te.compute(lead, lambda *i: np.float32(1.0) / total[i], name="softmax_inv")
        return te.compute(data.shape, lambda *i: e[i] * inverse[i[:-1]], name="softmax_norm")

    return bb.emit_te(compute, x, primfunc_name_hint="softmax_fast")


def gelu(bb, x, approximate: str = "none"):
    """GELU in TE with TVM's vectorizable ``fast_erf`` / ``fast_tanh`` (relative error < 4e-7;
    the plain ``erf`` is a scalar libm call per element on CPU)."""
    from tvm import te, topi

    def compute(data):
        if approximate == "tanh":
            c = np.float32(np.sqrt(2.0 / np.pi))
            inner = te.compute(data.shape, lambda *i: c * (data[i] + np.float32(0.044715) * data[i] * data[i] * data[i]),
                               name="gelu_inner")
            t = topi.fast_tanh(inner)
        else:
            inner = te.compute(data.shape, lambda *i: data[i] * np.float32(1 / np.sqrt(2.0)), name="gelu_inner")
            t = topi.fast_erf(inner)
        return te.compute(data.shape, lambda *i: np.float32(0.5) * data[i] * (np.float32(1.0) + t[i]), name="gelu")

    return bb.emit_te(compute, x, primfunc_name_hint="gelu_tanh" if approximate == "tanh" else "gelu")


def sdpa(bb, query, key_t, value, bias, scale):
    """softmax(Q K^T * scale + bias) V with ``key_t`` already [B, H, D, Sk] (``scale`` None:
    already folded into Q)."""
    from tvm import relax

    op = relax.op
    scores = bb.emit(op.matmul(query, key_t))
    if scale is not None:
        scores = bb.emit(op.multiply(scores, relax.const(np.float32(scale), "float32")))
    if bias is not None:
        scores = bb.emit(op.add(scores, bias))
    probs = softmax(bb, scores)
    return bb.emit(op.matmul(probs, value))


# -- import ----------------------------------------------------------------------------
def _converter(op: ops.Operator):
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class KernelizeOp(onnx_frontend.OnnxOpConverter):
        """One kernelize operator: its ``lower_tvm`` (never the ONNX function body)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            args = [inputs[i] for i in range(len(op.inputs))]
            attrs = {}
            for name, kind in op.attributes.items():
                if name in attr:
                    value = attr[name]
                    attrs[name] = value.decode() if isinstance(value, bytes) else kind(value)
            out = op.lower_tvm(bb, args, attrs)
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

    extra = {_OP_PREFIX + name: _converter(op) for name, op in ops.registered().items()
             if hasattr(op, "lower_tvm")}
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
        if not hasattr(known[node.op_type], "lower_tvm"):
            raise KernelizeError(f"kernelize operator {node.op_type} has no TVM lowering (lower_tvm)")
        mask = node.overload.rsplit("_", 1)[-1] if node.overload else ""
        if mask and set(mask) <= {"0", "1"} and mask.count("1") == len(node.input):
            it = iter(list(node.input))
            aligned = [next(it) if flag == "1" else "" for flag in mask]
            del node.input[:]
            node.input.extend(aligned)
        node.op_type = _OP_PREFIX + node.op_type
        node.domain = ""
    del proto.functions[:]  # the TVM path never inlines the function bodies
    return proto


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


# -- compile ---------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    """A compiled model: ``export_library(path)``, and ``run(inputs)`` where the target is
    this machine's CPU."""

    executable: object  # relax VMExecutable
    target: targets_mod.Preset
    shapes: dict[str, list[int]]  # input name -> the static shape it was built for
    inputs: list[dict]  # [{"name", "shape", "dtype"}] in call order
    outputs: list[str]
    timings: dict[str, float]
    schedules: dict[str, str]  # PrimFunc name -> the rule that scheduled it ("tuned": from the database)
    tuning: dict | None = None
    _runner: "Runner | None" = dataclasses.field(default=None, repr=False)

    def metadata(self) -> dict:
        return {"format": "kernelize-tvm/1", "target": self.target.name, "target_json": self.target.config,
                "shapes": self.shapes, "inputs": self.inputs, "outputs": self.outputs}

    def export_library(self, path: str | os.PathLike) -> Path:
        """Write the compiled library (``.so``; ``.tar`` for object files to link elsewhere)
        and ``<path>.json`` with its inputs, outputs and shapes (what ``load`` reads).
        Cross targets link with their cross compiler (arm64: aarch64-linux-gnu-gcc)."""
        from tvm.support import cc

        path = Path(path)
        if not path.parent.exists():
            raise KernelizeError(f"folder of {path} does not exist")
        kwargs = {}
        if path.suffix != ".tar":
            cross = targets_mod.linker(self.target)
            if cross is not None:
                kwargs["fcompile"] = cc.cross_compiler(cross)
        try:
            self.executable.export_library(str(path), **kwargs)
        except Exception as err:  # noqa: BLE001 - compiler/linker failures
            lines = [l for l in str(err).strip().splitlines() if l.strip()]
            raise KernelizeError(f"exporting {path} failed: {lines[-1] if lines else type(err).__name__}") from err
        Path(str(path) + ".json").write_text(json.dumps(self.metadata(), indent=1))
        return path

    def runner(self, device: str = "cpu", threads: int | None = None) -> "Runner":
        """A VM over the compiled module (cached). ``threads`` sizes TVM's CPU thread pool, which
        is process-wide and fixed once it has run (see ``_set_threads``)."""
        if not self.target.runs_here:
            raise KernelizeError(f"code built for target {self.target.name} cannot run on this machine")
        if self._runner is None or threads:
            self._runner = Runner(self.executable, self.metadata(), device, threads)
        return self._runner

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner().run(inputs)


class Runner:
    """A relax VirtualMachine over a built or loaded module."""

    def __init__(self, module, meta: dict, device: str = "cpu", threads: int | None = None):
        import tvm
        from tvm import relax

        # the thread count TVM's kernels run on (None: left as the process has it)
        self.threads = _set_threads(int(threads)) if threads else None
        self.meta = meta
        self.device = tvm.device(device) if isinstance(device, str) else device
        self.vm = relax.VirtualMachine(module, self.device)
        self._main = self.vm["main"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    def arguments(self, inputs: dict[str, np.ndarray]) -> list:
        import tvm

        args = []
        for spec in self.meta["inputs"]:
            if spec["name"] not in inputs:
                raise KernelizeError(f"missing input {spec['name']!r} (inputs: {', '.join(self.input_names)})")
            array = np.ascontiguousarray(inputs[spec["name"]], dtype=spec["dtype"])
            if list(array.shape) != list(spec["shape"]):
                raise KernelizeError(f"input {spec['name']!r} has shape {list(array.shape)}, but the module was "
                                     f"built for {spec['shape']} (build again with that shape)")
            args.append(tvm.runtime.tensor(array, self.device))
        return args

    def run_arguments(self, args: list) -> list[np.ndarray]:
        _POOL["started"] = True
        out = self._main(*args)
        items = list(out) if not hasattr(out, "numpy") else [out]
        return [item.numpy() for item in items]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs (NumPy arrays, in the model's output order) for ``inputs`` (name -> array)."""
        return self.run_arguments(self.arguments(inputs))

    def latency_ms(self, inputs: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> dict[str, float]:
        """Median and spread of ``runs`` timed calls (after ``warmup``), inputs already on the
        device; the same statistics as ``kernelize.backends.ort.latency_ms``."""
        args = self.arguments(inputs)
        _POOL["started"] = True
        for _ in range(warmup):
            self._main(*args)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self._main(*args)
            self.device.sync()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return {"median_ms": float(np.median(times)), "p10_ms": times[len(times) // 10],
                "p90_ms": times[(9 * len(times)) // 10], "runs": runs}


_POOL = {"started": False}


def _set_threads(threads: int) -> int:
    """Run TVM's CPU kernels on ``threads`` threads in this process; returns the count they will
    use (a pool already larger is shrunk, one already smaller warns: it needs a new process).
    See ``kernelize.deploy.runner.set_tvm_threads`` for how TVM 0.27 sizes its pool."""
    import tvm

    from kernelize.deploy.runner import set_tvm_threads

    return set_tvm_threads(tvm, threads)


def load(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> Runner:
    """Load a library written by ``Built.export_library`` (with its ``.json`` beside it)."""
    import tvm

    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.is_file() or not meta_path.is_file():
        raise KernelizeError(f"{path} (and {meta_path.name} beside it) not found")
    meta = json.loads(meta_path.read_text())
    try:
        module = tvm.runtime.load_module(str(path))
    except Exception as err:  # noqa: BLE001
        raise KernelizeError(f"cannot load {path}: {str(err).strip().splitlines()[-1]}") from err
    return Runner(module, meta, device, threads)


def compare_with_onnx(built: Built, reference: ir.Model | onnx.ModelProto, feeds: dict | None = None,
                      seed: int = 0) -> dict[str, float]:
    """Max abs difference per output between ``built`` and ONNX Runtime running ``reference``
    (the same inputs/outputs, e.g. the canonical model) on ``feeds`` (default: random inputs at
    the built shapes, as ``kernelize.passes.verify`` makes them)."""
    from kernelize.backends import ort as ort_backend
    from kernelize.passes import verify

    ref_ir = reference if isinstance(reference, ir.Model) else ir.from_proto(reference)
    if feeds is None:
        first = built.inputs[0]["shape"] if built.inputs else [1, 1]
        batch = first[0] if first else 1
        seq = first[1] if len(first) > 1 else 1
        feeds = verify.random_inputs(ref_ir, batch, seq, seed)
    expected = ort_backend.run(ort_backend.session(reference), feeds)
    actual = built.run(feeds)
    return {name: float(np.max(np.abs(a.astype(np.float64) - expected[name]))) if a.size else 0.0
            for name, a in zip(built.outputs, actual)}


def _say(progress: Callable[[str], None] | None):
    return progress or (lambda message: None)


def build(model: ir.Model | onnx.ModelProto, target: str = "cpu", *, shape: dict | None = None,
          tune_trials: int = 0, tuning_db: str | os.PathLike | None = None,
          progress: Callable[[str], None] | None = None) -> Built:
    """Compile kernelize's fused model (before ONNX Runtime lowering) for ``target``.

    ``target``: a preset name (``cpu``, ``cuda``, ``cuda:sm_90``, ``arm64``) or a TVM target
    as JSON; unknown names raise UsageError.
    ``shape``: {"batch": B, "seq": S} (default 1 x 128) the module is specialized to (a key may
    also name a symbolic axis of the model directly).
    ``tune_trials`` > 0 runs MetaSchedule on the kernels that contain a reduction, that many
    measured candidates in all (this machine's CPU only), and keeps the records in
    ``tuning_db`` (a folder; a later build reuses them and tunes only kernels it lacks).
    ``progress`` gets a short message per step.
    """
    from tvm import relax

    from kernelize.backends import tvm_schedule

    say = _say(progress)
    preset = targets_mod.resolve(target)
    if tune_trials < 0:
        from kernelize.errors import UsageError

        raise UsageError("tune_trials must be >= 0")
    if tune_trials and not (preset.kind == "cpu" and preset.runs_here):
        from kernelize.errors import UsageError

        raise UsageError(f"tuning needs a target that runs on this machine (cpu), not {preset.name}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    say("importing into TVM Relax")
    mod, shapes = to_relax(model, shape)
    timings["import_s"] = time.perf_counter() - t
    tvm_target = preset.target()
    t = time.perf_counter()
    say("legalizing and fusing")
    with tvm_target:
        mod = relax.get_pipeline("zero")(mod)
    timings["fuse_s"] = time.perf_counter() - t
    rules = tvm_schedule.gpu_rules() if preset.kind == "gpu" else tvm_schedule.default_rules(tvm_target)
    tuning = None
    if tune_trials:
        t = time.perf_counter()
        mod, tuning = tune(mod, tvm_target, tune_trials, tuning_db, say, rules)
        timings["tune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"scheduling for {preset.name}")
    mod, schedules = tvm_schedule.apply_rules(mod, tvm_target, rules)
    timings["schedule_s"] = time.perf_counter() - t
    t = time.perf_counter()
    say("compiling")
    try:
        with tvm_target:
            executable = relax.build(mod, target=tvm_target)
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        lines = [l for l in str(err).strip().splitlines() if l.strip()]
        raise KernelizeError(f"TVM failed to compile for {preset.name}: {lines[-1] if lines else err}") from err
    timings["compile_s"] = time.perf_counter() - t
    names = list(shapes)
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    dtypes = {}
    for value in proto.graph.input:
        elem = value.type.tensor_type.elem_type
        dtypes[value.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
    specs = [{"name": n, "shape": shapes[n], "dtype": dtypes.get(n, "float32")} for n in names]
    outputs = [o.name for o in proto.graph.output]
    return Built(executable, preset, shapes, specs, outputs, timings, schedules, tuning)


def tune(mod, target, trials: int, tuning_db, say, rules: Sequence) -> tuple[object, dict]:
    """MetaSchedule over the fused module's kernels that contain a reduction (matmuls, softmax,
    norms; elementwise kernels keep the default schedules), ``trials`` measured candidates in
    all. Each kernel's default schedule (``rules``) is measured and stored as a record too, so
    applying the database picks whichever is faster. Kernels already in ``tuning_db`` (a JSON
    database keyed by workload) are not tuned again. Returns (module, summary)."""
    import tempfile

    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    config = dict(target.export())
    config.setdefault("num-cores", _physical_cores())  # MetaSchedule needs it in the target
    target = tvm.target.Target(config)
    work_dir = Path(tuning_db) if tuning_db is not None else Path(tempfile.mkdtemp(prefix="kernelize-tune-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    tasks = ms.relax_integration.extract_tasks(mod, target)
    todo, reused = [], 0
    for task in tasks:
        func = task.dispatched[0]["main"]
        if not _has_reduction(func):
            continue
        if database.has_workload(task.dispatched[0]):
            reused += 1
        else:
            todo.append(task)
    summary = {"database": str(work_dir), "trials": trials, "tuned": len(todo), "reused": reused,
               "kernels": {}}
    if todo:
        builder = ms.builder.LocalBuilder(timeout_sec=120, f_build=_ms_build)
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                                  min_repeat_ms=50))
        say(f"measuring the default schedules of {len(todo)} kernel(s)")
        for task, seconds in zip(todo, _commit_defaults(database, todo, target, rules, builder, runner)):
            summary["kernels"][task.task_name] = {"tuner_default_ms": seconds * 1e3 if seconds else None}
        say(f"tuning {len(todo)} kernel(s) with MetaSchedule, {trials} trials in all")
        with _without_tensor_intrinsics(target):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                todo, str(work_dir), space="post-order-apply", strategy="evolutionary", num_threads=1)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                      max_trials_global=trials, max_trials_per_task=trials,
                      num_trials_per_iter=max(1, min(trials, 16)), builder=builder, runner=runner,
                      database=database, cost_model="random" if not _has_xgboost() else "xgb")
        for task in todo:
            best = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
            if best and best[0].run_secs:
                entry = summary["kernels"].setdefault(task.task_name, {})
                entry["tuner_best_ms"] = float(np.mean([float(x) for x in best[0].run_secs])) * 1e3
    # The tuner's timings overlap with its own search and builds (2 cores here): before a tuned
    # schedule replaces a default one, both are timed again, alternately, in this process.
    say("timing the tuned kernels against the default schedules")
    chosen = ms.database.MemoryDatabase()
    for task in tasks:
        if not _has_reduction(task.dispatched[0]["main"]) or not database.has_workload(task.dispatched[0]):
            continue
        entry = summary["kernels"].setdefault(task.task_name, {})
        entry.update(_choose(task, database, chosen, target, rules))
    summary["chosen_tuned"] = sum(1 for e in summary["kernels"].values() if e.get("chosen") == "tuned")
    with target, chosen:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, summary


def _default_schedule(func, target, rules):
    for rule in rules:
        try:
            with target:
                sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001
            sch = None
        if sch is not None:
            return sch[0] if isinstance(sch, list) else sch
    return None


def _choose(task, database, chosen, target, rules, rounds: int = 3) -> dict:
    """Time the database's best schedule of ``task`` and the default one alternately; commit
    the tuned one to ``chosen`` only when it is faster. Returns the timings (ms)."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    workload_mod = task.dispatched[0]
    top = database.get_top_k(database.commit_workload(workload_mod), 1)
    if not top:
        return {"chosen": "default"}
    try:
        tuned = s_tir.Schedule(workload_mod)
        top[0].trace.apply_to_schedule(tuned, remove_postproc=False)
        candidates = {"tuned": tuned}
        default = _default_schedule(workload_mod["main"], target, rules)
        if default is not None:
            import tvm_ffi

            if tvm_ffi.structural_equal(default.mod, tuned.mod):
                return {"chosen": "default", "note": "the default schedule is the database's best"}
            candidates["default"] = default
        func = workload_mod["main"]
        args = [tvm.runtime.tensor(_random_array(p)) for p in func.params]
        _POOL["started"] = True
        timers = {name: tvm.compile(sch.mod, target=target).jit().time_evaluator("main", tvm.cpu(), number=5,
                                                                                  repeat=3, min_repeat_ms=20)
                  for name, sch in candidates.items()}
        best = {name: float("inf") for name in timers}
        for _ in range(rounds):
            for name, timer in timers.items():
                best[name] = min(best[name], float(timer(*args).median))
    except Exception as err:  # noqa: BLE001 - keep the default schedule
        return {"chosen": "default", "error": str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""}
    pick = min(best, key=best.get)
    result = {f"{name}_ms": seconds * 1e3 for name, seconds in best.items()}
    result["chosen"] = pick
    if pick == "tuned":
        chosen.commit_tuning_record(ms.database.TuningRecord(
            top[0].trace, chosen.commit_workload(workload_mod), run_secs=[best["tuned"]], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(workload_mod["main"])))
    return result


def _random_array(param) -> np.ndarray:
    shape = [int(d) for d in param.shape]
    dtype = str(param.dtype)
    if "float" in dtype:
        return np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)


def _ms_build(mod, target, _params):
    """MetaSchedule's build step without its ``import tvm.s_tir.tensor_intrin`` (about 30 s in
    every fresh builder process, longer than the builder's timeout; no tensorization here)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


@contextlib.contextmanager
def _without_tensor_intrinsics(target):
    """MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin`` (every target's
    tensorization intrinsics, parsed from TVMScript: 35-75 s here). Its default rules use them
    only for int8 dot products on AVX-512 VNNI / ARM dot-product CPUs; for other CPUs a
    placeholder module stands in while the contexts are made."""
    import sys
    import types

    from tvm.target import codegen

    name = "tvm.s_tir.tensor_intrin"
    try:
        needs = any(codegen.target_has_features(f, target) for f in ("avx512f", "avx512vnni", "avxvnni"))
    except Exception:  # noqa: BLE001
        needs = True
    if name in sys.modules or needs or str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm")):
        yield
        return
    stub = types.ModuleType(name)
    stub.__path__ = []
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def _has_reduction(func) -> bool:
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    try:
        infos = normalize_prim_func(s_tir.Schedule(func))
    except Exception:  # noqa: BLE001
        return False
    return bool(infos) and any(not info.is_injective() for info in infos)


def _has_xgboost() -> bool:
    import importlib.util

    return importlib.util.find_spec("xgboost") is not None


def _commit_defaults(database, tasks, target, rules, builder, runner) -> list[float | None]:
    """Measure ``rules``' schedule of each task's kernel (one build batch, one run batch) and
    store it as a tuning record; the mean seconds per task (None where it could not be had)."""
    from tvm.s_tir import meta_schedule as ms

    schedules = [_default_schedule(task.dispatched[0]["main"], target, rules) for task in tasks]
    seconds: list[float | None] = [None] * len(tasks)
    pending = [n for n, sch in enumerate(schedules) if sch is not None]
    if not pending:
        return seconds
    try:
        builds = builder.build([ms.builder.BuilderInput(schedules[n].mod, target) for n in pending])
        runs, infos = [], {}
        for n, result in zip(pending, builds):
            if result.error_msg:
                continue
            infos[n] = ms.arg_info.ArgInfo.from_prim_func(tasks[n].dispatched[0]["main"])
            runs.append(n)
        futures = runner.run([ms.runner.RunnerInput(builds[pending.index(n)].artifact_path, "cpu", infos[n])
                              for n in runs])
        for n, future in zip(runs, futures):
            result = future.result()
            if result.error_msg or not result.run_secs:
                continue
            run_secs = [float(x) for x in result.run_secs]
            workload = database.commit_workload(tasks[n].dispatched[0])
            database.commit_tuning_record(ms.database.TuningRecord(
                schedules[n].trace, workload, run_secs=run_secs, target=target, args_info=infos[n]))
            seconds[n] = float(np.mean(run_secs))
    except Exception:  # noqa: BLE001 - measuring is best effort; tuning goes on without it
        pass
    return seconds


def benchmark(model: ir.Model | onnx.ModelProto, shape: dict | None = None, threads: int = 1,
              rounds: int = 7, runs: int = 10, built: Built | None = None) -> dict:
    """TVM (cpu) against ONNX Runtime on ``model`` (kernelize's fused model; ONNX Runtime runs
    it after its own lowering, as the ort backend ships it) at ``shape``: interleaved rounds of
    ``runs`` calls each, so that load from elsewhere hits both alike. Returns medians and
    minima over the rounds' medians (ms), their ratio and the largest output difference."""
    import statistics

    from kernelize.backends import ort as ort_backend
    from kernelize.passes import verify

    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    t = time.perf_counter()
    built = built or build(proto, "cpu", shape=shape)
    build_s = time.perf_counter() - t
    runner = built.runner(threads=threads)
    first = built.inputs[0]["shape"]
    feeds = verify.random_inputs(ir.from_proto(proto), first[0], first[1] if len(first) > 1 else 1)
    lowered = ir.from_proto(proto)
    ort_backend.lower(lowered)
    session = ort_backend.session(lowered, threads)
    expected = ort_backend.run(session, feeds)
    error = max(float(np.max(np.abs(a - expected[n]))) for a, n in zip(runner.run(feeds), built.outputs))
    times: dict[str, list[float]] = {"tvm": [], "ort": []}
    for _ in range(rounds):
        times["tvm"].append(runner.latency_ms(feeds, runs, 2)["median_ms"])
        times["ort"].append(ort_backend.latency_ms(session, feeds, runs, 2)["median_ms"])
    result = {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in times.items()}
    result.update(shapes=built.shapes, threads=threads, build_s=build_s, build_timings=built.timings,
                  max_abs_error=error,
                  ratio=result["tvm"]["median_ms"] / result["ort"]["median_ms"],
                  ratio_min=result["tvm"]["min_ms"] / result["ort"]["min_ms"])
    return result
