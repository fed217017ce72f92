"""Run an artifact: ort artifacts with onnxruntime alone, tvm artifacts with the TVM runtime
alone (``tvm.runtime.load_module`` + the Relax VirtualMachine).

Importing this module imports neither torch, onnxscript, onnx nor ``kernelize.api``; numpy
and the backend's runtime are imported when an artifact is opened.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from kernelize.deploy import artifact as artifact_mod
from kernelize.errors import KernelizeError

BATCH_DIM = 1  # a symbolic dimension at axis 0, or one whose name says batch
OTHER_DIM = 128  # any other symbolic dimension


def _first_line(err: BaseException, limit: int = 240) -> str:
    """The most telling line of a (possibly multi-line) runtime error: headers such as
    "RPCError: Error caught from RPC call:" skipped, the first line naming an error preferred."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    body = [line for line in lines if not line.endswith(":")] or lines
    pick = next((line for line in body if "error" in line.lower()), body[0] if body else type(err).__name__)
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


# ----------------------------------------------------------------------------- signatures

def _fmt_shape(shape) -> str:
    if shape is None:
        return "(any)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def validate(signature: list[dict], feeds: Mapping[str, Any]) -> dict:
    """Check ``feeds`` against the manifest's inputs (names, dtype, rank, static dims and the
    consistency of named symbolic dims); return them as contiguous numpy arrays in signature
    order. Raises a one-line :class:`KernelizeError`."""
    import numpy as np

    names = [e["name"] for e in signature]
    unknown = [n for n in feeds if n not in names]
    if unknown:
        raise KernelizeError(f"unknown input {unknown[0]!r} (the model takes: {', '.join(names)})")
    missing = [n for n in names if n not in feeds]
    if missing:
        raise KernelizeError(f"missing input {missing[0]!r} (the model takes: {', '.join(names)})")
    bound: dict[str, tuple[int, str]] = {}
    out = {}
    for entry in signature:
        name = entry["name"]
        try:
            value = np.asarray(feeds[name])
        except Exception as err:  # noqa: BLE001 - anything numpy cannot take
            raise KernelizeError(f"input {name!r} is not an array: {_first_line(err)}") from None
        want = entry.get("dtype")
        if want and value.dtype != np.dtype(want):
            raise KernelizeError(f"input {name!r} has dtype {value.dtype}, expected {np.dtype(want).name}")
        shape = entry.get("shape")
        if shape is not None:
            if value.ndim != len(shape):
                raise KernelizeError(f"input {name!r} has shape {_fmt_shape(value.shape)}, expected "
                                     f"{_fmt_shape(shape)} (rank {len(shape)}, not {value.ndim})")
            for axis, (got, dim) in enumerate(zip(value.shape, shape)):
                if isinstance(dim, int) and got != dim:
                    raise KernelizeError(f"input {name!r} has shape {_fmt_shape(value.shape)}, expected "
                                         f"{_fmt_shape(shape)} (dim {axis} must be {dim})")
                if isinstance(dim, str):
                    if dim in bound and bound[dim][0] != got:
                        raise KernelizeError(f"input {name!r} has {dim}={got} at dim {axis}, but input "
                                             f"{bound[dim][1]!r} has {dim}={bound[dim][0]}")
                    bound.setdefault(dim, (got, name))
        _check_range(name, entry.get("range"), value)
        out[name] = np.ascontiguousarray(value)
    return out


def _check_range(name: str, bounds, value) -> None:
    """Integer inputs inside the manifest's [low, high) (the rows of the embedding table they
    index): a TVM build reads past the table instead of refusing (a crash, or a silently wrong
    result)."""
    if bounds is None or value.dtype.kind not in "iu" or value.size == 0:
        return
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)
            and bounds[0] < bounds[1]):
        raise KernelizeError(f"the manifest's range for input {name!r} is not [low, high) with low < high: {bounds}")
    low, high = int(value.min()), int(value.max())
    if low < bounds[0] or high >= bounds[1]:
        bad = low if low < bounds[0] else high
        raise KernelizeError(f"input {name!r} holds {bad}, outside [{bounds[0]}, {bounds[1]}) (the rows of the "
                             "table it indexes)")


