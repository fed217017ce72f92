"""TVM (default schedules, and MetaSchedule-tuned) against ONNX Runtime on all-MiniLM-L6-v2, batch 1.

    .venv/bin/python benchmarks/tvm_latency.py            # --seqs 128 --threads 1,2 --tune 160

Rows per (sequence length, thread count), all in one process, on the same inputs:

- ``ort``: ONNX Runtime running kernelize's fused model after the ort lowering;
- ``tvm_default``: ``kernelize.backends.tvm.build(model, "cpu")`` (kernelize's own schedules);
- ``tvm_tuned``: the same with ``tune_trials=N, tuning_db=benchmarks/tuning/minilm_cpu_seq<S>``.

TVM's CPU thread pool is sized once per process, so each thread count runs in its own child
process (TVM_NUM_THREADS set before TVM starts). The first child tunes whatever kernels the
database lacks (the tuning time is recorded) and later children and later runs reuse the
database (the committed one makes a rerun fast). Inside a child, the three rows are timed in
interleaved rounds (rotating order; each turn: 2 untimed calls, then ``--runs`` timed ones)
so that load from elsewhere hits them alike; the median and minimum over the rounds' medians
are reported. The machine's load average is recorded before and after each child.
Writes benchmarks/results/tvm_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TUNING = Path(__file__).resolve().parent / "tuning"
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")  # what JSONDatabase keeps
TUNING_RUN = "tuning_run.json"  # beside them: when and how long the database's tuning took
HIGH_LOAD = 1.5  # 1-minute load average above which the numbers are flagged (2 cores here)


def fused_minilm():
    """all-MiniLM-L6-v2 (real weights) captured with dynamic batch/seq, canonicalized and fused."""
    from kernelize.frontends.torch import capture
    from kernelize.models import minilm
    from kernelize.passes.canonicalize import canonicalize
    from kernelize.passes.fuse import fuse

    module, inputs = minilm.build(batch=2, seq=16)
    model = capture(module, inputs)
    canonicalize(model)
    fuse(model)
    return model


def one(seq: int, threads: int, trials: int, tuning_db: str, rounds: int, runs: int) -> dict:
    """The three rows for one (seq, threads), in this process (TVM_NUM_THREADS already set)."""
    import numpy as np
    import onnx_ir as ir

    from kernelize.backends import ort as ort_backend
    from kernelize.backends import tvm as tvm_backend
    from kernelize.passes import verify

    proto = ir.to_proto(fused_minilm())
    shape = {"batch": 1, "seq": seq}
    start = time.perf_counter()
    default = tvm_backend.build(proto, "cpu", shape=shape)
    default_build_s = time.perf_counter() - start
    start = time.perf_counter()
    tuned = tvm_backend.build(proto, "cpu", shape=shape, tune_trials=trials, tuning_db=tuning_db)
    tuned_build_s = time.perf_counter() - start

    feeds = verify.random_inputs(ir.from_proto(proto), 1, seq)
    lowered = ir.from_proto(proto)
    ort_backend.lower(lowered)
    session = ort_backend.session(lowered, threads)
    expected = ort_backend.run(session, feeds)
    runners = {"tvm_default": default.runner(threads=threads), "tvm_tuned": tuned.runner(threads=threads)}
    pool_threads = {name: r.threads for name, r in runners.items()}
    errors = {name: max(float(np.max(np.abs(a - expected[n]))) for a, n in zip(r.run(feeds), default.outputs))
              for name, r in runners.items()}

    timers = {"ort": lambda: ort_backend.latency_ms(session, feeds, runs, 2)["median_ms"],
              "tvm_default": lambda: runners["tvm_default"].latency_ms(feeds, runs, 2)["median_ms"],
              "tvm_tuned": lambda: runners["tvm_tuned"].latency_ms(feeds, runs, 2)["median_ms"]}
    names = list(timers)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for k in range(len(names)):
            name = names[(round_index + k) % len(names)]
            medians[name].append(timers[name]())

    tuning = tuned.tuning or {}
    kernels = tuning.get("kernels", {})
    row = {"seq": seq, "threads": threads, "tvm_pool_threads": pool_threads}
    for name in names:
        row[name] = {"median_ms": statistics.median(medians[name]), "min_ms": min(medians[name]),
                     "round_medians_ms": medians[name]}
    ort_ms = row["ort"]["median_ms"]
    for name in ("tvm_default", "tvm_tuned"):
        row[name]["ratio_vs_ort"] = row[name]["median_ms"] / ort_ms
        row[name]["ratio_min_vs_ort"] = row[name]["min_ms"] / row["ort"]["min_ms"]
        row[name]["max_abs_error_vs_ort"] = errors[name]
    row["tvm_default"].update(build_s=default_build_s, build_timings=default.timings)
    row["tvm_tuned"].update(
        build_s=tuned_build_s, build_timings=tuned.timings, tune_s=tuned.timings.get("tune_s"),
        trials=trials, database=os.path.relpath(tuning_db, Path(__file__).resolve().parents[1]),
        kernels_tuned_now=tuning.get("tuned"), kernels_from_database=tuning.get("reused"),
        database_reused=tuning.get("tuned") == 0,
        kernels_tuned_schedule_chosen=tuning.get("chosen_tuned"), kernels_timed=len(kernels),
        schedules_from_database=sum(1 for rule in tuned.schedules.values() if rule == "tuned"))
    row["targets"] = {"default_within_2x": row["tvm_default"]["ratio_vs_ort"] <= 2.0,
                      "tuned_within_1.1x": row["tvm_tuned"]["ratio_vs_ort"] <= 1.1}
    return row


def compact_database(folder: Path) -> None:
    """Shrink the tuning database to what a rebuild reads, so that it can be committed: the
    workloads, and per workload only its fastest record (the build applies the top record;
    the tuner's other candidates are dropped). MetaSchedule's logs are removed too."""
    import shutil

    for entry in folder.iterdir():
        if entry.name not in DATABASE_FILES + (TUNING_RUN,):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    records = folder / DATABASE_FILES[1]
    if not records.is_file():
        return
    best: dict[int, tuple[float, str]] = {}
    for line in records.read_text().splitlines():
        if not line.strip():
            continue
        workload, (_trace, run_secs, *_rest) = json.loads(line)
        if not run_secs:  # a candidate that failed to build or run
            continue
        seconds = sum(run_secs) / len(run_secs)
        if workload not in best or seconds < best[workload][0]:
            best[workload] = (seconds, line)
    tmp = records.with_suffix(".tmp")
    tmp.write_text("".join(best[w][1] + "\n" for w in sorted(best)))
    os.replace(tmp, records)


def record_tuning_run(db: Path, row: dict) -> None:
    """Write ``tuning_run.json`` beside the database: the tuning time a rerun does not spend again."""
    tuned = row["tvm_tuned"]
    run = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "trials": tuned["trials"], "tune_s": tuned["tune_s"],
           "kernels_tuned": tuned["kernels_tuned_now"], "tvm_threads_while_tuning": row["threads"],
           "load_average_1m": row["load_average_1m"]}
    (db / TUNING_RUN).write_text(json.dumps(run, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tune", type=int, default=160, metavar="N", help="MetaSchedule trials (default: 160)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per child (default: 7)")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per row and round (default: 10)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tune < 1:
        parser.error("--tune must be at least 1")
    if args.child:
        seq, threads, db = json.loads(args.child)
        print(json.dumps(one(seq, threads, args.tune, db, args.rounds, args.runs), default=str))
        return
    from common import machine, write_json

    rows = []
    tuning_runs = {}  # per database: the run that tuned it (this one, or an earlier one)
    for seq in [int(s) for s in args.seqs.split(",")]:
        db = TUNING / f"minilm_cpu_seq{seq}"
        had_database = all((db / name).is_file() for name in DATABASE_FILES)
        for threads in [int(t) for t in args.threads.split(",")]:
            env = dict(os.environ, TVM_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
            load_before = os.getloadavg()
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([seq, threads, str(db)]),
                                   "--tune", str(args.tune), "--rounds", str(args.rounds), "--runs", str(args.runs)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"child for seq {seq}, {threads} thread(s) failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            load_after = os.getloadavg()
            row["child_wall_s"] = time.perf_counter() - started
            row["database_existed_before_this_run"] = had_database
            row["load_average_1m"] = {"before": load_before[0], "after": load_after[0]}
            row["high_load"] = max(load_before[0], load_after[0]) > HIGH_LOAD
            rows.append(row)
            if row["tvm_tuned"]["kernels_tuned_now"]:
                record_tuning_run(db, row)
            tune_s = row["tvm_tuned"]["tune_s"]
            print(f"seq {seq} threads {threads}: ORT {row['ort']['median_ms']:.2f} ms, "
                  f"TVM default {row['tvm_default']['median_ms']:.2f} ms ({row['tvm_default']['ratio_vs_ort']:.2f}x), "
                  f"TVM tuned {row['tvm_tuned']['median_ms']:.2f} ms ({row['tvm_tuned']['ratio_vs_ort']:.2f}x); "
                  f"tuning {tune_s:.0f} s, {row['tvm_tuned']['kernels_tuned_now']} kernel(s) tuned now, "
                  f"{row['tvm_tuned']['kernels_from_database']} from the database; "
                  f"max abs error {max(row['tvm_default']['max_abs_error_vs_ort'], row['tvm_tuned']['max_abs_error_vs_ort']):.1e}; "
                  f"load {load_before[0]:.2f} -> {load_after[0]:.2f}"
                  + (" (HIGH: numbers unreliable)" if row["high_load"] else ""), flush=True)
        compact_database(db)
        if (db / TUNING_RUN).is_file():
            tuning_runs[f"seq{seq}"] = json.loads((db / TUNING_RUN).read_text())
    notes = []
    if any(row["high_load"] for row in rows):
        notes.append(f"the load average exceeded {HIGH_LOAD} during some rows (other work on this shared "
                     "machine): those timings are noisy; see each row's load_average_1m")
    write_json("tvm_latency", {"benchmark": "tvm_latency", "machine": machine(),
                               "settings": {"tune_trials": args.tune, "rounds": args.rounds, "runs": args.runs,
                                            "batch": 1, "model": "all-MiniLM-L6-v2 (real weights), fused"},
                               "tuning_runs": tuning_runs, "notes": notes, "rows": rows})


if __name__ == "__main__":
    main()
