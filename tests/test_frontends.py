"""Frontends: opset upgrade, bytes/ModelProto input, and the 'package.module:function' form."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import kernelize
from kernelize.cli import main
from kernelize.frontends.onnx import CANONICAL_OPSET, load


def _old_opset_model():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Unsqueeze", ["h", "axes"], ["y"])],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 4])], [w, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_opset_upgraded_to_canonical():
    model = load(_old_opset_model())
    assert model.opset_imports[""] == CANONICAL_OPSET


def test_bytes_and_proto_inputs_agree():
    proto = _old_opset_model()
    a = kernelize.optimize(proto, measure_latency=False)
    b = kernelize.optimize(proto.SerializeToString(), measure_latency=False)
    assert a.report["end_to_end"]["outputs"] == b.report["end_to_end"]["outputs"]


def test_builder_spec_from_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "kz_models.py").write_text(textwrap.dedent("""
        import torch

        def build():
            torch.manual_seed(0)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            return model, (torch.randn(2, 9, 32),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["optimize", "kz_models:build", "-o", str(out), "-q", "--no-latency"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["sites"]["attention"] == 2
    assert max(report["end_to_end"]["outputs"].values()) <= 1e-4
    saved = onnx.load(out / "model.onnx")
    dims = saved.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param  # batch and sequence stay dynamic
