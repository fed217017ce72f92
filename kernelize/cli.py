"""The ``kernelize`` command. Exit codes: 0 ok, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_MODEL = "kernelize.models.minilm:build"
DEFAULT_OUTPUT = "kernelize-out"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"kernelize: error: {message}", file=sys.stderr)
        sys.exit(2)


def _progress(quiet: bool):
    start = time.perf_counter()

    def say(message: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def build_parser() -> argparse.ArgumentParser:
    from kernelize.api import RECIPES
    from kernelize.backends import BACKENDS

    parser = _Parser(prog="kernelize", description="Fuse transformer subgraphs into fast, verified operators.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    model_help = ("an .onnx file or 'package.module:function' returning (torch.nn.Module, example_inputs); "
                  f"default: the embedded all-MiniLM-L6-v2 ({DEFAULT_MODEL})")

    opt = sub.add_parser("optimize", help="optimize a model and write an artifact folder",
                         description="Capture, fuse, verify and save a model.")
    opt.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    opt.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"artifact folder (default: {DEFAULT_OUTPUT})")
    opt.add_argument("--recipe", default="exact", help=f"rewrite recipe: {', '.join(RECIPES)} (default: exact)")
    opt.add_argument("--backend", default="ort", help=f"backend: {', '.join(BACKENDS)} (default: ort)")
    opt.add_argument("--force", action="store_true", help="replace an existing output folder")
    opt.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency measurement")
    opt.add_argument("--no-latency", action="store_true", help="skip the before/after latency measurement")
    opt.add_argument("-q", "--quiet", action="store_true", help="no progress messages")

    ins = sub.add_parser("inspect", help="list the attention/norm/FFN sites and near misses",
                         description="Show which sites kernelize finds, and why near misses were not taken.")
    ins.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _inspect_table(result: dict) -> str:
    lines = [f"model: {result['model']}"]
    for site in result["sites"]:
        extra = {k: v for k, v in site.items() if k not in ("id", "kind", "pattern", "rewrite", "output", "nodes")}
        lines.append(f"  {site['id']:<18} {site['pattern']:<22} -> {site['rewrite']:<26} {extra}")
    counts = result["summary"]["sites"]
    lines.append("sites: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    for miss in result["near_misses"]:
        lines.append(f"  near miss: {miss['pattern']} at {miss['node']}: {miss['reason']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kernelize.errors import KernelizeError, UsageError

    try:
        if args.command == "optimize":
            from kernelize.api import optimize
            from kernelize.report import table

            if args.threads < 1:
                raise UsageError("--threads must be at least 1")
            result = optimize(args.model, recipe=args.recipe, backend=args.backend, output_dir=args.output,
                              force=args.force, measure_latency=not args.no_latency, threads=args.threads,
                              progress=_progress(args.quiet))
            print(table(result.report))
            print(f"wrote {result.path}")
        else:
            from kernelize.api import inspect

            result = inspect(args.model)
            print(json.dumps(result, indent=2, default=str) if args.json else _inspect_table(result))
    except UsageError as err:
        print(f"kernelize: error: {err}", file=sys.stderr)
        return 2
    except KernelizeError as err:
        print(f"kernelize: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kernelize: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
