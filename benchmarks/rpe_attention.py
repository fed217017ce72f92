"""FFT-RPE (``kernelize.RPEAttention``) against exact softmax attention with the same
Toeplitz (ALiBi) bias: h = 12, d = 64, batch 1, n in {1024, ..., 16384}, ONNX Runtime and TVM
on this CPU, in one process.

Both sides are one-node models of the same operator: the exact side is ``RPEAttention`` with
``exact_below`` above n, i.e. softmax(Q K^T scale + T) V with T gathered from the same
``rel_bias`` (ONNX: MatMul/Softmax/MatMul; TVM: the project's scheduled matmuls and softmax).
The FFT side runs with two feature maps: ``favor`` with M = 16 features and ``elu`` (M = d =
64); its cost grows with M (M/2 (d+1) complex FFT columns per head). The ``-decay`` rows are
the same operator with ``decay = 1`` (what the RPE methods set for causal ALiBi), evaluated as
a chunked decay instead of by FFT (on ONNX Runtime, whose DFT kernel is too slow for the FFT
path to win, this is what makes ALiBi fast). The ``t5:`` rows use a non-causal T5 bucketed
bias instead (32 buckets, max_distance 128): exact, FFT, and ``far_from = 91`` (the band of
exact weights plus the constant far field, what the RPE methods set for T5), each against
``t5:exact``.

Exact attention on ONNX Runtime runs head by head (a one-head model per slope, times summed)
where the 12 heads' n x n tensors would not fit at once; it is skipped (with the reason) where
even one head's would not, and any series is cut where one call would take more than ``--limit-s`` (estimated
from the previous length: n^2 for exact, n log n for the FFT path; ONNX Runtime's DFT kernel
is scalar, so its FFT path gets there first).

Writes ``benchmarks/results/rpe_attention.json``: machine, load average before and after,
rows (backend, method, n, median/min ms), speedups at n = 8192 and the fitted exponent of time
against n log2 n (least squares on log-log) per FFT series.

    python benchmarks/rpe_attention.py [--threads 1] [--lengths 1024,2048,...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402

from common import RESULTS, machine, write_json  # noqa: E402
from kernelize import ops  # noqa: E402
from kernelize.backends import ort as ort_backend  # noqa: E402
from kernelize.ops import feature_maps as fm  # noqa: E402
from kernelize.ops.base import add_initializer  # noqa: E402

HEADS, HEAD_SIZE = 12, 64
LENGTHS = (1024, 2048, 4096, 8192, 16384)
METHODS = {  # name -> (feature map, features or None, form, bias); form: fft | decay | far
    "exact": (None, None, "fft", "alibi"),
    "rpe:favor16": ("favor", 16, "fft", "alibi"),
    "rpe:elu": ("elu", None, "fft", "alibi"),
    "rpe:favor16-decay": ("favor", 16, "decay", "alibi"),
    "rpe:elu-decay": ("elu", None, "decay", "alibi"),
    "t5:exact": (None, None, "fft", "t5"),
    "t5:rpe:favor16": ("favor", 16, "fft", "t5"),
    "t5:rpe:favor16-far": ("favor", 16, "far", "t5"),
}
DESCRIPTIONS = {
    "exact": "causal ALiBi: softmax(Q K^T scale + T) V, T = Toeplitz(rel_bias), same operator with exact_below > n",
    "rpe:favor16": "causal ALiBi: RPEAttention by FFT, FAVOR+ features M = 16",
    "rpe:elu": "causal ALiBi: RPEAttention by FFT, elu + 1 features M = 64",
    "rpe:favor16-decay": "causal ALiBi: RPEAttention with decay = 1 (a chunked decay), FAVOR+ M = 16",
    "rpe:elu-decay": "causal ALiBi: RPEAttention with decay = 1, elu + 1 M = 64",
    "t5:exact": "non-causal T5 buckets (32, max_distance 128): exact softmax attention with the bias",
    "t5:rpe:favor16": "non-causal T5 buckets: RPEAttention by FFT, FAVOR+ M = 16",
    "t5:rpe:favor16-far": f"non-causal T5 buckets: RPEAttention with far_from = {91} (band + constant far "
                          "field), FAVOR+ M = 16",
}
T5_FAR_FROM = 91  # where T5's 32 bidirectional buckets (max_distance 128) stop changing


def alibi(n: int) -> np.ndarray:
    slopes = 2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)
    return (-slopes[:, None] * np.abs(np.arange(-(n - 1), n))[None, :]).astype(np.float32)


def t5(n: int) -> np.ndarray:
    """T5's bidirectional bucketed bias (Raffel et al. 2020: 16 buckets a side, exact below 8,
    logarithmic up to max_distance 128, clamped beyond) from a fixed random table."""
    d = np.arange(-(n - 1), n)
    distance = np.abs(d)
    large = 8 + (np.log(np.maximum(distance, 1) / 8) / math.log(128 / 8) * 8).astype(np.int64)
    buckets = (d > 0) * 16 + np.where(distance < 8, distance, np.minimum(large, 15))
    table = np.random.default_rng(5).standard_normal((32, HEADS))
    return table[buckets].T.astype(np.float32)


def rel_bias(method: str, n: int) -> np.ndarray:
    return t5(n) if METHODS[method][3] == "t5" else alibi(n)


def one_node(method: str, n: int, heads: int = HEADS):
    """(model, feeds) of one RPEAttention node (exact: exact_below above n) over ``heads`` heads
    (the first ones of the ALiBi slopes; a one-head model gets head h by feeding row h)."""
    op = ops.get("RPEAttention")
    kind, features, form, source = METHODS[method]
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((1, heads, n, HEAD_SIZE)).astype(np.float32) for _ in range(3))
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20}, name="rpe_bench")
    model = ir.Model(graph, ir_version=10)
    feeds, values = {}, []
    for name, array in (("query", q), ("key", k), ("value", v), ("rel_bias", rel_bias(method, n)[:heads])):
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(value)
        feeds[name] = array
        values.append(value)
    weight = None
    if kind == "favor":
        weight = add_initializer(graph, ir.Value(name="feature_weight", const_value=ir.tensor(
            fm.favor_weight(HEAD_SIZE, features, heads))))
    attrs = {"feature_map": kind or "elu", "causal": int(source == "alibi"), "scale": HEAD_SIZE ** -0.5,
             "exact_below": n + 1 if method.endswith("exact") else 0, "decay": int(form == "decay"),
             "far_from": T5_FAR_FROM if form == "far" else 0}
    node = op.make_node(model, values + [None, weight], attrs, name="attention")
    graph.append(node)
    node.outputs[0].name = "Y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(node.outputs[0])
    return model, feeds, attrs


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def exact_bytes(n: int, backend: str) -> int:
    """Peak of the n x n float32 tensors exact attention holds at once (scores, probabilities;
    the gathered Toeplitz bias too). The TVM lowering runs in chunks of heads of about
    ``EXACT_CHUNK_BYTES`` of scores each."""
    if backend == "tvm":
        from kernelize.backends.tvm.lower.rpe_attention import EXACT_CHUNK_BYTES

        return 4 * min(HEADS * n * n * 4, max(n * n * 4, EXACT_CHUNK_BYTES))
    return 3 * HEADS * n * n * 4


def timed_by_head(method: str, n: int, repeats: int, threads: int) -> dict:
    """Exact attention on ONNX Runtime where the 12 heads' n x n tensors do not fit at once:
    a one-head model run for each head's slope (heads are independent), times summed."""
    model, feeds, _ = one_node(method, n, heads=1)
    session = ort_backend.session(model, threads)
    rel = rel_bias(method, n)
    per_head = []
    for h in range(HEADS):
        head_feeds = {**feeds, "rel_bias": rel[h:h + 1]}
        per_head.append(timed(lambda: ort_backend.run(session, head_feeds), repeats))  # noqa: B023
    return {"median_ms": sum(t["median_ms"] for t in per_head), "min_ms": sum(t["min_ms"] for t in per_head),
            "repeats": repeats, "by_head": True}


