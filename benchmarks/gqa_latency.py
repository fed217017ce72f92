"""A Llama model with grouped-query attention (issue 12): kernelize's fused exact form against
its own unfused export and against onnxscript's ORT fusions, on ONNX Runtime.

Model: ``transformers`` LlamaConfig with random weights (structure, not accuracy): hidden 512,
8 heads, 2 key/value heads, 4 layers, no cache, exported by ``torch.onnx.export(dynamo=True)``
with dynamic batch and sequence. Rows, all fed the same token ids at batch 1, one thread:

  export      the export as written, on ONNX Runtime (all graph optimizations on)
  onnxscript  onnxscript.rewriter.ort_fusions.optimize_for_ort on a copy
  kernelize   kernelize.optimize(copy, recipe="exact") on a copy

Timed in interleaved rounds (ort_backend.interleaved_ms): median, p10-p90; speed is the
export's median over the row's. Also reported: which attention each row ended with.

Run: .venv/bin/python benchmarks/gqa_latency.py [--seqs 128,512] [--rounds 20]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import tempfile
import warnings

import numpy as np

from common import machine, write_json

CONFIG = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, use_cache=False)


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import onnx
    import onnx_ir as ir
    import torch
    import transformers
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    import kernelize
    from kernelize.backends import ort as ort_backend

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    module = transformers.LlamaModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, input_ids):
            return self.module(input_ids=input_ids).last_hidden_state

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = os.path.join(tmp, "llama.onnx")
        batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("sequence", min=2, max=1024)
        torch.onnx.export(Hidden().eval(), (torch.randint(0, 1000, (2, 16)),), path, input_names=["input_ids"],
                          output_names=["hidden"], dynamo=True, dynamic_shapes=({0: batch, 1: seq},),
                          external_data=False)
        proto = onnx.load(path)
    result = kernelize.optimize(proto, measure_latency=False)
    # onnxscript rewrites the proto it was given (from_proto shares it): give it a copy
    fused_onnxscript, fusions = optimize_for_ort(ir.from_proto(onnx.ModelProto.FromString(proto.SerializeToString())))
    models = {"export": ir.from_proto(proto), "onnxscript": fused_onnxscript, "kernelize": result.model}
    rows = {name: {"ops": dict(collections.Counter(n.op_type for n in m.graph if n.op_type in (
        "Softmax", "MultiHeadAttention", "GroupQueryAttention", "Attention", "RotaryEmbedding")
        or n.domain == "kernelize"))} for name, m in models.items()}
    sessions = {name: ort_backend.session(m, threads=1) for name, m in models.items()}
    rng = np.random.default_rng(0)
    results = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        feeds = {"input_ids": rng.integers(0, 1000, (1, seq)).astype(np.int64)}
        outs = {name: ort_backend.run(s, feeds)["hidden"] for name, s in sessions.items()}
        times = ort_backend.interleaved_ms(list(sessions.values()), feeds, rounds=args.rounds)
        entry = {"seq": seq}
        base = times[0]["median_ms"]
        for (name, _), t in zip(sessions.items(), times):
            entry[name] = {**t, "speed_vs_export": base / t["median_ms"],
                           "max_abs_error_vs_export": float(np.max(np.abs(outs[name] - outs["export"])))}
        results.append(entry)
        print({k: (v if k == "seq" else {x: round(y, 4) for x, y in v.items()}) for k, v in entry.items()},
              flush=True)
    data = {"machine": machine(), "config": CONFIG, "onnxscript_fusions": {k: v for k, v in fusions.items() if v},
            "kernelize_sites": result.report["summary"]["sites"], "graph": rows, "results": results}
    print(write_json("gqa_latency", data))


if __name__ == "__main__":
    main()
