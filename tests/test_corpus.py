"""The English text used for calibration and evaluation: the standard library's docstrings."""

from __future__ import annotations

import pytest

from kernelize.models import corpus


def test_splits_are_disjoint_and_sized():
    calibration = corpus.passages("calibration", words=100, limit=50)
    held_out = corpus.passages("held_out", words=100, limit=50)
    assert len(calibration) == 50 and len(held_out) == 50
    assert not set(calibration) & set(held_out)
    for passage in calibration + held_out:
        assert 50 <= len(passage.split()) <= 100


def test_passages_are_prose():
    text = " ".join(corpus.passages("held_out", words=200, limit=20)).lower().split()
    common = sum(word in ("the", "a", "of", "is", "to", "and") for word in text)
    assert common / len(text) > 0.05  # English function words, not code or tables


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.passages("train")
