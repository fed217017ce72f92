"""Integer projections on the real all-MiniLM-L6-v2: kernelize against ONNX Runtime's own
int8 quantization, on held-out English text, in one process (issue 11).

    .venv/bin/python benchmarks/minilm_int8.py              # --seqs 128,512 --max-errors 0.02,0.01,0.005,0.002

Models, per sequence length (all on ONNX Runtime, batch 1, ``--threads`` threads):

* ``exact``: kernelize's fused fp32 model (the baseline every ratio is against);
* ``ort_fp32``: the exported model as ONNX Runtime runs it with its own graph optimizations;
* ONNX Runtime's quantizer, the anchor: ``quantize_dynamic`` on the exported model with its
  defaults (per-tensor 8-bit weights), with ``per_channel`` + ``reduce_range`` (7-bit weights,
  what its documentation advises on CPUs without VNNI), and the full ORT flow
  (``onnxruntime.transformers.optimizer`` BERT fusion, then ``quantize_dynamic``);
* kernelize ``--rewrite projection=int8`` (dynamic activations) and ``projection=int8-static``
  on every projection, and ``--rewrite 'projection=int8|int8-static' --max-error E`` under
  each ``--max-errors`` budget: the projection half of ``--recipe fast`` (per site the
  faster candidate whose error fits),
  sites admitted while the measured end-to-end error fits and the whole model is measured
  faster; the budget is on 1 - mean pooled-embedding cosine, on held-out calibration
  samples. (``--recipe fast`` also fits the approximate attention candidates, issue 14's
  subject; ``--with-attention`` runs it as such.)

Calibration text: passages of the standard library's docstrings from the ``calibration``
modules; evaluation: ``--eval-samples`` passages from the disjoint ``held_out`` modules, one
passage per call (batch 1: dynamic quantization takes its range from the call). Per model:
embedding cosine against the exact model (mean, min), nearest-neighbour retrieval agreement,
constant bytes, and latency (median, p10, p90 over interleaved rounds, each model's median
over the exact model's: ``speedup_vs_exact``).

Writes ``benchmarks/results/minilm_int8.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402
from minilm_approx import (constant_bytes, embeddings, latency, pooled_cosine_error,  # noqa: E402
                           retrieval_agreement, text_inputs)

import kernelize  # noqa: E402
from kernelize.frontends import torch as torch_frontend  # noqa: E402
from kernelize.models import minilm  # noqa: E402
from kernelize.report import dumps  # noqa: E402


def ort_anchors(model_bytes: bytes, workdir: Path) -> dict:
    """ONNX Runtime's own quantization of the exported model (three ways, see the module doc)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    source = workdir / "exported.onnx"
    source.write_bytes(model_bytes)
    anchors = {}
    for name, options in (("ort_int8", {}), ("ort_int8_per_channel_7bit", {"per_channel": True, "reduce_range": True})):
        out = workdir / f"{name}.onnx"
        quantize_dynamic(source, out, weight_type=QuantType.QInt8, **options)
        anchors[name] = onnx.load(out)
    fused = optimize_model(str(source), model_type="bert", num_heads=12, hidden_size=384, opt_level=1)
    fused_path = workdir / "ort_fused.onnx"
    fused.save_model_to_file(str(fused_path))
    out = workdir / "ort_fused_int8.onnx"
    quantize_dynamic(fused_path, out, weight_type=QuantType.QInt8)
    anchors["ort_optimizer_int8"] = onnx.load(out)
    return anchors


def kernelize_models(model_bytes: bytes, calib: dict, args, say) -> tuple[dict, dict]:
    """kernelize's int8 models: every projection forced, and the fast recipe under budgets."""
    models, sections = {}, {}
    for method in ("int8", "int8-static"):
        t = time.perf_counter()
        result = kernelize.optimize(model_bytes, calib=calib, rewrites=[f"projection={method}"],
                                    metric=pooled_cosine_error, measure_latency=False, progress=say)
        name = f"kernelize_all_{method}"
        models[name], sections[name] = result.model, dict(result.report["approximate"], optimize_s=time.perf_counter() - t)
    cache: dict = {}  # candidates fitted once, reused for every budget
    for max_error in args.max_errors:
        t = time.perf_counter()
        kinds = {"recipe": "fast"} if args.with_attention else {"rewrites": ["projection=int8|int8-static"]}
        result = kernelize.optimize(model_bytes, **kinds, calib=calib, max_error=max_error,
                                    metric=pooled_cosine_error, measure_latency=False,
                                    calibration_cache=cache, threads=args.threads, progress=say)
        name = f"kernelize_{'fast' if args.with_attention else 'int8'}_{max_error:g}"
        models[name] = result.model
        sections[name] = dict(result.report["approximate"], optimize_s=time.perf_counter() - t)
    return models, sections


