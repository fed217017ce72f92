"""Plain-text calibration data: passages tokenized with the model's own tokenizer into the
model inputs approximate rewrites are fitted on (issue 16).

A text file holds one passage per line (blank lines skipped); a folder holds one passage
per file (its regular files in name order, hidden ones skipped). The tokenizer is the
model folder's (a Hugging Face folder) or one named with ``tokenizer`` (any folder
``transformers.AutoTokenizer`` reads offline). Every passage is padded and truncated to
``seq`` tokens the way that tokenizer pads and truncates (its side, its pad token); the
arrays keep Hugging Face's names (``input_ids``, ``attention_mask``, ``token_type_ids``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from kernelize.errors import KernelizeError, UsageError

DEFAULT_SEQ = 128  # tokens per passage
DEFAULT_SAMPLES = 16  # passages used (the first ones), half fitted, half held out
# the files a tokenizer is read from (fast tokenizers, word-piece, BPE, sentencepiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


@dataclasses.dataclass
class TextCalibration:
    """Calibration passages in ``path`` (a file or a folder), ``samples`` of them at ``seq``
    tokens, tokenized with the tokenizer in ``tokenizer`` (a folder; None: the model's own,
    when the model is a Hugging Face folder). Pass it as ``calib`` to ``kernelize.optimize``
    or ``kernelize.inspect``."""

    path: str | os.PathLike
    seq: int = DEFAULT_SEQ
    samples: int = DEFAULT_SAMPLES
    tokenizer: str | os.PathLike | None = None

    def __post_init__(self):
        for name in ("seq", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise UsageError(f"--calib-{name} must be an integer of at least 2 (got {value!r})")

    def check(self, model_source=None) -> None:
        """Fail now, before any model is loaded: the text must have passages and a tokenizer
        must be known (``model_source`` is what the user passed as the model)."""
        read_passages(self.path)
        self.tokenizer = tokenizer_folder(model_source, self.tokenizer)

    def inputs_for(self, model) -> tuple[dict[str, np.ndarray], str]:
        """(arrays named as the model's inputs, a description for the report)."""
        if self.tokenizer is None:
            raise UsageError("--calib-text needs a tokenizer: pass --tokenizer DIR (a folder with the "
                             "tokenizer's files)")
        passages = read_passages(self.path)[:self.samples]
        feeds = tokenize(passages, load_tokenizer(self.tokenizer), self.seq)
        names = [v.name for v in model.graph.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise UsageError(f"the model takes {', '.join(missing)}, which the tokenizer does not give "
                             f"(it gives {', '.join(feeds)}); pass calibration arrays with --calib instead")
        return ({n: feeds[n] for n in names},
                f"text: {self.path} ({len(passages)} passages at {self.seq} tokens, tokenizer {self.tokenizer})")


def read_passages(path: str | os.PathLike) -> list[str]:
    """The passages of a text file (one per non-blank line) or a folder (one per file)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        passages = [" ".join(_read(p).split()) for p in files]
    elif path.is_file():
        passages = [line.strip() for line in _read(path).splitlines()]
    else:
        raise UsageError(f"calibration text not found: {path}")
    passages = [p for p in passages if p]
    if not passages:
        raise UsageError(f"calibration text {path} has no passages (empty {'folder' if path.is_dir() else 'file'})")
    return passages


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"calibration text {path} is not UTF-8 text") from None
    except OSError as err:
        raise UsageError(f"cannot read calibration text {path}: {(err.strerror or str(err)).lower()}") from None


def tokenizer_folder(model_source, tokenizer) -> str:
    """The folder the tokenizer is read from: ``tokenizer``, else the model's Hugging Face folder."""
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise UsageError(f"tokenizer folder not found: {tokenizer}")
        return str(tokenizer)
    if isinstance(model_source, (str, os.PathLike)) and (Path(model_source) / "config.json").is_file():
        return str(model_source)
    described = str(model_source) if isinstance(model_source, (str, os.PathLike)) else type(model_source).__name__
    raise UsageError(f"--calib-text needs a tokenizer: {described} is not a Hugging Face model folder; pass "
                     "--tokenizer DIR (a folder with the tokenizer's files)")


def load_tokenizer(folder: str | os.PathLike):
    """``transformers.AutoTokenizer`` of ``folder``, offline."""
    import logging

    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build a tokenizer of special tokens only and map every word to [UNK]
        raise KernelizeError(f"{folder}: no usable tokenizer: none of {', '.join(TOKENIZER_FILES[:3])}, ... there; "
                             "pass --tokenizer DIR")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise KernelizeError(f"{folder}: no usable tokenizer: {lines[0] if lines else type(err).__name__}") from None


def tokenize(passages: list[str], tokenizer, seq: int) -> dict[str, np.ndarray]:
    """int64 arrays [len(passages), seq], padded and truncated as ``tokenizer`` does."""
    if tokenizer.pad_token is None:  # decoder tokenizers (GPT-2) have none: pad with end-of-text
        if tokenizer.eos_token is None:
            raise KernelizeError("the tokenizer has no padding token: pass calibration arrays with --calib")
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(passages, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items()}

