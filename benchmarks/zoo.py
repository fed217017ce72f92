"""Coverage of the model zoo (issue 12): per architecture and exporter, the attention sites
kernelize finds and fuses and its error against torch, with onnxscript's ORT fusions of
the same export beside it.

For every (architecture, exporter) of ``kernelize.models.zoo``:
  export       the export's own result (or why it failed)
  kernelize    attention sites fused / attention sites, max abs error of the optimized
               model against the torch module at the check shape (batch 3, length 11, a
               padded row; static exports at their own shape), or the error message
  onnxscript   onnxscript.rewriter.ort_fusions.optimize_for_ort on a copy: attention ops it
               produced (MultiHeadAttention, Attention, GroupQueryAttention) and its error

Writes results/zoo.json and prints the README's markdown table (cells: kernelize fused/sites,
error · onnxscript's attention ops).

Run: .venv/bin/python benchmarks/zoo.py [--archs bert,gpt2] [--exporters dynamo,legacy] [--merge] [--table]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import tempfile
import warnings

import numpy as np

from common import RESULTS, machine, write_json

ATTENTION_OPS = ("MultiHeadAttention", "Attention", "GroupQueryAttention")


def _error(model, module, kind, exporter, zoo, ort_backend) -> float:
    args, _ = zoo.check_inputs(kind, exporter)
    expected = zoo.reference(module, kind, args)
    feeds = {v.name: a.numpy() for v, a in zip(model.graph.inputs, args)}
    actual = ort_backend.run(ort_backend.session(model), feeds)[model.graph.outputs[0].name]
    return float(np.max(np.abs(actual - expected)))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:160]


def one(arch: str, exporter: str) -> dict:
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    import kernelize
    from kernelize.backends import ort as ort_backend
    from kernelize.models import zoo

    row = {"arch": arch, "exporter": exporter}
    module, kind = zoo.build(arch)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proto = zoo.export(module, kind, exporter, os.path.join(tmp, "model.onnx"))
        except Exception as err:  # noqa: BLE001 - the exporter's own failure is the result
            row["export"] = f"failed: {_first_line(err)}"
            return row
    row["export"] = "ok"
    row["softmax"] = sum(n.op_type == "Softmax" for n in proto.graph.node)
    try:
        result = kernelize.optimize(proto, measure_latency=False)
        sites = [s for s in result.report["sites"] if s["kind"] == "attention"]
        left = sum(n.op_type == "Softmax" for n in result.model.graph)
        row["kernelize"] = {"attention_sites": len(sites),
                            "softmax_left": left - zoo.OTHER_SOFTMAX.get(arch, 0) * zoo.LAYERS,
                            "mha_blocks": sum(s.get("rewrite") == "MultiHeadAttention" for s in sites),
                            "error": _error(result.model, module, kind, exporter, zoo, ort_backend)}
    except Exception as err:  # noqa: BLE001
        row["kernelize"] = {"failed": _first_line(err)}
    try:
        fused, _ = optimize_for_ort(ir.from_proto(onnx.ModelProto.FromString(proto.SerializeToString())))  # it edits its input
        ops = collections.Counter(n.op_type for n in fused.graph)
        row["onnxscript"] = {"attention_ops": sum(ops[o] for o in ATTENTION_OPS),
                             "softmax_left": ops["Softmax"],
                             "error": _error(fused, module, kind, exporter, zoo, ort_backend)}
    except Exception as err:  # noqa: BLE001
        row["onnxscript"] = {"failed": _first_line(err)}
    return row


def _cell(row: dict, layers: int, notes: dict) -> str:
    """'kernelize fused/sites, its error · onnxscript's attention ops' for one export."""
    if row["export"] != "ok":
        return f"export fails [{_note(notes, row['export'])}]"
    parts = []
    for name in ("kernelize", "onnxscript"):
        result = row.get(name, {})
        if "failed" in result:
            parts.append(f"{name} fails [{_note(notes, result['failed'])}]")
        elif name == "kernelize":
            sites = result["attention_sites"] + result["softmax_left"]
            parts.append(f"{result['attention_sites']}/{sites}, {result['error']:.0e}")
        else:
            parts.append(f"{result['attention_ops']}")
    return " · ".join(parts)


def _note(notes: dict, text: str) -> int:
    return notes.setdefault(text, len(notes) + 1)


def table(rows: list[dict], layers: int, exporters=None) -> str:
    """One line per architecture, one column per exporter (the README's table)."""
    from kernelize.models import zoo

    exporters = list(exporters or zoo.EXPORTERS)
    by_arch: dict[str, dict] = {}
    for row in rows:
        by_arch.setdefault(row["arch"], {})[row["exporter"]] = row
    notes: dict[str, int] = {}
    lines = ["| architecture | " + " | ".join(exporters) + " |", "|---|" + "---|" * len(exporters)]
    for arch, cells in by_arch.items():
        lines.append(f"| {arch} | " + " | ".join(_cell(cells[e], layers, notes) if e in cells else "-"
                                                 for e in exporters) + " |")
    lines.append("")
    lines += [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(lines)


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from kernelize.models import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(zoo.ARCHITECTURES))
    parser.add_argument("--exporters", default=",".join(zoo.EXPORTERS))
    parser.add_argument("--table", action="store_true", help="print the table of results/zoo.json and stop")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the rows run now in results/zoo.json, keep the others")
    args = parser.parse_args()
    if args.table:
        data = json.loads((RESULTS / "zoo.json").read_text())
        print(table(data["rows"], data["layers"]))
        return
    rows = []
    for arch in args.archs.split(","):
        for exporter in args.exporters.split(","):
            rows.append(one(arch, exporter))
            print(rows[-1], flush=True)
    previous = RESULTS / "zoo.json"
    if args.merge and previous.exists():  # keep the other rows of the last full run
        done = {(r["arch"], r["exporter"]) for r in rows}
        old = [r for r in json.loads(previous.read_text())["rows"] if (r["arch"], r["exporter"]) not in done]
        order = {a: i for i, a in enumerate(zoo.ARCHITECTURES)}
        rows = sorted(old + rows, key=lambda r: (order.get(r["arch"], len(order)), zoo.EXPORTERS.index(r["exporter"])))
    ok = [r for r in rows if r["export"] == "ok"]
    exact = [r for r in ok if "error" in r.get("kernelize", {}) and r["kernelize"]["attention_sites"] == zoo.LAYERS
             and r["kernelize"]["softmax_left"] == 0 and r["kernelize"]["error"] <= 1e-4]
    summary = {"cases": len(rows), "exported": len(ok), "kernelize_fused_and_exact": len(exact),
               "onnxscript_all_attention_fused": sum(r.get("onnxscript", {}).get("attention_ops", 0) >= zoo.LAYERS
                                                     for r in ok)}
    write_json("zoo", {"machine": machine(), "layers": zoo.LAYERS, "summary": summary, "rows": rows})
    print(summary)
    print(table(rows, zoo.LAYERS))


if __name__ == "__main__":
    main()