def summarize(section: dict) -> dict:
    chosen = section.get("chosen") or {}
    return {"summary": section.get("summary"), "chosen": len(chosen),
            "chosen_methods": sorted(set(chosen.values())) if isinstance(chosen, dict) else chosen,
            "sites": len(section.get("sites", [])), "held_out_calibration_error": section.get("held_out_error"),
            "selection_latency": section.get("latency"), "notes": section.get("notes"),
            "optimize_s": section.get("optimize_s")}


def run_seq(model_bytes: bytes, exact, anchors: dict, seq: int, args, say) -> dict:
    calib = text_inputs("calibration", seq, args.calib_samples)
    held = text_inputs("held_out", seq, args.eval_samples)
    say(f"seq {seq}: fitting kernelize's int8 models")
    ours, sections = kernelize_models(model_bytes, calib, args, say)
    import onnx

    models = {"exact": exact, "ort_fp32": onnx.load_from_string(model_bytes), **anchors, **ours}
    say(f"seq {seq}: held-out embeddings of {len(models)} models")
    reference = embeddings(exact, held, args.threads, batch_size=1)
    rows = {}
    for name, model in models.items():
        emb = reference if name == "exact" else embeddings(model, held, args.threads, batch_size=1)
        cos = np.sum(reference * emb, axis=-1)
        rows[name] = {"embedding_cosine": {"mean": float(cos.mean()), "min": float(cos.min())},
                      "retrieval_agreement": retrieval_agreement(reference, emb),
                      "constant_bytes": _bytes(model)}
        if name in sections:
            rows[name]["kernelize"] = summarize(sections[name])
    say(f"seq {seq}: latency, {args.rounds} interleaved rounds")
    times = latency(models, seq, args.threads, args.rounds)
    for name, row in rows.items():
        row["latency"] = times[name]
        row["speedup_vs_exact"] = times["exact"]["median_ms"] / times[name]["median_ms"]
    print(f"\nseq {seq}, batch 1, {args.threads} thread(s), {len(held['input_ids'])} held-out passages")
    print(f"{'model':<34} {'x exact':>8} {'ms (p10-p90)':>20} {'cos mean':>9} {'cos min':>8} {'retr':>6} {'MB':>6}")
    for name, row in rows.items():
        lat = row["latency"]
        print(f"{name:<34} {row['speedup_vs_exact']:>8.2f} "
              f"{lat['median_ms']:>7.1f} ({lat['p10_ms']:.1f}-{lat['p90_ms']:.1f}) {row['embedding_cosine']['mean']:>9.5f} "
              f"{row['embedding_cosine']['min']:>8.4f} {row['retrieval_agreement']:>6.3f} {row['constant_bytes'] / 1e6:>6.1f}")
    return {"seq": seq, "calibration_samples": int(len(calib["input_ids"])),
            "evaluation_passages": int(len(held["input_ids"])), "models": rows}


def _bytes(model) -> int:
    import onnx
    import onnx_ir as ir

    return constant_bytes(ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--max-errors", default="0.02,0.01,0.005,0.002",
                        type=lambda s: [float(e) for e in s.split(",")])
    parser.add_argument("--with-attention", action="store_true", help="the budgets with the whole fast recipe")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)
    import onnx_ir as ir

    say = (lambda m: print(f"  {m}", flush=True)) if args.verbose else (lambda m: None)
    module, example = minilm.build(batch=2, seq=16)
    model_bytes = ir.to_proto(torch_frontend.capture(module, example)).SerializeToString()
    exact = kernelize.optimize(model_bytes, measure_latency=False).model
    with tempfile.TemporaryDirectory() as tmp:
        anchors = ort_anchors(model_bytes, Path(tmp))
    previous = RESULTS / "minilm_int8.json"  # cases at other lengths are kept
    cases = json.loads(previous.read_text())["cases"] if previous.exists() else []
    for seq in (int(s) for s in args.seqs.split(",")):
        case = dict(run_seq(model_bytes, exact, anchors, seq, args, say), settings=vars(args), machine=machine())
        cases = sorted([c for c in cases if c["seq"] != seq] + [case], key=lambda c: c["seq"])
        path = write_json("minilm_int8", json.loads(dumps({"benchmark": "minilm_int8", "cases": cases})))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
