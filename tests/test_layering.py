"""The layers keep to their own kind: no module under kernelize/ops imports a compiler backend
(TVM, or anything in kernelize.backends); backends keep their lowerings themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kernelize"
FORBIDDEN = ("tvm", "tvm_ffi", "kernelize.backends")


def imported(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports (relative imports resolved; also ``importlib.import_module``
    and ``__import__`` of a constant name), wherever in the file the import is."""
    package = list(path.relative_to(root.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from kernelize import backends`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def test_the_check_sees_every_spelling(tmp_path):
    module = tmp_path / "kernelize" / "ops" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text("import tvm.relax\nfrom .. import backends\nfrom ..backends.tvm import te\n"
                      "def f():\n    from tvm import relax\n    importlib.import_module('tvm_ffi')\n")
    found = imported(module, tmp_path / "kernelize")
    assert {"tvm.relax", "kernelize.backends", "kernelize.backends.tvm", "tvm", "tvm_ffi"} <= found


@pytest.mark.parametrize("path", sorted((PACKAGE / "ops").glob("*.py")), ids=lambda p: p.name)
def test_operator_modules_import_no_backend(path):
    bad = sorted(name for name in imported(path)
                 if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"kernelize/ops/{path.name} imports {', '.join(bad)}: lowerings belong in kernelize/backends"
