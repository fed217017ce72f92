"""The ``kernelize`` command. Exit codes: 0 ok, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

DEFAULT_MODEL = "kernelize.models.minilm:build"
DEFAULT_OUTPUT = "kernelize-out"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"kernelize: error: {message}", file=sys.stderr)
        sys.exit(2)


def _progress(quiet: bool):
    """Progress lines on stderr, and bars for the long steps on a terminal (kernelize.progress)."""
    from kernelize.progress import Progress

    return Progress(quiet)


DEPLOY_COMMANDS = ("run", "bench", "deploy", "pack")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; for the deploy commands (``command``) without importing the compiler."""
    from kernelize.backends import BACKENDS

    if command in DEPLOY_COMMANDS:
        RECIPES = ("exact",)  # only for optimize's help, not shown here
    else:
        from kernelize.api import RECIPES

    from kernelize import __version__

    parser = _Parser(prog="kernelize", description="Fuse transformer subgraphs into fast, verified operators.")
    parser.add_argument("--version", action="version", version=f"kernelize {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    model_help = ("an .onnx file, a Hugging Face model folder, or 'package.module:function' returning "
                  "(torch.nn.Module, example_inputs); "
                  f"default: the embedded all-MiniLM-L6-v2 ({DEFAULT_MODEL})")

    opt = sub.add_parser("optimize", help="optimize a model and write an artifact folder",
                         description="Capture, fuse, verify and save a model.")
    opt.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    opt.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"artifact folder (default: {DEFAULT_OUTPUT})")
    opt.add_argument("--recipe", default="exact", help=f"rewrite recipe: {', '.join(RECIPES)} (default: exact)")
    opt.add_argument("--backend", default="ort", help=f"backend: {', '.join(BACKENDS)} (default: ort)")
    opt.add_argument("--target", default="cpu",
                     help="cpu (default), cuda, cuda:sm_90, arm64 or a TVM target as JSON (tvm backend)")
    opt.add_argument("--shape", default=None, metavar="batch=B,seq=S",
                     help="shape the tvm build is specialized to (default: batch=1,seq=128)")
    opt.add_argument("--tune", type=int, default=0, metavar="N",
                     help="MetaSchedule trials for the tvm cpu target (default: 0, no tuning)")
    opt.add_argument("--tuning-db", default=None, help="folder of tuning records, reused by later runs")
    opt.add_argument("--force", action="store_true", help="replace an existing output folder")
    opt.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency measurement")
    opt.add_argument("--no-latency", action="store_true", help="skip the before/after latency measurement")
    opt.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    _add_approximate_options(opt, budget=True)

    ins = sub.add_parser("inspect", help="list the attention/norm/FFN sites and near misses",
                         description="Show which sites kernelize finds, and why near misses were not taken.")
    ins.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--recipe", default=None,
                     help="with fast or edge: list each candidate approximate rewrite per site")
    ins.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    _add_approximate_options(ins, budget=False)
    _add_deploy_commands(sub)
    from kernelize import compare

    compare.add_parser(sub)
    return parser


