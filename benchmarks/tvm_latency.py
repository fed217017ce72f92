"""TVM (default schedules) against ONNX Runtime on all-MiniLM-L6-v2, batch 1.

    .venv/bin/python benchmarks/tvm_latency.py            # --seqs 128 --threads 1,2

TVM's CPU thread pool is fixed per process once it has run, so each thread count runs in
its own child process (TVM_NUM_THREADS set before TVM starts); TVM and ONNX Runtime are
timed in interleaved rounds inside it (``kernelize.backends.tvm.benchmark``). Writes
benchmarks/results/tvm_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(seq: int, threads: int) -> dict:
    import onnx_ir as ir

    from kernelize.backends import tvm as tvm_backend
    from kernelize.frontends.torch import capture
    from kernelize.models import minilm
    from kernelize.passes.canonicalize import canonicalize
    from kernelize.passes.fuse import fuse

    module, inputs = minilm.build(batch=2, seq=16)
    model = capture(module, inputs)
    canonicalize(model)
    fuse(model)
    return tvm_backend.benchmark(ir.to_proto(model), shape={"batch": 1, "seq": seq}, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(*args.child), default=str))
        return
    from common import machine, write_json

    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        for threads in [int(t) for t in args.threads.split(",")]:
            env = dict(os.environ, TVM_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
            proc = subprocess.run([sys.executable, __file__, "--child", str(seq), str(threads)],
                                  capture_output=True, text=True, env=env, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["seq"] = seq
            rows.append(row)
            print(f"seq {seq} threads {threads}: TVM {row['tvm']['median_ms']:.2f} ms, "
                  f"ORT {row['ort']['median_ms']:.2f} ms, ratio {row['ratio']:.2f}, "
                  f"max abs error {row['max_abs_error']:.2e}", flush=True)
    write_json("tvm_latency", {"benchmark": "tvm_latency", "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
