"""Approximate rewrites on the real all-MiniLM-L6-v2 with real English text.

    .venv/bin/python benchmarks/minilm_approx.py            # --seqs 256,512 --recipes fast,edge

Calibration text: passages of the Python standard library's docstrings from the modules of
the ``calibration`` split (kernelize.models.corpus); evaluation text: passages from the
disjoint ``held_out`` modules. Per sequence length and recipe:

1. the per-layer, per-method error table (``kernelize.inspect`` with the calibration set:
   site error and end-to-end error of each candidate alone, estimated and measured speed);
2. the recipe under budgets on the sentence-embedding metric (1 - mean cosine of the
   mean-pooled, normalized embeddings, the way sentence-transformers pools), e.g.
   ``--max-error 0.01`` keeps the mean embedding cosine >= 0.99 on held-out calibration
   samples; candidates are fitted once and reused for every budget;
3. on the held-out text: the embedding cosine of the chosen model against the original
   (mean and min) and nearest-neighbour retrieval agreement (each passage queries all
   others; the top-1 neighbour under the rewritten model's embeddings must equal the
   original's);
4. the end-to-end latency of the chosen model against kernelize's exact model (ONNX Runtime,
   batch 1, same process, interleaved rounds).

Writes ``benchmarks/results/minilm_approx.json`` (and prints the tables).
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kernelize  # noqa: E402
from kernelize.backends import ort as ort_backend  # noqa: E402
from kernelize.frontends import torch as torch_frontend  # noqa: E402
from kernelize.models import corpus, minilm  # noqa: E402
from kernelize.report import dumps  # noqa: E402

WORDS_PER_TOKEN = 0.7  # passages a little longer than the sequence: every sample is full


def pooled_cosine_error(reference: dict, candidate: dict, feeds: dict) -> float:
    """1 - mean cosine similarity of the sentence embeddings (mean pool over real tokens)."""
    name = next(iter(reference))
    mask = feeds["attention_mask"]
    a, b = minilm.mean_pool(reference[name], mask), minilm.mean_pool(candidate[name], mask)
    return float(1.0 - np.mean(np.sum(a * b, axis=-1)))


def text_inputs(split: str, seq: int, limit: int) -> dict[str, np.ndarray]:
    passages = corpus.passages(split, words=int(seq * WORDS_PER_TOKEN), limit=limit)
    ids, mask = minilm.tokenize(passages, seq)
    return {"input_ids": ids, "attention_mask": mask}


def embeddings(model, feeds: dict, threads: int, batch_size: int = 8) -> np.ndarray:
    """Sentence embeddings of ``feeds``, ``batch_size`` passages per call (1 for models whose
    dynamic activation quantization takes its range from the whole call)."""
    sess = ort_backend.session(model, threads=threads)
    out = []
    for start in range(0, len(feeds["input_ids"]), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in feeds.items()}
        hidden = sess.run(None, batch)[0]
        out.append(minilm.mean_pool(hidden, batch["attention_mask"]))
    return np.concatenate(out)


def retrieval_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of passages whose nearest other passage is the same under both embeddings."""
    def neighbours(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(neighbours(reference) == neighbours(candidate)))


def latency(models: dict, seq: int, threads: int, rounds: int) -> dict:
    """Batch-1 latency of each model on one held-out passage, in interleaved rounds."""
    feeds = {k: v[:1] for k, v in text_inputs("held_out", seq, 1).items()}
    sessions = [ort_backend.session(m, threads=threads) for m in models.values()]
    return dict(zip(models, ort_backend.interleaved_ms(sessions, feeds, rounds, warmup=3)))


def error_table(section: dict) -> list[dict]:
    rows = []
    for site in section["sites"]:
        for c in site["candidates"]:
            rows.append({"site": site["id"], "layer": site["layer"], "name": site["name"], "method": c["method"],
                         "status": c["status"], "reason": c.get("reason"), "site_error": c.get("site_error"),
                         "end_to_end_error": c.get("end_to_end_error"),
                         "estimated_speedup": c.get("estimated_speedup"),
                         "measured_speedup": c.get("measured_speedup"),
                         "info": {k: v for k, v in c.items() if k in ("features", "window", "sinks", "top_k", "block",
                                                                    "recall", "terms", "prototypes",
                                                                    "weight_bytes", "dense_weight_bytes")}})
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'site':<16} {'method':<20} {'site err':>9} {'1-cos e2e':>10} {'est x':>7} {'meas x':>7}")
    for r in rows:
        fmt = (lambda v, f=".3g": "-" if v is None else format(v, f))
        print(f"{r['site']:<16} {r['method']:<20} {fmt(r['site_error']):>9} {fmt(r['end_to_end_error']):>10} "
              f"{fmt(r['estimated_speedup'], '.2f'):>7} {fmt(r['measured_speedup'], '.2f'):>7}")