def _add_approximate_options(parser, budget: bool) -> None:
    parser.add_argument("--calib", default=None, metavar="INPUTS.npz",
                        help="calibration inputs for approximate rewrites: one array per model input, samples on "
                             "axis 0 (default: synthesized from the model's signature)")
    parser.add_argument("--calib-text", default=None, metavar="FILE|DIR",
                        help="calibration text: a file with one passage per line, or a folder with one passage "
                             "per file, tokenized with the model folder's tokenizer (or --tokenizer)")
    parser.add_argument("--calib-seq", type=int, default=None, metavar="N",
                        help="tokens per calibration passage, padded or truncated (default: 128)")
    parser.add_argument("--calib-samples", type=int, default=None, metavar="K",
                        help="calibration passages used, the first K (default: 16)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="folder of the tokenizer for --calib-text when the model is not a Hugging Face folder")
    parser.add_argument("--rewrite", action="append", default=None, metavar="KIND=METHOD",
                        help="approximate rewrite(s) to use, e.g. attention=linear:hedgehog, attention=sparse, "
                             "projection=shiftadd|lut (repeatable)")
    parser.add_argument("--layers", default=None, metavar="3-5", help="only sites in these layers")
    parser.add_argument("--metric", default=None, help="end-to-end error metric: relative_l2 (default) or cosine")
    if budget:
        parser.add_argument("--max-error", type=float, default=None, metavar="E",
                            help="end-to-end error budget of the approximate rewrites (default 0.01; with "
                                 "--rewrite and no --max-error the named rewrites are applied as asked)")


def _add_deploy_commands(sub) -> None:
    art_help = "an artifact folder (from kernelize optimize) or its .tar.gz"
    shape_help = ("set a symbolic dim for random inputs, e.g. --shape sequence=64 (repeatable; "
                  "default: batch dims 1, others 128)")

    run = sub.add_parser("run", help="run an artifact on inputs from .npy/.npz files or random ones",
                         description="Load an artifact (verified), run it here and save or summarize the outputs. "
                                     "Needs only onnxruntime (ort artifacts) or the TVM runtime (tvm artifacts).")
    run.add_argument("artifact", help=art_help)
    run.add_argument("-i", "--input", help="a .npy (one input) or a .npz keyed by input names")
    run.add_argument("-o", "--output", help="write the outputs: .npy (one output) or .npz keyed by output names")
    run.add_argument("--random", action="store_true", help="random inputs following the manifest's signature")
    run.add_argument("--shape", action="append", default=[], metavar="DIM=N", help=shape_help)
    run.add_argument("--seed", type=int, default=0, help="seed for --random (default: 0)")
    run.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")

    bench = sub.add_parser("bench", help="time an artifact on random inputs",
                           description="Latency of an artifact here: median, p10/p90 and spread over --runs calls.")
    bench.add_argument("artifact", help=art_help)
    bench.add_argument("--runs", type=int, default=20, help="timed runs (default: 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    bench.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    bench.add_argument("--shape", action="append", default=[], metavar="DIM=N", help=shape_help)
    bench.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default: 0)")
    bench.add_argument("--json", nargs="?", const="-", metavar="FILE",
                       help="print the result as JSON (or write it to FILE)")

    dep = sub.add_parser("deploy", help="upload a tvm artifact to a device over TVM RPC, run and time it there",
                         description="Upload a tvm artifact to a TVM RPC server (or a device from a tracker's "
                                     "pool), run it on random inputs and time it there; when the artifact targets "
                                     "this machine, compare the outputs with a local run.")
    dep.add_argument("artifact", help=art_help)
    dep.add_argument("--rpc", metavar="HOST:PORT", help="a TVM RPC server (python -m tvm.exec.rpc_server)")
    dep.add_argument("--tracker", metavar="HOST:PORT", help="a TVM RPC tracker pooling devices")
    dep.add_argument("--key", default="", help="the device key (with --tracker; optional with --rpc)")
    dep.add_argument("--runs", type=int, default=10, help="timed runs on the device (default: 10)")
    dep.add_argument("--shape", action="append", default=[], metavar="DIM=N", help=shape_help)
    dep.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default: 0)")
    dep.add_argument("--timeout", type=float, default=10.0,
                     help="seconds allowed for each connection step (default: 10)")
    dep.add_argument("--no-compare", action="store_true", help="skip the comparison with a local run")
    dep.add_argument("-o", "--output", help="write the device's outputs: .npy (one output) or .npz")
    dep.add_argument("--json", nargs="?", const="-", metavar="FILE",
                     help="print the result as JSON (or write it to FILE)")
    dep.add_argument("-q", "--quiet", action="store_true", help="no progress messages")

    pk = sub.add_parser("pack", help="pack an artifact folder into one .tar.gz (or unpack one)",
                        description="Verify an artifact folder and write it as a single .tar.gz, or with --unpack "
                                    "extract and verify an archive into a folder.")
    pk.add_argument("artifact", help="an artifact folder (or, with --unpack, a .tar.gz)")
    pk.add_argument("-o", "--output", help="the archive (default: FOLDER.tar.gz beside it) or, with --unpack, the "
                                          "folder (default: beside the archive)")
    pk.add_argument("--unpack", action="store_true", help="extract an archive instead")
    pk.add_argument("--force", action="store_true", help="replace an existing output")


