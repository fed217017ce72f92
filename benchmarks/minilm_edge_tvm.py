"""The shift-add MiniLM on TVM: end-to-end latency and weight bytes against the exact builds.

    .venv/bin/python benchmarks/minilm_edge_tvm.py          # --seq 256 --calib-samples 16

all-MiniLM-L6-v2 (real weights), batch 1, one thread. Three artifacts are written to a
temporary folder and loaded the way a user runs them (``kernelize.deploy.runner.load``):

- ``ort_original``: ONNX Runtime on the captured model, no rewrite (the baseline);
- ``tvm_exact``: ``kernelize.optimize(..., backend="tvm")``, kernelize's exact fused model;
- ``tvm_shiftadd``: the same with ``rewrites=["projection=shiftadd"]`` (every projection
  that calibrates becomes ``ShiftAddLinear``, 2 terms, as the ``edge`` recipe chooses on this
  model), calibrated on real text (``kernelize.models.corpus``, calibration modules).

They run on the same held-out passage in interleaved rounds (rotating order, 2 untimed then
``--runs`` timed calls per turn); medians and minima over the rounds' medians are reported,
with the embedding cosine of each against the baseline and the bytes of the constants.
Writes ``benchmarks/results/minilm_edge_tvm.json`` (with the machine's load average).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kernelize  # noqa: E402
from kernelize.backends import ort as ort_backend  # noqa: E402
from kernelize.deploy import runner as runner_mod  # noqa: E402
from kernelize.frontends import torch as torch_frontend  # noqa: E402
from kernelize.models import minilm  # noqa: E402
from minilm_approx import constant_bytes, text_inputs  # noqa: E402


def embedding(outputs: dict, mask: np.ndarray) -> np.ndarray:
    """The sentence embedding from the first output (the token states)."""
    return minilm.mean_pool(next(iter(outputs.values())), mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import onnx_ir as ir

    started = time.time()
    load_before = list(os.getloadavg())
    module, example = minilm.build(batch=2, seq=16)
    model_bytes = ir.to_proto(torch_frontend.capture(module, example)).SerializeToString()
    shape = {"batch": 1, "seq": args.seq}
    calib = text_inputs("calibration", args.seq, args.calib_samples)
    feeds = {k: v[:1] for k, v in text_inputs("held_out", args.seq, 1).items()}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the captured model as it is, no kernelize pass at all
        original = ir.from_proto(onnx.load_from_string(model_bytes))
        session = ort_backend.session(original, 1)
        runners = {"ort_original": lambda f: ort_backend.run(session, f)}
        results["ort_original"] = {"constant_bytes": constant_bytes(original)}
        for name, rewrites in (("tvm_exact", None), ("tvm_shiftadd", ["projection=shiftadd"])):
            t = time.perf_counter()
            result = kernelize.optimize(model_bytes, backend="tvm", shape=shape, rewrites=rewrites,
                                        calib=calib if rewrites else None, output_dir=Path(tmp) / name,
                                        measure_latency=False)
            runners[name] = runner_mod.load(Path(tmp) / name, threads=1).run
            results[name] = {"build_s": time.perf_counter() - t, "constant_bytes": constant_bytes(result.model)}
            if rewrites:
                section = result.report["approximate"]
                results[name]["chosen"] = section["summary"]
                results[name]["held_out_calibration_error"] = section["held_out_error"]
        reference = embedding(runners["ort_original"](feeds), feeds["attention_mask"])
        for name, run in runners.items():
            cosine = float(np.sum(reference * embedding(run(feeds), feeds["attention_mask"])))
            results[name]["embedding_cosine_vs_original"] = cosine
        medians: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for round_index in range(args.rounds):
            for k in range(len(names)):
                name = names[(round_index + k) % len(names)]
                run = runners[name]
                run(feeds), run(feeds)
                times = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    run(feeds)
                    times.append((time.perf_counter() - t) * 1e3)
                medians[name].append(statistics.median(times))
        for name in names:
            results[name].update(median_ms=statistics.median(medians[name]), min_ms=min(medians[name]),
                                 round_medians_ms=medians[name])
    base = results["ort_original"]
    for name in names:
        results[name]["time_vs_ort_original"] = results[name]["median_ms"] / base["median_ms"]
        results[name]["bytes_vs_ort_original"] = results[name]["constant_bytes"] / base["constant_bytes"]
    data = {"benchmark": "minilm_edge_tvm", "model": "all-MiniLM-L6-v2 (real weights)", "batch": 1,
            "seq": args.seq, "threads": 1, "settings": vars(args), "machine": machine(),
            "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
            "rows": results, "wall_s": time.time() - started}
    path = write_json("minilm_edge_tvm", data)
    for name in names:
        r = results[name]
        print(f"{name:14s} {r['median_ms']:8.1f} ms ({r['time_vs_ort_original']:.2f}x ORT original)  "
              f"{r['constant_bytes'] / 1e6:6.1f} MB  cosine {r['embedding_cosine_vs_original']:.5f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