def resolve_shapes(signature: list[dict], shapes: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """Concrete shapes for the inputs: static dims as they are; a symbolic dim from
    ``shapes`` (by dim name) else 1 for a batch dim (axis 0, or named *batch*) else 128."""
    shapes = dict(shapes or {})
    known = {n for e in signature for n in (e.get("shape") or []) if isinstance(n, str)}
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise KernelizeError(f"--shape {unknown[0]}: the model has no symbolic dim of that name "
                             f"(it has: {', '.join(sorted(known)) or 'none'})")
    chosen: dict[str, int] = {}
    result = {}
    for entry in signature:
        dims = []
        for axis, dim in enumerate(entry.get("shape") or []):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            default = BATCH_DIM if axis == 0 or (dim and "batch" in dim.lower()) else OTHER_DIM
            if dim is None:
                dims.append(default)
                continue
            chosen.setdefault(dim, int(shapes.get(dim, default)))
            dims.append(chosen[dim])
        result[entry["name"]] = dims
    return result


def random_inputs(signature: list[dict], shapes: Mapping[str, int] | None = None, seed: int = 0) -> dict:
    """Random inputs following the signature: floats N(0, 1); masks and bools ones; other
    integers uniform in the entry's ``range`` [low, high) when the manifest gives one, else 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for entry, (name, dims) in zip(signature, resolve_shapes(signature, shapes).items()):
        dtype = np.dtype(entry.get("dtype") or "float32")
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_ or "mask" in name.lower():
            feeds[name] = np.ones(dims, dtype)
        elif entry.get("range"):
            low, high = entry["range"]
            feeds[name] = rng.integers(low, high, dims).astype(dtype)
        else:
            feeds[name] = np.zeros(dims, dtype)
    return feeds


def latency_stats(times_ms: list[float]) -> dict:
    """Median, p10/p90, min/max, mean and the relative spread (p90 - p10) / median."""
    import numpy as np

    ordered = sorted(times_ms)
    n = len(ordered)
    if not n:
        raise KernelizeError("no timings")
    median = float(np.median(ordered))
    p10 = float(np.percentile(ordered, 10))
    p90 = float(np.percentile(ordered, 90))
    return {"runs": n, "median_ms": median, "p10_ms": p10, "p90_ms": p90, "min_ms": ordered[0],
            "max_ms": ordered[-1], "mean_ms": float(np.mean(ordered)), "std_ms": float(np.std(ordered)),
            "spread_pct": 100.0 * (p90 - p10) / median if median > 0 else 0.0}


# ----------------------------------------------------------------------------- sessions

class _OrtSession:
    def __init__(self, art: artifact_mod.Artifact, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise KernelizeError("running an ort artifact needs onnxruntime (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        device = art.target.get("device") or "cpu"
        providers = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(device, ["CPUExecutionProvider"])
        try:
            self.session = ort.InferenceSession(str(art.model_path), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            raise KernelizeError(f"ONNX Runtime cannot load {art.manifest['model']}: {_first_line(err)}") from None
        got = [o.name for o in self.session.get_outputs()]
        want = [o["name"] for o in art.outputs]
        if got != want:
            raise KernelizeError(f"the model's outputs {got} do not match the manifest's {want}")

    def run(self, feeds: dict) -> list:
        try:
            return self.session.run(None, feeds)
        except Exception as err:  # noqa: BLE001
            raise KernelizeError(f"ONNX Runtime failed to run the model: {_first_line(err)}") from None

    def timed(self, feeds: dict) -> float:
        start = time.perf_counter()
        self.session.run(None, feeds)
        return time.perf_counter() - start

    def close(self) -> None:
        self.session = None


def import_tvm(threads: int | None = None):
    """Import the TVM runtime; ``threads`` sets the thread count of its CPU kernels in this
    process (:func:`set_tvm_threads`)."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))  # before anything in TVM reads it
    try:
        import tvm
        import tvm.runtime
    except ImportError:
        raise KernelizeError("running a tvm artifact needs the TVM runtime (pip install apache-tvm)") from None
    if threads:
        set_tvm_threads(tvm, int(threads))
    return tvm


def set_tvm_threads(tvm, threads: int) -> int:
    """Make TVM's CPU kernels run on ``threads`` threads; return the count they will use.

    What TVM 0.27's runtime does (measured here): each parallel kernel reads TVM_NUM_THREADS
    when it launches; at 1 it runs inline on the calling thread and no thread pool exists.
    Otherwise it runs on the calling thread's pool, which is created at the first launch with
    that many threads and never grows. ``runtime.config_threadpool`` can only shrink a pool,
    and creating a pool of 1 (which it and ``runtime.NumThreads`` do) pins the calling thread
    to CPU 0: two such processes share one core and each runs at half speed. So: set the
    variable (enough for 1 thread, and for a pool not created yet); for more threads, create
    or query the pool, shrink it without pinning when it is larger, and warn when it is
    smaller (that needs a new process)."""
    import warnings

    os.environ["TVM_NUM_THREADS"] = str(threads)
    if threads == 1:
        return 1
    pool_size = tvm.get_global_func("runtime.NumThreads")
    have = int(pool_size())
    if have > threads:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # no sched_getaffinity (macOS)
            cpus = list(range(os.cpu_count() or 1))
        share_all_cores = -3  # TVM's AffinityMode kSpecifyThreadShareAllCore: no pinning
        tvm.get_global_func("runtime.config_threadpool")(share_all_cores, threads, [str(c) for c in cpus])
        have = int(pool_size())
    if have != threads:
        warnings.warn(f"TVM's thread pool in this process already runs {have} thread(s); {threads} need a "
                      "new process (set TVM_NUM_THREADS before the first TVM kernel runs)",
                      RuntimeWarning, stacklevel=3)
    return have


def vm_class(tvm):
    try:
        from tvm.runtime.vm import VirtualMachine
    except ImportError:  # older layouts
        from tvm.relax import VirtualMachine
    return VirtualMachine


def check_tvm_version(manifest: Mapping, tvm) -> None:
    built = (manifest.get("versions") or {}).get("tvm")
    here = getattr(tvm, "__version__", None)
    if built and here and built.split(".")[:2] != here.split(".")[:2]:
        raise KernelizeError(f"the artifact was built with TVM {built} but this machine has TVM {here}: "
                             "install the same TVM minor version or rebuild the artifact")


def flatten_outputs(value) -> list:
    """The VM's outputs (a tensor, or nested tuples of them) as a flat list of numpy arrays."""
    if isinstance(value, (tuple, list)) or (hasattr(value, "__len__") and not hasattr(value, "numpy")):
        flat = []
        for item in value:
            flat.extend(flatten_outputs(item))
        return flat
    return [value.numpy()]


class TvmVM:
    """A Relax VirtualMachine over a compiled TVM module: the one TVM VM runner, for a deployed
    artifact (its library, loaded with ``tvm.runtime.load_module``) and for a model just built
    (``kernelize.backends.tvm.Built.runner``, over the ``relax.build`` executable).

    ``inputs`` is the signature (``[{"name", "shape", "dtype"}]`` in call order); ``threads``
    sets the thread count of TVM's CPU kernels in this process (None: as the process has it).
    """

    def __init__(self, module, inputs: list[dict], device: str | Any = "cpu", threads: int | None = None,
                 entry: str = "main"):
        tvm = import_tvm()
        self.tvm = tvm
        self.threads = set_tvm_threads(tvm, int(threads)) if threads else None
        self.inputs = list(inputs)
        self.device = tvm.device(device, 0) if isinstance(device, str) else device
        self.vm = vm_class(tvm)(module, self.device)
        self._main = self.vm[entry]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    def tensors(self, arrays) -> list:
        """Device tensors of ``arrays`` (in call order), as they are."""
        return [self.tvm.runtime.tensor(a, self.device) for a in arrays]

    def arguments(self, inputs: Mapping[str, Any]) -> list:
        """Device tensors of ``inputs`` (name -> array) in call order, each cast to its input's
        dtype; a missing input or a shape other than the static one it was built for raises."""
        import numpy as np

        arrays = []
        for spec in self.inputs:
            if spec["name"] not in inputs:
                raise KernelizeError(f"missing input {spec['name']!r} (inputs: {', '.join(self.input_names)})")
            array = np.ascontiguousarray(inputs[spec["name"]], dtype=spec["dtype"])
            if list(array.shape) != list(spec["shape"]):
                raise KernelizeError(f"input {spec['name']!r} has shape {list(array.shape)}, but the module was "
                                     f"built for {spec['shape']} (build again with that shape)")
            arrays.append(array)
        return self.tensors(arrays)

    def run_arguments(self, args: list) -> list:
        """Outputs (NumPy arrays, in the model's output order) for device tensors ``args``."""
        return flatten_outputs(self._main(*args))

    def run(self, inputs: Mapping[str, Any]) -> list:
        """Outputs (NumPy arrays, in the model's output order) for ``inputs`` (name -> array)."""
        return self.run_arguments(self.arguments(inputs))

    def timed(self, args: list) -> float:
        """Seconds of one call on device tensors ``args`` (the device synchronized)."""
        start = time.perf_counter()
        self._main(*args)
        self.device.sync()
        return time.perf_counter() - start

    def latency_ms(self, inputs: Mapping[str, Any], runs: int = 20, warmup: int = 3, tick=None) -> dict[str, float]:
        """Median and spread of ``runs`` timed calls (after ``warmup``), inputs already on the
        device; the same statistics as ``kernelize.backends.ort.latency_ms`` (``tick`` is
        called after each timed call)."""
        import numpy as np

        args = self.arguments(inputs)
        for _ in range(warmup):
            self._main(*args)
        times = []
        for _ in range(runs):
            times.append(self.timed(args) * 1e3)
            if tick is not None:
                tick()
        times.sort()
        return {"median_ms": float(np.median(times)), "p10_ms": times[len(times) // 10],
                "p90_ms": times[(9 * len(times)) // 10], "runs": runs}


class _TvmSession:
    def __init__(self, art: artifact_mod.Artifact, threads: int):
        tvm = import_tvm()
        check_tvm_version(art.manifest, tvm)
        self.threads = set_tvm_threads(tvm, threads)  # what the kernels will really use
        self.n_outputs = len(art.outputs)
        self._tmp = None
        self._args: list = []
        path = art.model_path
        if path.suffix == ".tar":  # linked on load, next to the file: keep the artifact folder clean
            self._tmp = tempfile.TemporaryDirectory(prefix="kernelize-tvm-")
            copy = Path(self._tmp.name) / path.name
            shutil.copyfile(path, copy)
            path = copy
        try:
            lib = tvm.runtime.load_module(str(path))
        except Exception as err:  # noqa: BLE001 - TVM raises its own exception types
            hint = " (linking model.tar needs a C compiler here)" if path.suffix == ".tar" else ""
            raise KernelizeError(f"TVM cannot load {art.manifest['model']}{hint}: {_first_line(err)}") from None
        try:
            self.vm = TvmVM(lib, art.inputs, art.target.get("device") or "cpu", entry=art.manifest.get("entry", "main"))
        except Exception as err:  # noqa: BLE001
            raise KernelizeError(f"TVM cannot start the model's VM: {_first_line(err)}") from None

    def _set(self, feeds: dict) -> None:
        self._args = self.vm.tensors(feeds.values())

    def run(self, feeds: dict) -> list:
        try:
            self._set(feeds)
            outputs = self.vm.run_arguments(self._args)
        except Exception as err:  # noqa: BLE001
            raise KernelizeError(f"TVM failed to run the model: {_first_line(err)}") from None
        if len(outputs) != self.n_outputs:
            raise KernelizeError(f"the model returned {len(outputs)} outputs, the manifest lists {self.n_outputs}")
        return outputs

    def timed(self, feeds: dict) -> float:
        return self.vm.timed(self._args)

    def close(self) -> None:
        self.vm = None
        self._args = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ----------------------------------------------------------------------------- the runner

class Runner:
    """A loaded artifact ready to run: ``run(feeds) -> {output name: array}``."""

    def __init__(self, art: artifact_mod.Artifact, threads: int = 1):
        if threads < 1:
            raise KernelizeError("threads must be at least 1")
        self.artifact = art
        self.inputs = art.inputs
        self.outputs = art.outputs
        session = {"ort": _OrtSession, "tvm": _TvmSession}[art.backend]
        self._session = session(art, threads)
        self.threads = getattr(self._session, "threads", threads)  # tvm: the count its pool really runs

    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    def validate(self, feeds: Mapping[str, Any]) -> dict:
        return validate(self.inputs, feeds)

    def random_inputs(self, shapes: Mapping[str, int] | None = None, seed: int = 0) -> dict:
        return random_inputs(self.inputs, shapes, seed)

    def run(self, feeds: Mapping[str, Any]) -> dict:
        feeds = self.validate(feeds)
        values = self._session.run(feeds)
        return dict(zip([o["name"] for o in self.outputs], values))

    def timed(self, feeds: Mapping[str, Any]) -> float:
        """Seconds of one call on ``feeds`` (checked with :meth:`validate` by the caller; TVM
        inputs are copied to the device before the clock starts)."""
        if isinstance(self._session, _TvmSession):
            self._session._set(feeds)
        return self._session.timed(feeds)

    def bench(self, feeds: Mapping[str, Any], runs: int = 20, warmup: int = 3) -> dict:
        """Latency of ``runs`` timed calls after ``warmup`` untimed ones (ms)."""
        if runs < 1:
            raise KernelizeError("runs must be at least 1")
        feeds = self.validate(feeds)
        for _ in range(max(1, warmup)):
            self._session.run(feeds)
        if isinstance(self._session, _TvmSession):
            self._session._set(feeds)
        times = [self._session.timed(feeds) * 1e3 for _ in range(runs)]
        stats = latency_stats(times)
        stats.update(threads=self.threads, warmup=warmup,
                     shapes={k: list(v.shape) for k, v in feeds.items()})
        return stats

    def close(self) -> None:
        self._session.close()
        self.artifact.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str | os.PathLike, threads: int = 1, check_target: bool = True) -> Runner:
    """Open, verify and load an artifact folder or archive for running on this machine."""
    art = artifact_mod.load(path, check_target=check_target)
    try:
        return Runner(art, threads)
    except BaseException:
        art.close()
        raise