def _calibration(args):
    """--calib, or --calib-text with its options, as optimize's and inspect's ``calib``."""
    from kernelize.errors import UsageError

    given = [flag for flag, value in (("--calib-seq", args.calib_seq), ("--calib-samples", args.calib_samples),
                                      ("--tokenizer", args.tokenizer)) if value is not None]
    if args.calib_text is None:
        if given:
            raise UsageError(f"{' and '.join(given)} go(es) with --calib-text")
        return args.calib
    if args.calib is not None:
        raise UsageError("give --calib or --calib-text, not both")
    from kernelize.frontends import text

    return text.TextCalibration(args.calib_text, seq=text.DEFAULT_SEQ if args.calib_seq is None else args.calib_seq,
                                samples=text.DEFAULT_SAMPLES if args.calib_samples is None else args.calib_samples,
                                tokenizer=args.tokenizer)


def _inspect_table(result: dict) -> str:
    lines = [f"model: {result['model']}"]
    for site in result["sites"]:
        extra = {k: v for k, v in site.items() if k not in ("id", "kind", "pattern", "rewrite", "output", "nodes")}
        lines.append(f"  {site['id']:<18} {site['pattern']:<22} -> {site['rewrite']:<26} {extra}")
    counts = result["summary"]["sites"]
    lines.append("sites: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    for miss in result["near_misses"]:
        lines.append(f"  near miss: {miss['pattern']} at {miss['node']}: {miss['reason']}")
    if "approximate" in result:
        from kernelize.report import approximate_table

        lines += ["", approximate_table(result["approximate"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run, bench, deploy, pack

def _shapes(items) -> dict:
    from kernelize.errors import UsageError

    shapes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--shape wants DIM=N with N >= 1, got {item!r}")
        shapes[name.strip()] = int(value)
    return shapes


def _positive(value, flag):
    from kernelize.errors import UsageError

    if value < 1:
        raise UsageError(f"{flag} must be at least 1")


def _read_inputs(path: str, runner) -> dict:
    import numpy as np

    from kernelize.errors import KernelizeError

    names = [e["name"] for e in runner.inputs]
    if not os.path.isfile(path):
        raise KernelizeError(f"input file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises many types for a bad file
        raise KernelizeError(f"cannot read {path} as .npy/.npz: {str(err).splitlines()[0] if str(err) else err!r}") \
            from None
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise KernelizeError(f"the model takes {len(names)} inputs ({', '.join(names)}): pass a .npz keyed by "
                                 "input names")
        return {names[0]: data}
    with data:
        try:
            return {key: data[key] for key in data.files}
        except ValueError as err:  # an object (pickled) array inside the archive
            raise KernelizeError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _write_outputs(path: str, outputs: dict) -> None:
    import numpy as np

    from kernelize.errors import KernelizeError, UsageError

    if not path.endswith((".npy", ".npz")):
        raise UsageError(f"--output must end in .npy or .npz, got {path!r}")
    if path.endswith(".npy") and len(outputs) != 1:
        raise KernelizeError(f"the model has {len(outputs)} outputs ({', '.join(outputs)}): use a .npz")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KernelizeError(f"folder of the output does not exist: {parent}")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if path.endswith(".npy"):
                np.save(fh, next(iter(outputs.values())))
            else:
                np.savez(fh, **outputs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _summary_line(name: str, value) -> str:
    import numpy as np

    text = f"  {name}: shape {list(value.shape)} {value.dtype}"
    if value.size and value.dtype.kind in "fiub":
        as_float = value.astype(np.float64)
        text += f"  min {as_float.min():.4g} max {as_float.max():.4g} mean {as_float.mean():.4g}"
    return text


def _cmd_run(args) -> int:
    from kernelize.deploy import runner
    from kernelize.errors import UsageError

    if bool(args.input) == bool(args.random):
        raise UsageError("give exactly one of --input FILE or --random")
    _positive(args.threads, "--threads")
    shapes = _shapes(args.shape)
    if shapes and not args.random:
        raise UsageError("--shape is for --random inputs")
    if args.output and not args.output.endswith((".npy", ".npz")):
        raise UsageError(f"--output must end in .npy or .npz, got {args.output!r}")
    with runner.load(args.artifact, threads=args.threads) as model:
        feeds = model.random_inputs(shapes, args.seed) if args.random else _read_inputs(args.input, model)
        outputs = model.run(feeds)
    if args.output:
        _write_outputs(args.output, outputs)
        print(f"wrote {args.output} ({', '.join(outputs)})")
    else:
        print("outputs:")
        for name, value in outputs.items():
            print(_summary_line(name, value))
    return 0


def _print_json(result: dict, target: str) -> None:
    from kernelize.deploy.artifact import dumps

    text = dumps(result).rstrip("\n")
    if target == "-":
        print(text)
    else:
        with open(target, "w") as fh:
            fh.write(text + "\n")


def _latency_line(stats: dict) -> str:
    return (f"median {stats['median_ms']:.3f} ms, p10 {stats['p10_ms']:.3f} ms, p90 {stats['p90_ms']:.3f} ms, "
            f"spread (p90-p10)/median {stats['spread_pct']:.1f}%, min {stats['min_ms']:.3f} ms, "
            f"max {stats['max_ms']:.3f} ms")


def _cmd_bench(args) -> int:
    from kernelize.deploy import runner

    _positive(args.runs, "--runs")
    _positive(args.threads, "--threads")
    if args.warmup < 0:
        from kernelize.errors import UsageError

        raise UsageError("--warmup must be at least 0")
    shapes = _shapes(args.shape)
    with runner.load(args.artifact, threads=args.threads) as model:
        feeds = model.random_inputs(shapes, args.seed)
        stats = model.bench(feeds, runs=args.runs, warmup=args.warmup)
        stats.update(artifact=args.artifact, backend=model.artifact.backend,
                     target=model.artifact.target.get("preset"))
    if args.json:
        _print_json(stats, args.json)
        if args.json == "-":
            return 0
    shape_text = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in stats["shapes"].items())
    print(f"{args.artifact} ({stats['backend']}, {stats['target']}), inputs {shape_text}, "
          f"{stats['threads']} thread(s), {stats['runs']} runs:")
    print(f"  latency {_latency_line(stats)}")
    return 0


def _cmd_deploy(args) -> int:
    from kernelize.deploy import remote

    _positive(args.runs, "--runs")
    if not args.timeout > 0:
        from kernelize.errors import UsageError

        raise UsageError("--timeout must be positive")
    if args.output and not args.output.endswith((".npy", ".npz")):
        from kernelize.errors import UsageError

        raise UsageError(f"--output must end in .npy or .npz, got {args.output!r}")
    result = remote.deploy(args.artifact, rpc=args.rpc, tracker=args.tracker, key=args.key, runs=args.runs,
                           shapes=_shapes(args.shape), seed=args.seed, timeout=args.timeout,
                           compare=not args.no_compare, progress=_progress(args.quiet))
    arrays = result.pop("arrays")
    if args.output:
        _write_outputs(args.output, arrays)
    if args.json:
        _print_json(result, args.json)
        if args.json == "-":
            return 0
    print(f"deployed {args.artifact} (target {result['target']}) to {result['address']}"
          + (f" key {result['key']}" if result.get("key") else ""))
    print("  inputs: " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result["shapes"].items())
          + f" (random, seed {result['seed']})")
    print(f"  remote latency over {result['latency']['runs']} runs: {_latency_line(result['latency'])}")
    check = result["local_check"]
    if check["status"] == "match":
        print(f"  outputs match the local run (max abs diff {check['max_abs_diff']:.3g})")
    else:
        print(f"  local comparison skipped: {check['reason']}")
    if args.output:
        print(f"  wrote {args.output} ({', '.join(arrays)})")
    return 0


def _cmd_pack(args) -> int:
    from kernelize.deploy import archive as archive_mod

    if args.unpack:
        folder = archive_mod.unpack(args.artifact, args.output, force=args.force)
        print(f"unpacked {folder}")
    else:
        archive = archive_mod.pack(args.artifact, args.output, force=args.force)
        print(f"wrote {archive}")
    return 0


_DEPLOY_HANDLERS = {"run": _cmd_run, "bench": _cmd_bench, "deploy": _cmd_deploy, "pack": _cmd_pack}


def _command_of(argv) -> str | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    return next((a for a in argv if not a.startswith("-")), None)


def _parse_build_shape(text: str | None) -> dict | None:
    """'batch=1,seq=128' -> {"batch": 1, "seq": 128}."""
    from kernelize.errors import UsageError

    if not text:
        return None
    shape = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--shape expects name=N pairs like batch=1,seq=128, got {text!r}")
        shape[key.strip()] = int(value)
    return shape


def main(argv=None) -> int:
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kernelize.errors import KernelizeError, UsageError

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)  # unwinds like Ctrl-C: partial outputs are removed
    try:
        if args.command == "optimize":
            from kernelize.api import optimize
            from kernelize.report import table

            if args.threads < 1:
                raise UsageError("--threads must be at least 1")
            if args.tune < 0:
                raise UsageError("--tune must be at least 0")
            result = optimize(args.model, recipe=args.recipe, backend=args.backend, target=args.target,
                              shape=_parse_build_shape(args.shape), tune_trials=args.tune,
                              tuning_db=args.tuning_db or (".kernelize-tuning" if args.tune else None),
                              output_dir=args.output, force=args.force, measure_latency=not args.no_latency,
                              threads=args.threads, calib=_calibration(args), max_error=args.max_error,
                              rewrites=args.rewrite, layers=args.layers, metric=args.metric,
                              progress=_progress(args.quiet))
            from kernelize.report import summary

            print(table(result.report))
            print(summary(result.report, result.path))
        elif args.command == "compare":
            from kernelize import compare

            return compare.command(args)
        elif args.command in DEPLOY_COMMANDS:
            try:
                return _DEPLOY_HANDLERS[args.command](args)
            except OSError as err:  # a file the user named: unreadable, unwritable, disk full
                where = f": {err.filename}" if err.filename else ""
                raise KernelizeError(f"{(err.strerror or str(err)).lower()}{where}") from None
        else:
            from kernelize.api import inspect

            result = inspect(args.model, calib=_calibration(args), recipe=args.recipe, rewrites=args.rewrite,
                             layers=args.layers, metric=args.metric, progress=_progress(args.quiet or args.json))
            print(json.dumps(result, indent=2, default=str) if args.json else _inspect_table(result))
    except UsageError as err:
        print(f"kernelize: error: {err}", file=sys.stderr)
        return 2
    except KernelizeError as err:
        print(f"kernelize: error: {err}", file=sys.stderr)
        return 1
    except Terminated:
        print("kernelize: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("kernelize: interrupted", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every clean-up runs."""


def _terminate(signum, frame):
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
