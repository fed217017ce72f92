"""The approximate attention operators alone against kernelize's exact fused attention:
h = 12 heads, d = 64, batch 1, non-causal self-attention, n in {512, 1024, 2048, 4096, 8192},
on ONNX Runtime and on TVM (this CPU), in one process, on the same inputs.

    .venv/bin/python benchmarks/attention_ops.py    # --sizes 512,...,8192 --threads 1 --backends ort,tvm

(``--backends ort`` then ``--backends tvm --merge`` runs one backend per process and merges
the rows into one results file.)

Every row is a one-node model of a kernelize operator (``ops.get(name).make_node``) with
query, key and value as graph inputs ([1, 12, n, 64], standard normal, one draw per n shared
by all rows) and the operator's weights as initializers; scale = 1/sqrt(64), no mask,
``exact_below`` = 0. ONNX Runtime runs the operator's function body
(``kernelize.backends.ort.session``: all graph optimizations, ``--threads`` intra-op threads,
one inter-op thread); TVM runs its lowering (``kernelize.backends.tvm.build(model, "cpu")``,
static shapes, kernelize's CPU schedule rules, no tuning; ``TVM_NUM_THREADS`` set to
``--threads`` before TVM is imported).

TVM schedules: the project's CPU rules (``kernelize.backends.tvm.schedules.default_rules``;
``tvm_schedule.default_rules`` in the results, its former name). The results JSON was
measured while those rules still held dlight's ``cpu.GEMV``, which this script then dropped
for its builds (LLVM took 3 to 15 minutes on the GEMV schedule of linear attention's
normalizer, under 1% of the row's work); the project's rules have since dropped it too, so
the build measured is the project's. Each TVM row records ``schedules`` (kernel -> rule).

Rows (op):
  exact                    ``Attention``: softmax(Q K^T scale) V (ORT: MatMul/Softmax/MatMul; TVM:
                           the project's sdpa lowering); the baseline of every speedup
  linear:elu               ``LinearAttention``, feature map elu + 1 (M = 64)
  linear:hedgehog          ``LinearAttention``, hedgehog map, M/2 = 64 (M = 128), random-but-fixed
                           weights (identity + N(0, 0.1) noise, seed 0) and biases (N(0, 0.1))
  sliding_window:w256+s4   ``SlidingWindowAttention``, window 256, 4 sink tokens
  block_sparse:b64l2g1     ``BlockSparseAttention``, block 64, 2 local blocks each side, 1 global block
  topk:k256                ``TopKAttention``, k = 256 (dense Q K^T: at best about 2x)

Timing, per (backend, n): every row's model is built, checked and warmed up (2 calls), then
all rows are timed in interleaved rounds (the row order rotates each round; per round and
row a block of 1 to 5 timed calls, as many as fit in about 0.25 s), so background load
hits all rows alike. Rounds: 7 up to n = 2048, 5 at 4096, 3 at 8192 (the exact cells take
seconds there). Median, p10 and p90 of all timed calls are reported. A row is skipped with
the reason recorded where its cell (warm-up plus rounds) would take more than
``--cell-limit-s`` (60 s; estimated from the previous n: time ~ n^2 for exact and top-k, ~ n
for the others, or from the first warm-up call), and exact/top-k where their n x n score
tensors would not fit in the available memory. Sessions and modules are freed after each n;
one backend runs at a time.

Correctness: at the smallest n every row's output is compared with the operator's NumPy
reference (float64): ``max_abs_error_vs_reference`` and ``max_rel_error_vs_reference``
(max abs error / max abs reference value).

Reported: ``rows`` (backend, op, n, median/p10/p90 ms, timed calls, speedup = exact median /
row median at the same backend and n), ``crossover`` per (backend, op): the smallest
measured n from which on the op is faster than exact at every larger measured n
(``measured_n``), and ``interpolated_n``: where log(speedup) crosses 0 on the straight line
in log n between the last slower and the first faster measured n (an interpolation, not a
measurement; null when the op is faster already at the smallest n or never faster).
``targets`` (per backend): linear attention (each feature map) >= 10x faster than exact at
n = 4096, sliding window (w = 256) >= 5x faster at n = 4096. The machine's load average is
recorded at the start, the end and per (backend, n); the machine was shared with other work
while this ran, which adds noise (see ``notes``).

Writes benchmarks/results/attention_ops.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS, HEAD_SIZE = 12, 64
SIZES = (512, 1024, 2048, 4096, 8192)
SCALE = 1.0 / math.sqrt(HEAD_SIZE)
HEDGEHOG_HALF = 64  # hedgehog's M / 2
WARMUP = 2
BLOCK_SECONDS = 0.25  # per round and row: as many timed calls as fit in this (1 to MAX_BLOCK)
MAX_BLOCK = 5
ROWS = {  # op label -> (operator, attributes besides scale, cost exponent in n, dense n x n scores)
    "exact": ("Attention", {}, 2, True),
    "linear:elu": ("LinearAttention", {"feature_map": "elu", "causal": 0, "exact_below": 0}, 1, False),
    "linear:hedgehog": ("LinearAttention", {"feature_map": "hedgehog", "causal": 0, "exact_below": 0}, 1, False),
    "sliding_window:w256+s4": ("SlidingWindowAttention",
                               {"window": 256, "sinks": 4, "causal": 0, "exact_below": 0}, 1, False),
    "block_sparse:b64l2g1": ("BlockSparseAttention",
                             {"block": 64, "local_blocks": 2, "global_blocks": 1, "causal": 0, "exact_below": 0},
                             1, False),
    "topk:k256": ("TopKAttention", {"top_k": 256, "causal": 0, "exact_below": 0}, 2, True),
}
TARGETS = {"linear:elu": 10.0, "linear:hedgehog": 10.0, "sliding_window:w256+s4": 5.0}
TARGET_N = 4096


def rounds_for(n: int) -> int:
    return 7 if n <= 2048 else 5 if n <= 4096 else 3


def hedgehog_parameters() -> tuple:
    """Random-but-fixed hedgehog weight [H, D, M/2] and bias [H, 1, M/2] (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    weight = np.eye(HEAD_SIZE, HEDGEHOG_HALF)[None] + 0.1 * rng.standard_normal((HEADS, HEAD_SIZE, HEDGEHOG_HALF))
    bias = 0.1 * rng.standard_normal((HEADS, 1, HEDGEHOG_HALF))
    return weight.astype(np.float32), bias.astype(np.float32)


def inputs_for(n: int) -> dict:
    """query, key, value [1, H, n, D], standard normal, one draw per n."""
    import numpy as np

    rng = np.random.default_rng(n)
    return {name: rng.standard_normal((1, HEADS, n, HEAD_SIZE), dtype=np.float32)
            for name in ("query", "key", "value")}


def one_node(label: str, feeds: dict):
    """(model, attrs, weights) of the one-node model of row ``label`` at the feeds' shapes."""
    import onnx_ir as ir

    from kernelize import ops
    from kernelize.ops.base import add_initializer

    op_name, extra, _, _ = ROWS[label]
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20}, name=f"bench_{op_name}")
    model = ir.Model(graph, ir_version=10)
    values = []
    for name in ("query", "key", "value"):
        value = ir.Value(name=name, shape=ir.Shape(feeds[name].shape), type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(value)
        values.append(value)
    weights = {}
    if label == "linear:hedgehog":
        weights["feature_weight"], weights["feature_bias"] = hedgehog_parameters()
        values += [None] + [add_initializer(graph, ir.Value(name=name, const_value=ir.tensor(array)))
                            for name, array in weights.items()]
    attrs = {"scale": SCALE, **extra}
    node = ops.get(op_name).make_node(model, values, attrs, name=label)
    graph.append(node)
    node.outputs[0].name = "Y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(node.outputs[0])
    return model, attrs, weights


def reference(label: str, feeds: dict, attrs: dict, weights: dict):
    from kernelize import ops

    args = [feeds["query"], feeds["key"], feeds["value"]]
    if weights:
        args += [None, weights["feature_weight"], weights["feature_bias"]]
    return ops.get(ROWS[label][0]).reference(*args, **attrs)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def dense_bytes(n: int) -> int:
    """What a dense row may hold at once: three float32 [H, n, n] tensors (scores, scaled
    scores, probabilities)."""
    return 3 * HEADS * n * n * 4


def make_call(backend: str, model, feeds: dict, threads: int) -> tuple:
    """(call, extra row fields): ``call()`` runs the model once and returns its output Y."""
    if backend == "ort":
        from kernelize.backends import ort as ort_backend

        session = ort_backend.session(model, threads)
        return (lambda: session.run(["Y"], feeds)[0]), {}
    from kernelize.backends import tvm as tvm_backend

    start = time.perf_counter()
    built = tvm_backend.build(model, "cpu")
    schedules = dict(built.schedules)
    build_s = time.perf_counter() - start
    runner = built.runner(threads=threads)
    args = runner.arguments(feeds)

    def call():
        out = runner.run_arguments(args)
        return out[0]

    return call, {"build_s": build_s, "tvm_pool_threads": runner.threads, "schedules": schedules}


def stats(times: list[float]) -> dict:
    import numpy as np

    times = sorted(times)
    return {"median_ms": float(np.median(times)), "p10_ms": times[len(times) // 10],
            "p90_ms": times[(9 * len(times)) // 10], "timed_calls": len(times)}


def bench_size(backend: str, n: int, labels: list[str], threads: int, cell_limit_s: float,
               last: dict, check: bool) -> list[dict]:
    """All rows of one (backend, n): build, check, warm up, time in interleaved rounds."""
    import numpy as np

    feeds = inputs_for(n)
    rounds = rounds_for(n)
    load_before = os.getloadavg()[0]
    rows, calls, blocks = {}, {}, {}
    for label in labels:
        row = {"backend": backend, "op": label, "n": n}
        rows[label] = row
        _, _, exponent, dense = ROWS[label]
        if dense and dense_bytes(n) > 0.7 * available_bytes():
            row["skipped"] = (f"n x n scores need about {dense_bytes(n) / 2**30:.1f} GiB, "
                              f"{available_bytes() / 2**30:.1f} GiB available")
            continue
        if label != "exact" and label in last:
            prev_n, prev_ms = last[label]
            estimate_s = prev_ms * (n / prev_n) ** exponent * (WARMUP + rounds) / 1e3
            if estimate_s > cell_limit_s:
                row["skipped"] = (f"estimated {estimate_s:.0f} s for the cell ({prev_ms:.0f} ms at n = {prev_n}, "
                                  f"time ~ n^{exponent}) > --cell-limit-s {cell_limit_s:.0f}")
                continue
        try:
            model, attrs, weights = one_node(label, feeds)
            call, extra = make_call(backend, model, feeds, threads)
            row.update(extra)
            start = time.perf_counter()
            out = call()
            first_ms = (time.perf_counter() - start) * 1e3
            if check:
                expected = reference(label, feeds, attrs, weights)
                err = float(np.max(np.abs(out.astype(np.float64) - expected)))
                row["max_abs_error_vs_reference"] = err
                row["max_rel_error_vs_reference"] = err / float(np.max(np.abs(expected)))
            if label != "exact" and first_ms * (WARMUP + rounds) / 1e3 > cell_limit_s:
                row["skipped"] = (f"one call took {first_ms / 1e3:.1f} s: the cell would take more than "
                                  f"--cell-limit-s {cell_limit_s:.0f}")
                last[label] = (n, first_ms)
                del call
                continue
            for _ in range(WARMUP - 1):
                call()
            start = time.perf_counter()
            call()
            warm_ms = (time.perf_counter() - start) * 1e3
            calls[label] = call
            blocks[label] = max(1, min(MAX_BLOCK, int(BLOCK_SECONDS * 1e3 / max(warm_ms, 1e-3))))
        except Exception as err:  # noqa: BLE001 - record it, go on with the other rows
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
        print(f"  {backend} n={n} {label}: ready "
              + (row.get("skipped") or row.get("error") or f"(block {blocks.get(label)})"), flush=True)

    timed = list(calls)
    samples = {label: [] for label in timed}
    for r in range(rounds):
        order = timed[r % len(timed):] + timed[:r % len(timed)] if timed else []
        for label in order:
            call = calls[label]
            for _ in range(blocks[label]):
                start = time.perf_counter()
                call()
                samples[label].append((time.perf_counter() - start) * 1e3)
    calls.clear()
    gc.collect()

    load_after = os.getloadavg()[0]
    for label in timed:
        rows[label].update(stats(samples[label]), rounds=rounds, block=blocks[label])
        last[label] = (n, rows[label]["median_ms"])
    exact_ms = rows["exact"].get("median_ms") if "exact" in rows else None
    for row in rows.values():
        row["load_average_1m"] = {"before": load_before, "after": load_after}
        if exact_ms and row.get("median_ms"):
            row["speedup_vs_exact"] = exact_ms / row["median_ms"]
    return list(rows.values())


def crossover(series: list[tuple[int, float]]) -> dict:
    """From (n, speedup) sorted by n: the smallest measured n from which on the op is faster,
    and the log-log interpolation of where the speedup crosses 1 (see the module docstring)."""
    if not series:
        return {"measured_n": None, "interpolated_n": None, "note": "no measured speedups"}
    start = len(series)
    while start > 0 and series[start - 1][1] > 1.0:
        start -= 1
    if start == len(series):
        return {"measured_n": None, "interpolated_n": None,
                "note": f"not faster than exact at any measured n up to {series[-1][0]}"}
    if start == 0:
        return {"measured_n": series[0][0], "interpolated_n": None,
                "note": f"faster than exact already at the smallest measured n = {series[0][0]}"}
    (n0, s0), (n1, s1) = series[start - 1], series[start]
    fraction = (0.0 - math.log(s0)) / (math.log(s1) - math.log(s0))
    interpolated = math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0)))
    return {"measured_n": n1, "interpolated_n": round(interpolated),
            "note": f"interpolated on log n between n = {n0} (speedup {s0:.2f}) and n = {n1} (speedup {s1:.2f})"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="sequence lengths n")
    parser.add_argument("--threads", type=int, default=1, help="intra-op / TVM threads (default 1)")
    parser.add_argument("--backends", default="ort,tvm", help="ort, tvm or both (default ort,tvm)")
    parser.add_argument("--ops", default=",".join(ROWS), help="rows to run (exact always runs)")
    parser.add_argument("--cell-limit-s", type=float, default=60.0,
                        help="skip a row whose cell would take longer (default 60)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier results file that this run does not measure again")
    args = parser.parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    labels = ["exact"] + [label for label in args.ops.split(",") if label and label != "exact"]
    unknown = [b for b in backends if b not in ("ort", "tvm")] + [label for label in labels if label not in ROWS]
    if unknown or args.threads < 1:
        parser.error(f"unknown backend/op or bad thread count: {unknown or args.threads}")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM is imported (its pool reads it)

    from common import RESULTS, machine, write_json

    started = time.time()
    load_start = list(os.getloadavg())
    print(f"load average {load_start[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    rows = []
    for backend in backends:
        last: dict[str, tuple[int, float]] = {}
        for n in sizes:
            print(f"{backend} n={n}: building ...", flush=True)
            size_rows = bench_size(backend, n, labels, args.threads, args.cell_limit_s, last, n == sizes[0])
            rows += size_rows
            for r in size_rows:
                if "median_ms" in r:
                    print(f"  {backend:<4} n={n:<5} {r['op']:<24}{r['median_ms']:>10.2f} ms  "
                          f"[{r['p10_ms']:.2f}, {r['p90_ms']:.2f}]  x{r.get('speedup_vs_exact', float('nan')):.2f}",
                          flush=True)
            gc.collect()
    load_end = list(os.getloadavg())
    runs = [{"backends": backends, "sizes": sizes, "threads": args.threads,
             "tvm_rules": None if "tvm" not in backends else "project rules (tvm_schedule.default_rules)",
             "load_average": {"start": load_start, "end": load_end}, "wall_s": time.time() - started}]
    if args.merge and (RESULTS / "attention_ops.json").exists():
        earlier = json.loads((RESULTS / "attention_ops.json").read_text())
        fresh = {(r["backend"], r["op"], r["n"]) for r in rows}  # only the cells measured now are replaced
        rows = [r for r in earlier.get("rows", []) if (r["backend"], r["op"], r["n"]) not in fresh] + rows
        runs = earlier.get("runs", []) + runs
    labels = ["exact"] + [label for label in ROWS if label != "exact" and any(r["op"] == label for r in rows)]
    all_backends = list(dict.fromkeys(r["backend"] for r in rows))
    all_sizes = sorted({r["n"] for r in rows})

    crossovers, targets = {}, {}
    for backend in all_backends:
        for label in labels[1:]:
            series = [(r["n"], r["speedup_vs_exact"]) for r in rows
                      if r["backend"] == backend and r["op"] == label and "speedup_vs_exact" in r]
            crossovers[f"{backend}/{label}"] = crossover(sorted(series))
        for label, needed in TARGETS.items():
            if label not in labels:
                continue
            hit = [r for r in rows if r["backend"] == backend and r["op"] == label and r["n"] == TARGET_N]
            speedup = hit[0].get("speedup_vs_exact") if hit else None
            targets[f"{backend}/{label}>={needed:g}x@{TARGET_N}"] = {
                "speedup": speedup, "met": None if speedup is None else bool(speedup >= needed)}

    notes = [f"the machine ({os.cpu_count()} CPUs) was shared with other engineers' work while this ran "
             "(load averages per run in `runs`, per (backend, n) in each row): timings are noisy; "
             "rows of one (backend, n) are interleaved so the load hits them alike, and each row "
             "carries the load average before and after its (backend, n)",
             "crossover interpolated_n is interpolated on log n (log speedup linear in log n) between two "
             "measured lengths, not measured"]
    data = {"benchmark": "attention_ops", "machine": machine(),
            "settings": {"heads": HEADS, "head_size": HEAD_SIZE, "batch": 1, "causal": False, "mask": None,
                         "scale": SCALE, "sizes": all_sizes, "threads": args.threads, "backends": all_backends,
                         "warmup": WARMUP, "rounds": {str(n): rounds_for(n) for n in all_sizes},
                         "block_seconds": BLOCK_SECONDS, "max_block": MAX_BLOCK,
                         "cell_limit_s": args.cell_limit_s,
                         "ops": {label: {"operator": ROWS[label][0], "attributes": ROWS[label][1]}
                                 for label in labels},
                         "hedgehog_parameters": "weight eye(64, 64) + 0.1 N(0, 1), bias 0.1 N(0, 1), "
                                                "seed 0, shapes [12, 64, 64] and [12, 1, 64]",
                         "tvm": "kernelize.backends.tvm.build(model, 'cpu'), no tuning; schedule rules per run "
                                "in runs[].tvm_rules (see the module docstring)",
                         "ort": "kernelize.backends.ort.session: ORT_ENABLE_ALL, 1 inter-op thread"},
            "load_average": {"start": runs[0]["load_average"]["start"], "end": runs[-1]["load_average"]["end"]},
            "runs": runs, "notes": notes, "rows": rows, "crossover": crossovers, "targets": targets}
    path = write_json("attention_ops", data)

    print(f"\n{'backend':<8}{'op':<24}" + "".join(f"{n:>16}" for n in all_sizes))
    for backend in all_backends:
        for label in labels:
            cells = []
            for n in all_sizes:
                r = next((r for r in rows if r["backend"] == backend and r["op"] == label and r["n"] == n), {})
                if "median_ms" in r:
                    cells.append(f"{r['median_ms']:.1f}ms x{r.get('speedup_vs_exact', float('nan')):.2f}")
                else:
                    cells.append("skipped" if "skipped" in r else "error" if "error" in r else "-")
            print(f"{backend:<8}{label:<24}" + "".join(f"{c:>16}" for c in cells))
    print("\ncrossover:")
    for key, value in crossovers.items():
        print(f"  {key}: measured n {value['measured_n']}, interpolated n {value['interpolated_n']} ({value['note']})")
    print("targets:")
    for key, value in targets.items():
        print(f"  {key}: {value}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
