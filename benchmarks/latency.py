"""CPU latency of all-MiniLM-L6-v2 (batch 1): torch eager vs ONNX Runtime on the raw export,
on onnxscript's ORT fusions and on kernelize's exact output.

Rows, all fed the same inputs:
  torch       torch eager (torch.set_num_threads, torch.inference_mode)
  ort         the dynamo ONNX export (kernelize.frontends.torch.capture) on ONNX Runtime
  onnxscript  onnxscript.rewriter.ort_fusions.optimize_for_ort(copy of the export) on ORT
  kernelize   kernelize.optimize(copy of the export, recipe="exact", backend="ort") on ORT

The model is exported once (dynamic batch and sequence) and reused for every length.
Every ONNX Runtime session has all graph optimizations on, intra-op threads as given and
one inter-op thread. For each (sequence, threads) pair all rows are warmed up, then
timed in interleaved rounds: each round runs every row (in an order rotated per round)
for one untimed call, so one runtime's idle worker threads do not cost the next one,
then BLOCK timed calls. Short blocks spread any background load over all rows alike.
The median over all rounds is reported.

flop_fraction = (model FLOPs / this machine's single-thread SGEMM rate) / latency: the
share of one core's matmul peak reached (so it can exceed 1 with 2 threads).

Run: .venv/bin/python benchmarks/latency.py [--runs 20] [--seqs 128,512] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import numpy as np

from common import machine, write_json

ROWS = ("torch", "ort", "onnxscript", "kernelize")
BLOCK = 2  # timed calls per row per round
WARMUP = 3


def sgemm_gflops(sizes=(512, 1024), repeats=10) -> dict[int, float]:
    """Best single-thread float32 matmul rate per square size, in GFLOP/s."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    rates = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            a @ b
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - start)
            rates[n] = 2 * n**3 / best / 1e9
    return rates


