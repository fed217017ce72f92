"""Real English text for calibration and evaluation: the docstrings of Python's standard
library (written by the CPython developers, shipped with every Python), read from the
installed sources. Nothing is downloaded and nothing here was written by this project.

Each module's docstrings (module, classes, functions; at least ``min_chars`` long) are
joined into one text and cut into passages of about ``words`` words. Modules are split into
two disjoint sets by a stable hash of their name: ``calibration`` (fitting) and
``held_out`` (evaluation), so held-out text is never seen during calibration.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

SPLITS = ("calibration", "held_out")


def _modules() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "turtledemo")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def _docstrings(path: Path, min_chars: int) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                text = " ".join(doc.split())
                letters = sum(c.isalpha() or c == " " for c in text)
                if letters >= 0.85 * len(text):  # prose, not tables or code
                    texts.append(text)
    return texts


def split_of(name: str) -> str:
    """The split a module belongs to (about one module in three is held out)."""
    return "held_out" if hashlib.sha256(name.encode()).digest()[0] % 3 == 0 else "calibration"


def passages(split: str = "calibration", words: int = 200, min_chars: int = 120,
             limit: int | None = None) -> list[str]:
    """Passages of about ``words`` words of standard-library documentation from ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    result: list[str] = []
    for path in _modules():
        name = ".".join(path.with_suffix("").parts[-2:])
        if split_of(name) != split:
            continue
        tokens = " ".join(_docstrings(path, min_chars)).split()
        for start in range(0, len(tokens) - words // 2, words):  # the tail must be at least half a passage
            result.append(" ".join(tokens[start:start + words]))
            if limit is not None and len(result) >= limit:
                return result
    return result