def run_case(model_bytes: bytes, exact_model, recipe: str, seq: int, args) -> dict:
    calib = text_inputs("calibration", seq, args.calib_samples)
    held = text_inputs("held_out", seq, args.eval_samples)
    say = (lambda m: print(f"  [{recipe} seq {seq}] {m}", flush=True)) if args.verbose else (lambda m: None)
    cache: dict = {}  # each candidate is fitted and measured once, then reused for every budget
    t = time.perf_counter()
    table = kernelize.inspect(model_bytes, calib=calib, recipe=recipe, metric=pooled_cosine_error,
                              calibration_cache=cache, progress=say)["approximate"]
    inspect_s = time.perf_counter() - t
    rows = error_table(table)
    print_table(rows, f"{recipe}, seq {seq}: per-site candidates (end-to-end metric: 1 - embedding cosine)")
    reference = embeddings(exact_model, held, args.threads)
    budgets = []
    for max_error in (float(e) for e in args.max_errors.split(",")):
        result = kernelize.optimize(model_bytes, recipe=recipe, calib=calib, max_error=max_error,
                                    metric=pooled_cosine_error, measure_latency=False, calibration_cache=cache,
                                    progress=say)
        section = result.report["approximate"]
        rewritten = embeddings(result.model, held, args.threads)
        cos = np.sum(reference * rewritten, axis=-1)
        agreement = retrieval_agreement(reference, rewritten)
        entry = {"max_error": max_error, "chosen": section["chosen"], "summary": section["summary"],
                 "backed_off": section["backed_off"], "held_out_calibration_error": section["held_out_error"],
                 "embedding_cosine": {"mean": float(cos.mean()), "min": float(cos.min())},
                 "retrieval_agreement": agreement,
                 "targets": {"embedding_cosine_mean_ge_0.99": bool(cos.mean() >= 0.99),
                             "retrieval_agreement_ge_0.95": bool(agreement >= 0.95)},
                 "exact_below": {s["id"]: s.get("exact_below") for s in section["sites"] if s.get("chosen")}}
        if recipe == "edge":
            entry["weight_bytes"] = _weight_bytes(exact_model, result.model)
        if section["chosen"]:
            times = latency({"exact": exact_model, recipe: result.model}, seq, args.threads, args.rounds)
            entry.update(latency=times, speedup_vs_exact=times["exact"]["median_ms"] / times[recipe]["median_ms"])
        else:
            entry.update(latency=None, speedup_vs_exact=1.0, note="nothing chosen: the model is the exact one")
        print(f"{recipe}, seq {seq}, max-error {max_error:g}: {section['summary']}; chosen {section['chosen']}; "
              f"held out ({len(cos)} passages): cosine mean {cos.mean():.5f} min {cos.min():.5f}; retrieval "
              f"agreement {agreement:.3f}; speed x{entry['speedup_vs_exact']:.2f}", flush=True)
        budgets.append(entry)
    return {"recipe": recipe, "seq": seq, "metric": "1 - mean pooled-embedding cosine",
            "calibration": {"source": "Python standard-library docstrings, calibration modules",
                            "samples": int(len(calib["input_ids"]))},
            "evaluation": {"source": "Python standard-library docstrings, held-out modules",
                           "passages": int(len(held["input_ids"]))},
            "error_table": rows, "budgets": budgets, "inspect_s": inspect_s, "threads": args.threads}


def constant_bytes(model) -> int:
    """Bytes of a model's constant tensors."""
    return int(sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None))


def _weight_bytes(exact_model, model) -> dict:
    """Bytes of the constant tensors of both models."""
    return {"exact": constant_bytes(exact_model), "rewritten": constant_bytes(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="256,512")
    parser.add_argument("--recipes", default="fast,edge")
    parser.add_argument("--max-errors", default="0.01,0.005,0.002",
                        help="budgets (1 - embedding cosine) to select under, each evaluated on held-out text")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--name", default="minilm_approx", help="results/<name>.json")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid> prints where a long run is

    import onnx_ir as ir

    say = print if args.verbose else (lambda m: None)
    say("capturing all-MiniLM-L6-v2")
    module, example = minilm.build(batch=2, seq=16)
    model_bytes = ir.to_proto(torch_frontend.capture(module, example)).SerializeToString()
    say("optimizing it exactly (the baseline)")
    exact = kernelize.optimize(model_bytes, measure_latency=False).model
    previous = RESULTS / f"{args.name}.json"  # cases of other (recipe, seq) pairs are kept
    cases = json.loads(previous.read_text())["cases"] if previous.exists() else []
    for seq in (int(s) for s in args.seqs.split(",")):
        for recipe in args.recipes.split(","):
            case = run_case(model_bytes, exact, recipe, seq, args)
            case["machine"] = machine()
            cases = [c for c in cases if (c["recipe"], c["seq"]) != (recipe, seq)] + [case]
            data = {"benchmark": "minilm_approx", "settings": vars(args), "cases": cases}
            path = write_json(args.name, json.loads(dumps(data)))  # numpy scalars -> plain JSON
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