def bert_flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of a BERT encoder: projections, feed-forward and attention per layer."""
    e, f = config.hidden_size, config.intermediate_size
    per_layer = 4 * 2 * seq * e * e + 2 * 2 * seq * e * f + 2 * 2 * seq * seq * e
    return batch * config.num_hidden_layers * per_layer


def op_counts(model) -> dict[str, int]:
    counts = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph)
    return {f"{domain}::{op}": n for (domain, op), n in sorted(counts.items())}


def build_models(module, example):
    """The export, onnxscript's ORT fusions of a copy and kernelize's exact output of a copy."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    import kernelize
    from kernelize.frontends.torch import capture

    start = time.perf_counter()
    exported = capture(module, example)
    times = {"export_s": time.perf_counter() - start}
    proto = ir.to_proto(exported)

    start = time.perf_counter()
    onnxscript_model, fusions = optimize_for_ort(ir.from_proto(proto))
    times["onnxscript_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = kernelize.optimize(ir.from_proto(proto), recipe="exact", backend="ort", measure_latency=False)
    times["kernelize_s"] = time.perf_counter() - start

    models = {"ort": exported, "onnxscript": onnxscript_model, "kernelize": result.model}
    info = {"times": times, "onnxscript_fusions": {k: v for k, v in fusions.items() if v},
            "kernelize_lowered": result.report["lowered"],
            "op_counts": {name: op_counts(m) for name, m in models.items()}}
    return models, info


def max_abs_errors(reference: list, candidate: list, names: list[str]) -> dict[str, float]:
    return {n: float(np.max(np.abs(a.astype(np.float64) - b))) for n, a, b in zip(names, reference, candidate)}


def time_rows(calls: dict, runs: int) -> dict[str, dict]:
    """Warm every row, then time them in interleaved rounds of blocks; median/p10/p90 in ms."""
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    names = list(calls)
    samples = {name: [] for name in names}
    for r in range(-(-runs // BLOCK)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call = calls[name]
            call()
            for _ in range(BLOCK):
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1e3)
    stats = {}
    for name, times in samples.items():
        times.sort()
        stats[name] = {"median_ms": float(np.median(times)), "p10_ms": times[len(times) // 10],
                       "p90_ms": times[(9 * len(times)) // 10], "runs": len(times)}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per row (default 20)")
    parser.add_argument("--seqs", default="128,512", help="sequence lengths (default 128,512)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts (default 1,2)")
    args = parser.parse_args()
    seqs = [int(x) for x in args.seqs.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]

    import torch

    from kernelize.backends import ort as ort_backend
    from kernelize.models import minilm

    info = machine()
    print(f"load average {info['load_average_1m']:.2f} on {info['cpu_count']} CPUs", flush=True)
    sgemm = sgemm_gflops()
    peak = max(sgemm.values())
    print("single-thread SGEMM: " + ", ".join(f"{n}x{n} {r:.1f} GFLOP/s" for n, r in sgemm.items()), flush=True)

    module, example = minilm.build(1, seqs[0])
    print("exporting and optimizing ...", flush=True)
    models, build_info = build_models(module, example)
    sessions = {(name, t): ort_backend.session(model, t) for name, model in models.items() for t in thread_counts}
    input_names = [i.name for i in sessions["ort", thread_counts[0]].get_inputs()]
    output_names = [o.name for o in sessions["ort", thread_counts[0]].get_outputs()]

    rows, accuracy = [], {}
    for seq in seqs:
        ids = torch.randint(1000, 20000, (1, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones(1, seq, dtype=torch.long)
        feeds = dict(zip(input_names, (ids.numpy(), mask.numpy())))

        def run_torch():
            with torch.inference_mode():
                return module(ids, attention_mask=mask).to_tuple()

        torch.set_num_threads(thread_counts[0])
        reference = sessions["ort", thread_counts[0]].run(None, feeds)
        accuracy[seq] = {"torch": max_abs_errors(reference, [t.numpy() for t in run_torch()], output_names)}
        for name in ("onnxscript", "kernelize"):
            accuracy[seq][name] = max_abs_errors(reference, sessions[name, thread_counts[0]].run(None, feeds),
                                                 output_names)

        flops = bert_flops(module.config, 1, seq)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            calls = {"torch": run_torch}
            for name in ROWS[1:]:
                calls[name] = functools.partial(sessions[name, threads].run, None, feeds)
            print(f"timing seq {seq}, {threads} thread(s) ...", flush=True)
            stats = time_rows(calls, args.runs)
            for name in ROWS:
                s = stats[name]
                rows.append({"row": name, "seq": seq, "threads": threads, **s,
                             "flop_fraction": flops / (peak * 1e9) / (s["median_ms"] / 1e3),
                             "speedup_vs_onnxscript": stats["onnxscript"]["median_ms"] / s["median_ms"],
                             "speedup_vs_ort": stats["ort"]["median_ms"] / s["median_ms"]})

    target = {f"seq{r['seq']}_threads{r['threads']}": r["speedup_vs_onnxscript"] >= 1.0
              for r in rows if r["row"] == "kernelize"}
    data = {
        "benchmark": "latency",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, real weights)",
        "machine": info,
        "settings": {"batch": 1, "seqs": seqs, "threads": thread_counts, "runs": args.runs,
                     "block": BLOCK, "warmup": WARMUP, "inter_op_threads": 1,
                     "ort_graph_optimization_level": "ORT_ENABLE_ALL"},
        "sgemm_gflops_1thread": {str(n): r for n, r in sgemm.items()},
        "sgemm_peak_gflops": peak,
        "model_gflop": {str(seq): bert_flops(module.config, 1, seq) / 1e9 for seq in seqs},
        "build": build_info,
        "max_abs_error_vs_ort": {str(seq): errs for seq, errs in accuracy.items()},
        "kernelize_no_slower_than_onnxscript": target,
        "rows": rows,
    }
    path = write_json("latency", data)

    print(f"\n{'seq':>4} {'thr':>3}  {'row':<11}{'median ms':>10}{'p10':>9}{'p90':>9}"
          f"{'flop frac':>10}{'vs onnxscript':>14}{'vs ort':>8}")
    for r in rows:
        print(f"{r['seq']:>4} {r['threads']:>3}  {r['row']:<11}{r['median_ms']:>10.2f}{r['p10_ms']:>9.2f}"
              f"{r['p90_ms']:>9.2f}{r['flop_fraction']:>10.2f}{r['speedup_vs_onnxscript']:>13.2f}x"
              f"{r['speedup_vs_ort']:>7.2f}x")
    print("\nmax abs error vs the raw export on ORT:")
    for seq, errs in accuracy.items():
        print(f"  seq {seq}: " + "; ".join(
            f"{name} " + ", ".join(f"{o} {e:.2e}" for o, e in per_output.items())
            for name, per_output in errs.items()))
    ours, theirs = build_info["op_counts"]["kernelize"], build_info["op_counts"]["onnxscript"]
    diff = {op: (ours.get(op, 0), theirs.get(op, 0)) for op in sorted(set(ours) | set(theirs))
            if ours.get(op, 0) != theirs.get(op, 0)}
    print("\nop counts that differ (kernelize vs onnxscript): "
          + (", ".join(f"{op} {a} vs {b}" for op, (a, b) in diff.items()) or "none"))
    print(f"kernelize no slower than onnxscript: {target}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
