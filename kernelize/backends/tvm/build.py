"""Compile kernelize's fused model with TVM: ``build`` (import, legalize and fuse, schedule,
``relax.build``), MetaSchedule tuning with a persistent database (``tune``), and the checks
against ONNX Runtime (``compare_with_onnx``, ``benchmark``).

Flow::

    onnx_ir model --frontend.to_relax (kernelize ops through their registered lowerings)--> Relax
      --LegalizeOps, FoldConstant, FuseOps, FuseTIR--> PrimFuncs
      --schedules: cpu -> kernelize.backends.tvm.schedules (own matmul rule + dlight CPU rules)
                   gpu -> dlight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback)
                   tune_trials > 0 -> MetaSchedule, database in tuning_db, reused next time
      --relax.build--> Built (export_library, run)

Static shapes let the matmul schedule pick exact tiles; a built module runs only at its
shape (``Built.shapes`` records it; ``run`` checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from kernelize.backends import targets as targets_mod
from kernelize.backends.tvm.frontend import to_relax
from kernelize.errors import KernelizeError

if TYPE_CHECKING:
    from kernelize.deploy.runner import TvmVM


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
    _runner: "TvmVM | None" = dataclasses.field(default=None, repr=False)

    def metadata(self) -> dict:
        return {"format": "kernelize-tvm/1", "target": self.target.name, "target_json": self.target.config,
                "shapes": self.shapes, "inputs": self.inputs, "outputs": self.outputs}

    def export_library(self, path: str | os.PathLike) -> Path:
        """Write the compiled library (``.so``; ``.tar`` for object files to link elsewhere)
        and ``<path>.json`` with its inputs, outputs and shapes (``metadata()``).
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

    def runner(self, device: str = "cpu", threads: int | None = None) -> "TvmVM":
        """A VM over the compiled module (cached): ``kernelize.deploy.runner.TvmVM``, the one
        that also runs deployed artifacts. ``threads`` sizes TVM's CPU thread pool, which is
        process-wide and fixed once it has run (see ``kernelize.deploy.runner.set_tvm_threads``)."""
        from kernelize.deploy.runner import TvmVM

        if not self.target.runs_here:
            raise KernelizeError(f"code built for target {self.target.name} cannot run on this machine")
        if self._runner is None or threads:
            self._runner = TvmVM(self.executable, self.inputs, device, threads)
        return self._runner

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner().run(inputs)


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

    from kernelize.backends.tvm import schedules

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
    rules = schedules.gpu_rules() if preset.kind == "gpu" else schedules.default_rules(tvm_target)
    tuning = None
    if tune_trials:
        t = time.perf_counter()
        mod, tuning = tune(mod, tvm_target, tune_trials, tuning_db, say, rules)
        timings["tune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"scheduling for {preset.name}")
    mod, schedules = schedules.apply_rules(mod, tvm_target, rules)
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
        with _trial_bar(say, work_dir, trials):
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


TUNING_RECORDS = "database_tuning_record.json"  # JSONDatabase appends one line per measured trial


@contextlib.contextmanager
def _trial_bar(progress, work_dir: Path, trials: int, every_s: float = 1.0):
    """A bar over MetaSchedule's trials while the block tunes: ``tune_tasks`` reports nothing
    until it returns, so a thread counts the records it appends to the database."""
    from kernelize import progress as progress_mod

    records = Path(work_dir) / TUNING_RECORDS

    def count() -> int:
        try:
            with open(records, "rb") as fh:
                return sum(1 for _ in fh)
        except OSError:
            return 0

    start = count()
    with progress_mod.bar(progress, trials, "tuning trials", "trial") as bar:
        if not bar.drawn:
            yield bar
            return
        stop = threading.Event()

        def poll() -> None:
            done = 0
            while not stop.wait(every_s):
                now = min(trials, count() - start)
                if now > done:
                    bar.update(now - done)
                    done = now

        thread = threading.Thread(target=poll, name="kernelize-tuning-progress", daemon=True)
        thread.start()
        try:
            yield bar
        finally:
            stop.set()
            thread.join()


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
