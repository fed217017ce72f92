"""Custom rewrites: registered in code or through the ``kernelize.rewrites`` entry point;
an exact rewrite that changes the outputs is rejected."""

from __future__ import annotations

import importlib
import runpy
import sys
import textwrap
from pathlib import Path

import pytest

import kernelize
from kernelize.patterns import registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_rewrite.py"


@pytest.fixture
def example():
    module = runpy.run_path(str(EXAMPLE))
    yield module
    for name in ("erf_gelu", "tanh_gelu_claimed_exact"):
        kernelize.unregister_rewrite(name)


def _model(example):
    import torch

    torch.manual_seed(0)
    return example["HandWrittenFFN"](), (torch.randn(2, 9, 64) * 3,)


def test_exact_rewrite_applied_and_enables_builtin_fusion(example):
    module, inputs = _model(example)
    plain = kernelize.optimize(module, inputs, measure_latency=False)
    assert not [s for s in plain.report["sites"] if s["kind"] == "ffn"]

    kernelize.register_rewrite(kernelize.Rewrite("erf_gelu", example["erf_gelu_pattern"], example["gelu"]))
    result = kernelize.optimize(module, inputs, measure_latency=False)
    (entry,) = result.report["custom_rewrites"]
    assert entry["status"] == "applied" and entry["sites"] == 1
    assert entry["max_abs_error"] <= 1e-5
    assert [s["rewrite"] for s in result.report["sites"] if s["kind"] == "ffn"] == ["FeedForward"]
    assert max(result.report["end_to_end"]["outputs"].values()) <= 1e-4


def test_inexact_rewrite_declared_exact_is_rejected(example):
    module, inputs = _model(example)
    kernelize.register_rewrite(kernelize.Rewrite("erf_gelu", example["erf_gelu_pattern"], example["gelu"]))
    kernelize.register_rewrite(kernelize.Rewrite("tanh_gelu_claimed_exact", example["exact_gelu_pattern"],
                                                 example["tanh_gelu"], exact=True))
    result = kernelize.optimize(module, inputs, measure_latency=False)
    status = {e["name"]: e for e in result.report["custom_rewrites"]}
    rejected = status["tanh_gelu_claimed_exact"]
    assert rejected["status"] == "rejected"
    assert "declared exact" in rejected["detail"] and rejected["max_abs_error"] > 1e-4
    # the rejected rewrite left no trace: the graph still uses the exact GELU
    gelus = [n for n in result.model.graph if n.op_type in ("Gelu", "BiasGelu", "FastGelu")]
    assert gelus and all(n.op_type == "BiasGelu" for n in gelus)


def test_same_rewrite_declared_approximate_is_applied_and_reports_error(example):
    module, inputs = _model(example)
    kernelize.register_rewrite(kernelize.Rewrite("erf_gelu", example["erf_gelu_pattern"], example["gelu"]))
    kernelize.register_rewrite(kernelize.Rewrite("tanh_gelu_claimed_exact", example["exact_gelu_pattern"],
                                                 example["tanh_gelu"], exact=False))
    result = kernelize.optimize(module, inputs, measure_latency=False)
    entry = {e["name"]: e for e in result.report["custom_rewrites"]}["tanh_gelu_claimed_exact"]
    assert entry["status"] == "applied" and entry["max_abs_error"] > 1e-4


def test_plugin_found_through_entry_point(tmp_path, monkeypatch):
    """A pip-installed plugin: a distribution whose entry_points.txt names a Rewrite."""
    (tmp_path / "kz_demo_plugin.py").write_text(textwrap.dedent(f"""
        import runpy
        import kernelize
        _ex = runpy.run_path({str(EXAMPLE)!r})
        def rewrites():
            return [kernelize.Rewrite("plugin_erf_gelu", _ex["erf_gelu_pattern"], _ex["gelu"])]
    """))
    dist = tmp_path / "kz_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kz-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kernelize.rewrites]\nerf_gelu = kz_demo_plugin:rewrites\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    names = [r.name for r in registry.custom_rewrites()]
    assert "plugin_erf_gelu" in names


def test_register_rejects_non_rewrite():
    with pytest.raises(kernelize.KernelizeError):
        kernelize.register_rewrite(lambda op, x: x)


def test_replacement_containing_its_own_pattern_terminates(example):
    """Erf -> Erf (the replacement matches the pattern again): each original node is
    rewritten once, so optimize ends (it used to loop until the OOM killer)."""
    def erf_pattern(op, x):
        return op.Erf(x)

    def erf_again(op, x):
        return op.Erf(x)

    kernelize.register_rewrite(kernelize.Rewrite("erf_again", erf_pattern, erf_again))
    try:
        module, inputs = _model(example)
        result = kernelize.optimize(module, inputs, measure_latency=False)
    finally:
        kernelize.unregister_rewrite("erf_again")
    (entry,) = [e for e in result.report["custom_rewrites"] if e["name"] == "erf_again"]
    assert entry["status"] == "applied" and entry["sites"] == 1


def test_non_finite_result_stops_the_run(example, tmp_path):
    """A rewrite that makes the model give NaN where the original is finite: optimize stops
    with a one-line KernelizeError and writes nothing (it used to write the artifact, exit 0)."""
    from kernelize.errors import KernelizeError

    def erf_pattern(op, x):
        return op.Erf(x)

    def nan_erf(op, x):
        return op.Sqrt(op.Sub(op.Neg(op.Abs(x)), op.Constant(value_float=1.0)))

    kernelize.register_rewrite(kernelize.Rewrite("nan_erf", erf_pattern, nan_erf, exact=False))
    out = tmp_path / "out"
    try:
        module, inputs = _model(example)
        with pytest.raises(KernelizeError, match="non-finite"):
            kernelize.optimize(module, inputs, measure_latency=False, output_dir=out)
    finally:
        kernelize.unregister_rewrite("nan_erf")
    assert not out.exists()
