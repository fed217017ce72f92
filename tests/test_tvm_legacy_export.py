"""``--backend tvm`` on a legacy-exported model (issue 13): the TorchScript exporter and the
constant folder write ``Constant(value_ints=...)`` and ``ConstantOfShape`` of constant
shapes, which TVM's ONNX importer rejects ("no value in Constant"); the TVM frontend turns
them into initializers, and the build matches ONNX Runtime."""

from __future__ import annotations

import pytest

import kernelize
from kernelize.models import zoo


@pytest.mark.slow
def test_tvm_builds_a_legacy_bert_export(tmp_path):
    module, kind = zoo.build("bert")
    model = zoo.export(module, kind, "legacy", tmp_path / "model.onnx")
    assert any(n.op_type == "Constant" and n.attribute[0].name != "value" for n in model.graph.node) or any(
        n.op_type == "ConstantOfShape" for n in model.graph.node)
    result = kernelize.optimize(model, backend="tvm", target="cpu", shape={"batch": 1, "seq": 16},
                                measure_latency=False)
    assert max(result.report["tvm"]["max_abs_error_vs_ort"].values()) <= 1e-4