def timed(call, repeats: int) -> dict:
    call()  # warm-up (and the first-run allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def fitted_exponent(rows: list[dict]) -> float | None:
    """Slope of log(time) against log(n log2 n): 1.0 is exactly n log n."""
    points = [(r["n"], r["median_ms"]) for r in rows if r.get("median_ms")]
    if len(points) < 3:
        return None
    x = np.log([n * math.log2(n) for n, _ in points])
    y = np.log([t for _, t in points])
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--backends", default="ort,tvm")
    parser.add_argument("--limit-s", type=float, default=40.0,
                        help="skip a length whose call is estimated (from the previous length) to take longer")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the existing JSON for other backends/methods")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    backends = args.backends.split(",")
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    started = time.time()
    result = {"benchmark": "rpe_attention", "heads": HEADS, "head_size": HEAD_SIZE, "batch": 1, "causal": True,
              "bias": "ALiBi (slopes 2^(-8k/12))", "threads": args.threads, "machine": machine(),
              "load_average_before": list(os.getloadavg()), "methods": DESCRIPTIONS,
              "rows": []}
    rows = result["rows"]
    last_ms: dict[tuple, tuple[int, float]] = {}
    for backend in backends:
        for method in args.methods.split(","):
            if backend == "ort" and method == "rpe:elu":
                rows.append({"backend": backend, "method": method, "skipped": "ONNX Runtime's DFT is scalar: M = 64 "
                             "needs 4 x the favor16 time; measured for favor16 only"})
                continue
            for n in lengths:
                row = {"backend": backend, "method": method, "n": n}
                key = (backend, method)
                exact = method.endswith("exact")
                by_head = backend == "ort" and exact and exact_bytes(n, backend) > 0.3 * available_bytes()
                if exact and exact_bytes(n, backend) / (HEADS if by_head else 1) > 0.6 * available_bytes():
                    row["skipped"] = (f"n x n scores need about {exact_bytes(n, backend) / 2**30:.1f} GiB, "
                                      f"{available_bytes() / 2**30:.1f} GiB available")
                    rows.append(row)
                    print(row, flush=True)
                    continue
                if key in last_ms:
                    prev_n, prev_ms = last_ms[key]
                    scale = (n * n) / (prev_n * prev_n) if exact else \
                        (n * math.log2(n)) / (prev_n * math.log2(prev_n))
                    if prev_ms * scale / 1e3 > args.limit_s:
                        row["skipped"] = f"estimated {prev_ms * scale / 1e3:.0f} s per call > --limit-s"
                        rows.append(row)
                        print(row, flush=True)
                        continue
                model, feeds, attrs = one_node(method, n)
                repeats = 5 if n <= 2048 else 3 if n <= 8192 else 2
                try:
                    if by_head:
                        row.update(timed_by_head(method, n, repeats, args.threads))
                        last_ms[key] = (n, row["median_ms"])
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    if backend == "ort":
                        session = ort_backend.session(model, args.threads)
                        call = lambda: ort_backend.run(session, feeds)  # noqa: E731
                        check = lambda: ort_backend.run(session, feeds)["Y"]  # noqa: E731
                    else:
                        from kernelize.backends import tvm as tvm_backend

                        t = time.perf_counter()
                        built = tvm_backend.build(model, "cpu")
                        row["build_s"] = time.perf_counter() - t
                        runner = built.runner(threads=args.threads)
                        tvm_args = runner.arguments(feeds)
                        call = lambda: runner.run_arguments(tvm_args)  # noqa: E731
                        check = lambda: runner.run_arguments(tvm_args)[0]  # noqa: E731
                    row.update(timed(call, repeats))
                    if n == lengths[0]:  # against the float64 direct computation
                        weight = model.graph.initializers.get("feature_weight")
                        expected = ops.get("RPEAttention").reference(
                            feeds["query"], feeds["key"], feeds["value"], feeds["rel_bias"], None,
                            None if weight is None else weight.const_value.numpy(), None, **attrs)
                        row["max_abs_error_vs_reference"] = float(np.max(np.abs(check() - expected)))
                    last_ms[key] = (n, row["median_ms"])
                except Exception as err:  # noqa: BLE001 - record, go on with the next
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                rows.append(row)
                print(row, flush=True)
    result["load_average_after"] = list(os.getloadavg())
    if args.merge and (RESULTS / "rpe_attention.json").exists():
        import json

        done = {(r["backend"], r["method"]) for r in rows}
        old = json.loads((RESULTS / "rpe_attention.json").read_text())
        rows[:0] = [r for r in old["rows"] if (r["backend"], r["method"]) not in done]
        result["load_average_before"] = [old.get("load_average_before"), result["load_average_before"]]
        backends = sorted({r["backend"] for r in rows})
    summary = {}
    for backend in backends:
        times = {r["method"]: r for r in rows if r["backend"] == backend and r.get("n") == 8192 and r.get("median_ms")}
        for method in METHODS:
            if method.endswith("exact"):
                continue
            series = [r for r in rows if r["backend"] == backend and r["method"] == method and r.get("median_ms")]
            if not series:
                continue
            entry = {"exponent_vs_n_log_n": fitted_exponent(series)}
            baseline = "t5:exact" if METHODS[method][3] == "t5" else "exact"
            if baseline in times and method in times:
                entry["speedup_at_8192"] = times[baseline]["median_ms"] / times[method]["median_ms"]
                entry["meets_5x"] = entry["speedup_at_8192"] >= 5.0
            summary[f"{backend}/{method}"] = entry
    result["summary"] = summary
    result["wall_s"] = time.time() - started
    path = write_json("rpe_attention", result)
    print(path, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
