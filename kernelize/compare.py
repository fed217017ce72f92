"""``kernelize compare A B``: the check a user runs before shipping. The accuracy and the
latency of two models on the same inputs: an ``.onnx`` file, an artifact folder (or its
``.tar.gz``) or a Hugging Face model folder (exported as ``optimize`` does) each.

Inputs: text passages tokenized with a tokenizer (``--calib-text``; the tokenizer of a
Hugging Face folder among A and B, or ``--tokenizer``), an ``.npz`` of inputs with samples
on axis 0 (``-i``), or random inputs following A's signature (``--random``). Each sample
runs at batch 1 on both models.

Accuracy, per output the two models share: the cosine of each sample's vector (a
``[1, S, H]`` output is mean-pooled over the real tokens first: a sentence embedding), mean
and min over the samples; the largest absolute difference; for an output named like logits
the share of positions whose argmax agrees, otherwise the share of samples whose nearest
other sample (by cosine) is the same under both (nearest-neighbour agreement). Latency: both
models on the first sample in interleaved rounds (the order alternates), median and
p10-p90, and B's median over A's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kernelize.errors import KernelizeError, UsageError

DEFAULT_SAMPLES = 16
DEFAULT_SEQ = 128


# ----------------------------------------------------------------------------- the command line

def add_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="accuracy and latency of two models or artifacts on the same inputs",
                         description="Run two models (.onnx files, artifact folders or .tar.gz, Hugging Face "
                                     "folders) on the same inputs: cosine, max abs error, nearest-neighbour or "
                                     "argmax agreement, and interleaved latency (B/A).")
    cmp.add_argument("a", metavar="A", help="the reference: an .onnx file, an artifact, or a Hugging Face folder")
    cmp.add_argument("b", metavar="B", help="the model compared with A (same kinds)")
    cmp.add_argument("--calib-text", default=None, metavar="FILE|DIR",
                     help="text passages (one per line, or one per file in a folder) as the inputs")
    cmp.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="tokenizer folder for --calib-text (default: that of a Hugging Face folder among A, B)")
    cmp.add_argument("-i", "--inputs", default=None, metavar="INPUTS.npz",
                     help="inputs: one array per model input, samples on axis 0")
    cmp.add_argument("--random", action="store_true", help="random inputs following A's signature")
    cmp.add_argument("--calib-seq", "--seq", dest="seq", type=int, default=None, metavar="N",
                     help=f"tokens per passage, or the sequence length of random inputs (default: {DEFAULT_SEQ})")
    cmp.add_argument("--calib-samples", "--samples", dest="samples", type=int, default=None, metavar="K",
                     help=f"samples compared, the first K (default: {DEFAULT_SAMPLES})")
    cmp.add_argument("--rounds", type=int, default=20, help="interleaved latency rounds (default: 20; 0: none)")
    cmp.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    cmp.add_argument("--seed", type=int, default=0, help="seed for --random (default: 0)")
    cmp.add_argument("--json", nargs="?", const="-", metavar="FILE",
                     help="print the result as JSON (or write it to FILE)")


def command(args) -> int:
    """``kernelize compare``: the table (and JSON) of :func:`compare`."""
    given = [flag for flag, on in (("--calib-text", args.calib_text), ("-i", args.inputs), ("--random", args.random))
             if on]
    if len(given) != 1:
        raise UsageError("give exactly one of --calib-text FILE, -i INPUTS.npz or --random")
    if args.tokenizer is not None and args.calib_text is None:
        raise UsageError("--tokenizer goes with --calib-text")
    for flag, value, low in (("--calib-seq", args.seq, 2), ("--calib-samples", args.samples, 1),
                             ("--threads", args.threads, 1), ("--rounds", args.rounds, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be at least {low}")
    try:
        result = compare(args.a, args.b, text=args.calib_text, tokenizer=args.tokenizer, inputs=args.inputs,
                         random=args.random, seq=args.seq, samples=args.samples, rounds=args.rounds,
                         threads=args.threads, seed=args.seed)
    except OSError as err:  # a file the user named: unreadable
        where = f": {err.filename}" if err.filename else ""
        raise KernelizeError(f"{(err.strerror or str(err)).lower()}{where}") from None
    if args.json:
        from kernelize.deploy.artifact import dumps

        text = dumps(result)
        if args.json == "-":
            print(text, end="")
            return 0
        with open(args.json, "w") as fh:
            fh.write(text)
    print(table(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def table(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A: {a['path']} ({a['kind']})", f"B: {b['path']} ({b['kind']})", f"inputs: {result['inputs']}", ""]
    header = f"{'output':<24} {'cosine mean':>12} {'cosine min':>11} {'max abs err':>12}  agreement"
    lines += [header, "-" * len(header)]
    for name, m in result["accuracy"].items():
        agree = m["agreement"]
        lines.append(f"{name:<24} {m['cosine_mean']:>12.6f} {m['cosine_min']:>11.6f} {m['max_abs_error']:>12.3g}  "
                     f"{agree['kind']} {100 * agree['value']:.1f}%")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    lat = result.get("latency")
    if lat:
        lines += ["", f"latency (batch 1, {lat['threads']} thread(s), {lat['rounds']} interleaved rounds, "
                      f"inputs {lat['shapes']}):"]
        for key in ("a", "b"):
            s = lat[key]
            lines.append(f"  {key.upper()}: median {s['median_ms']:.3f} ms (p10-p90 {s['p10_ms']:.3f}-{s['p90_ms']:.3f})")
        lines.append(f"  B/A: {lat['ratio_b_over_a']:.3f} (B is {1 / lat['ratio_b_over_a']:.2f}x A's speed)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the comparison

def compare(a, b, *, text=None, tokenizer=None, inputs=None, random: bool = False, seq: int | None = None,
            samples: int | None = None, rounds: int = 20, threads: int = 1, seed: int = 0) -> dict:
    """Accuracy and latency of ``b`` against ``a`` (paths) on the same inputs (see the module)."""
    try:  # a failing run is reported in one line, without ONNX Runtime's own log line
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass
    models = [_open(p, threads) for p in (a, b)]
    try:
        feeds_list, described = _inputs(models, text, tokenizer, inputs, random, seq, samples, seed)
        for model in models:
            model.check(feeds_list[0])
        try:
            outs = [[m.run(f) for f in feeds_list] for m in models]
        except KernelizeError as err:
            hint = "; pass --calib-seq N for a shorter length" if random else ""
            raise KernelizeError(f"{err} (inputs: {described}{hint})") from None
        pairs, notes = _pairs(models, outs[0][0], outs[1][0])
        accuracy = {name_a if name_a == name_b else f"{name_a} / {name_b}":
                    _accuracy(name_a, [o[name_a] for o in outs[0]], [o[name_b] for o in outs[1]], feeds_list)
                    for name_a, name_b in pairs}
        if len(feeds_list) < 3 and any(m["agreement"]["kind"] == "nearest neighbour" for m in accuracy.values()):
            notes.append("nearest-neighbour agreement needs at least 3 samples to mean anything")
        result = {"a": models[0].describe(), "b": models[1].describe(), "inputs": described,
                  "samples": len(feeds_list), "accuracy": accuracy, "notes": notes}
        if rounds:
            result["latency"] = _latency(models, feeds_list[0], rounds, threads)
        return result
    finally:
        for model in models:
            model.close()


class _Model:
    """One side of the comparison: ``inputs`` (signature entries), ``run`` and ``timed``."""

    kind = ""

    def __init__(self, path: str):
        self.path = path

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "inputs": [e["name"] for e in self.inputs],
                "outputs": self.output_names}

    def check(self, feeds: dict) -> None:
        missing = [e["name"] for e in self.inputs if e["name"] not in feeds]
        if missing:
            raise KernelizeError(f"{self.path} takes {', '.join(missing)}, which the inputs do not give "
                                 f"(they give {', '.join(feeds)})")

    def feeds(self, feeds: dict) -> dict:
        from kernelize.deploy import runner

        return runner.validate(self.inputs, {e["name"]: feeds[e["name"]] for e in self.inputs})

    def close(self) -> None:
        pass


class _Onnx(_Model):
    """An .onnx file, or a Hugging Face folder exported as ``optimize`` exports it."""

    def __init__(self, path: str, threads: int, model=None):
        import onnx_ir as ir

        from kernelize.backends import ort as ort_backend
        from kernelize.deploy import artifact, export

        super().__init__(path)
        if model is None:
            self.kind = "onnx"
            try:
                model = ir.load(path)
            except Exception as err:  # noqa: BLE001 - protobuf and onnx raise many types
                raise KernelizeError(f"cannot read {path} as ONNX: {_first_line(err)}") from None
        else:
            self.kind = "hugging face folder"
        self.inputs, outputs = artifact.signature_from_onnx(model)
        export._token_ranges(self.inputs, model)
        self.output_names = [o["name"] for o in outputs]
        self.session = ort_backend.session(model, threads)

    def run(self, feeds: dict) -> dict:
        from kernelize.backends import ort as ort_backend

        return ort_backend.run(self.session, self.feeds(feeds), self.output_names)

    def timed(self, feeds: dict) -> float:
        import time

        start = time.perf_counter()
        self.session.run(self.output_names, feeds)
        return time.perf_counter() - start


class _Artifact(_Model):
    def __init__(self, path: str, threads: int):
        from kernelize.deploy import runner

        super().__init__(path)
        self.runner = runner.load(path, threads=threads)
        self.kind = f"artifact, {self.runner.artifact.backend}"
        self.inputs = self.runner.inputs
        self.output_names = [o["name"] for o in self.runner.outputs]

    def run(self, feeds: dict) -> dict:
        return self.runner.run(self.feeds(feeds))

    def timed(self, feeds: dict) -> float:
        return self.runner.timed(feeds)

    def close(self) -> None:
        self.runner.close()


def _open(path, threads: int) -> _Model:
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise KernelizeError(f"not found: {path}")
    if (p.is_dir() and (p / "manifest.json").is_file()) or (p.is_file() and path.endswith((".tar.gz", ".tgz"))):
        return _Artifact(path, threads)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise KernelizeError(f"{path} is neither an artifact (no manifest.json) nor a Hugging Face model "
                                 "folder (no config.json)")
        from kernelize.frontends import huggingface

        model, _ = huggingface.load_folder(path)
        return _Onnx(path, threads, model)
    if not path.endswith(".onnx"):
        raise KernelizeError(f"{path}: compare takes .onnx files, artifact folders (or .tar.gz) and Hugging Face "
                             "folders")
    return _Onnx(path, threads)


def _inputs(models, text, tokenizer, inputs, random, seq, samples, seed) -> tuple[list[dict], str]:
    """One feed dict per sample (batch 1), and a description."""
    count = DEFAULT_SAMPLES if samples is None else samples
    if text is not None:
        from kernelize.frontends import text as text_mod

        folder = tokenizer
        if folder is None:
            folder = next((m.path for m in models if isinstance(m, _Onnx) and m.kind == "hugging face folder"), None)
        if folder is None:
            raise UsageError("--calib-text needs a tokenizer: neither A nor B is a Hugging Face model folder; pass "
                             "--tokenizer DIR")
        folder = text_mod.tokenizer_folder(None, folder)
        passages = text_mod.read_passages(text)[:count]
        length = DEFAULT_SEQ if seq is None else seq
        arrays = text_mod.tokenize(passages, text_mod.load_tokenizer(folder), length)
        described = f"text: {text} ({len(passages)} passages at {length} tokens, tokenizer {folder})"
    elif inputs is not None:
        arrays = _read_npz(inputs)
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise KernelizeError(f"{inputs}: the arrays have different sample counts along axis 0")
        arrays = {k: v[:count] for k, v in arrays.items()}
        described = f"{inputs} ({len(next(iter(arrays.values())))} samples)"
    else:
        from kernelize.deploy import runner

        signature = models[0].inputs
        dims = {d for e in signature for axis, d in enumerate(e.get("shape") or [])
                if isinstance(d, str) and axis > 0 and "batch" not in d.lower()}
        shapes = {d: DEFAULT_SEQ if seq is None else seq for d in dims}
        feeds = [runner.random_inputs(signature, shapes, seed + i) for i in range(count)]
        length = DEFAULT_SEQ if seq is None else seq
        return feeds, (f"random ({count} samples following A's signature" + (f" at {length} tokens" if dims else "")
                       + f", seed {seed})")
    n = len(next(iter(arrays.values())))
    if n < 1:
        raise KernelizeError("no samples to compare")
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)], described


def _read_npz(path) -> dict:
    if not Path(path).is_file():
        raise KernelizeError(f"input file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if isinstance(data, np.ndarray):
                raise KernelizeError(f"{path}: compare wants a .npz keyed by input names")
            return {k: data[k] for k in data.files}
    except KernelizeError:
        raise
    except Exception as err:  # noqa: BLE001 - numpy raises many types for a bad file
        raise KernelizeError(f"cannot read {path} as .npz: {_first_line(err)}") from None


def _pairs(models, out_a: dict, out_b: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """The outputs compared: those with the same name; else, with as many outputs, by position."""
    common = [n for n in out_a if n in out_b]
    notes = []
    if common:
        pairs = [(n, n) for n in common]
    elif len(out_a) == len(out_b):
        pairs = list(zip(out_a, out_b))
        notes.append("no output name in common: outputs paired by position")
    else:
        raise KernelizeError(f"the outputs do not match: A gives {', '.join(out_a)}, B gives {', '.join(out_b)}")
    for name_a, name_b in pairs:
        if out_a[name_a].shape != out_b[name_b].shape:
            raise KernelizeError(f"output {name_a}: A gives shape {list(out_a[name_a].shape)}, B gives "
                                 f"{list(out_b[name_b].shape)}")
    return pairs, notes


def _accuracy(name: str, a: list, b: list, feeds_list: list[dict]) -> dict:
    masks = [_mask(f) for f in feeds_list]
    logits = "logit" in name.lower()
    vec_a = np.stack([_vector(x, m, pool=not logits) for x, m in zip(a, masks)])
    vec_b = np.stack([_vector(x, m, pool=not logits) for x, m in zip(b, masks)])
    cos = _cosine(vec_a, vec_b)
    worst = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
                for x, y in zip(a, b))
    if logits:
        agree = [(np.argmax(x, -1) == np.argmax(y, -1))[_positions(x, m)] for x, y, m in zip(a, b, masks)]
        agreement = {"kind": "argmax", "value": float(np.mean(np.concatenate([g.ravel() for g in agree])))}
    else:
        agreement = {"kind": "nearest neighbour", "value": _neighbour_agreement(vec_a, vec_b)}
    return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)), "max_abs_error": worst,
            "agreement": agreement, "shape": list(a[0].shape)}


def _mask(feeds: dict):
    for name, value in feeds.items():
        if "mask" in name.lower() and value.ndim == 2:
            return value != 0
    return None


def _vector(x: np.ndarray, mask, pool: bool) -> np.ndarray:
    """One sample's output as a vector: ``[1, S, H]`` mean-pooled over the real tokens."""
    x = x.astype(np.float64)
    if pool and x.ndim == 3 and mask is not None and mask.shape == x.shape[:2]:
        weights = mask[0].astype(np.float64)[:, None]
        return (x[0] * weights).sum(0) / max(weights.sum(), 1.0)
    if pool and x.ndim == 3:
        return x[0].mean(0)
    return x.ravel()


def _positions(x: np.ndarray, mask):
    """The argmax positions counted: real tokens for ``[1, S, C]`` logits."""
    if x.ndim == 3 and mask is not None and mask.shape == x.shape[:2]:
        return mask
    return np.ones(x.shape[:-1], bool)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.all(a == b, axis=1)
    return np.where(same, 1.0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30))


def _neighbour_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples whose nearest other sample (cosine) is the same under both."""
    if len(a) < 2:
        return 1.0

    def nearest(e):
        unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(nearest(a) == nearest(b)))


def _latency(models, feeds: dict, rounds: int, threads: int) -> dict:
    from kernelize.deploy import runner

    prepared = [m.feeds(feeds) for m in models]
    for model, f in zip(models, prepared):  # warm-up
        for _ in range(3):
            model.timed(f)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[k].append(models[k].timed(prepared[k]) * 1e3)
    a, b = (runner.latency_stats(t) for t in times)
    return {"a": a, "b": b, "ratio_b_over_a": b["median_ms"] / a["median_ms"], "rounds": rounds, "threads": threads,
            "shapes": {k: list(v.shape) for k, v in prepared[0].items()}}


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__

