"""Shared test setup: offline Hugging Face, quiet exporters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# A word-piece vocabulary small enough for the zoo's text size (kernelize.models.zoo.TEXT)
TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz.,")
              + "the a of and to in is it that was for on are with as be at by this from or an not".split()
              + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"])
PASSAGES = ["the cat sat on the mat.", "it was a fine day for a walk in the park", "",
            "this is a test of the text calibration", "an other line to tokenize, with words",
            "the end of the file is near", "six passages in all is what this has"]


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory):
    """A Hugging Face folder as a user has one: a 2-layer random BERT (config.json,
    model.safetensors) and its word-piece tokenizer files, small enough to export in seconds."""
    import transformers

    from kernelize.models import zoo

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    transformers.utils.logging.disable_progress_bar()
    config = transformers.BertConfig(**{**zoo.TEXT, "vocab_size": len(TINY_VOCAB)})
    import torch

    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def passages_file(tmp_path_factory):
    """A plain text file: one passage per line (one blank line, skipped)."""
    path = tmp_path_factory.mktemp("text") / "passages.txt"
    path.write_text("\n".join(PASSAGES) + "\n")
    return path
