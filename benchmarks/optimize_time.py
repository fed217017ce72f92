"""How long kernelize.optimize takes on BERT-large-shaped models (12, 24 and 48 layers).

Each model (hidden 1024, 16 heads, intermediate 4096, vocab 1000, random weights) is
exported once with kernelize.frontends.torch.capture; the export time is reported apart.
Then kernelize.optimize(model, measure_latency=False) is timed, split into its phases
from report["timings"]:

  load      capture_s   (copy, check, opset upgrade and shape inference of the input)
  rewrite   optimize_s + lower_s   (canonicalize + fuse + lower: the rewrite work)
  verify    verify_s    (numerical check against the original on small shapes)

Targets: rewrite under 5 s for 24 layers, and at most 2x when the layer count doubles.
A 48-layer BERT-large holds 2.4 GB of weights, over protobuf's 2 GB limit, so 12 -> 24
layers is measured as well; a failure (at export or optimize) is recorded, not hidden.

Run: .venv/bin/python benchmarks/optimize_time.py [--layers 12,24,48]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

from common import machine, write_json

TARGET_24_S = 5.0
TARGET_SCALING = 2.0


def bert_large(layers: int, seq: int):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                        num_hidden_layers=layers, vocab_size=1000)
    module = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, seq, dtype=torch.long)
    return module, (ids, mask), sum(p.numel() for p in module.parameters())


def measure(layers: int, seq: int) -> dict:
    import kernelize
    from kernelize.errors import KernelizeError
    from kernelize.frontends.torch import capture

    module, inputs, params = bert_large(layers, seq)
    row = {"layers": layers, "parameters": params}
    start = time.perf_counter()
    try:
        exported = capture(module, inputs)
    except KernelizeError as err:
        row.update(error=f"export: {err}", failed_after_s=time.perf_counter() - start)
        return row
    row["export_s"] = time.perf_counter() - start
    del module
    gc.collect()

    start = time.perf_counter()
    try:
        result = kernelize.optimize(exported, measure_latency=False)
    except KernelizeError as err:
        row.update(error=f"optimize: {err}", failed_after_s=time.perf_counter() - start)
        return row
    wall = time.perf_counter() - start
    t = result.report["timings"]
    row.update(
        load_s=t["capture_s"], canonicalize_s=t.get("canonicalize_s"), fuse_s=t.get("fuse_s"),
        canonicalize_fuse_s=t["optimize_s"], lower_s=t["lower_s"],
        verify_s=t["verify_s"], optimize_s=t["optimize_s"] + t["lower_s"], total_wall_s=wall,
        sites=result.report["summary"]["sites"], lowered=result.report["lowered"],
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="12,24,48", help="comma-separated layer counts (default 12,24,48)")
    parser.add_argument("--seq", type=int, default=32, help="sequence length of the export example")
    args = parser.parse_args()
    layer_counts = [int(x) for x in args.layers.split(",")]

    rows = []
    for layers in layer_counts:
        print(f"{layers} layers: exporting and optimizing ...", flush=True)
        rows.append(measure(layers, args.seq))
        gc.collect()

    done = {r["layers"]: r["optimize_s"] for r in rows if "optimize_s" in r}
    targets = {}
    if 24 in done:
        targets["optimize_24_under_5s"] = done[24] < TARGET_24_S
    for layers in sorted(done):
        if 2 * layers in done:
            ratio = done[2 * layers] / done[layers]
            targets[f"scaling_{2 * layers}_over_{layers}"] = ratio
            targets[f"scaling_{2 * layers}_over_{layers}_at_most_2x"] = ratio <= TARGET_SCALING

    data = {
        "benchmark": "optimize_time",
        "machine": machine(),
        "settings": {"hidden": 1024, "heads": 16, "intermediate": 4096, "vocab": 1000,
                     "export_batch": 1, "export_seq": args.seq, "layers": layer_counts},
        "rows": rows,
        "targets": targets,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    path = write_json("optimize_time", data)

    print(f"\n{'layers':>6} {'params':>8} {'export':>8} {'load':>7} {'rewrite':>8} {'= c+f':>7} "
          f"{'+ lower':>7} {'verify':>7} {'total':>7}   (seconds)")
    for r in rows:
        if "error" in r:
            print(f"{r['layers']:>6} {r['parameters'] / 1e6:>7.0f}M  "
                  f"FAILED after {r['failed_after_s']:.1f} s: {r['error']}")
            continue
        print(f"{r['layers']:>6} {r['parameters'] / 1e6:>7.0f}M {r['export_s']:>8.2f} {r['load_s']:>7.2f} "
              f"{r['optimize_s']:>8.2f} {r['canonicalize_fuse_s']:>7.2f} {r['lower_s']:>7.2f} "
              f"{r['verify_s']:>7.2f} {r['total_wall_s']:>7.2f}")
    for name, value in targets.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"peak RSS {data['peak_rss_gib']:.1f} GiB; wrote {path}")


if __name__ == "__main__":
    main()
