"""Inputs kernelize synthesizes follow what the model accepts (issue 12): a RoBERTa from the
legacy exporter with a 40-row position table (positions start after the padding index, so it
takes 38 tokens) is measured at 38 tokens instead of failing at the default 128, and the
report says so; calibration synthesized for it has the same bound."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import transformers

import kernelize
from kernelize.backends import ort as ort_backend
from kernelize.errors import KernelizeError
from kernelize.passes import calibrate, verify

POSITIONS = 40


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=POSITIONS)
    model = transformers.RobertaModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path_factory.mktemp("roberta") / "model.onnx"
    ids = torch.randint(3, 300, (2, 16))
    torch.onnx.export(Hidden(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")})
    return onnx.load(path)


def test_accepted_length_is_bounded_by_the_position_table(roberta):
    model = ir.from_proto(roberta)
    sess = ort_backend.session(roberta)
    assert verify.accepted_length(sess, model, 128) == POSITIONS - 2
    assert verify.accepted_length(sess, model, 20) == 20
    with pytest.raises(KernelizeError, match="ONNX Runtime failed"):
        ort_backend.run(sess, verify.random_inputs(model, 1, POSITIONS))


def test_latency_and_calibration_at_a_length_the_model_takes(roberta):
    result = kernelize.optimize(roberta, latency_runs=3)
    latency = result.report["latency"]
    assert latency["seq"] == POSITIONS - 2 and "does not run at 128" in latency["note"]
    calib = calibrate.load(ir.from_proto(roberta), None)
    assert calib.seq == POSITIONS - 2 and "input_ids" in calib.feeds
    assert np.max(calib.feeds["input_ids"]) < 300


def test_calibration_keeps_fixed_dimensions(tmp_path):
    """A bare attention core exported with q, k, v of shape [1, 12, n, 64] (batch and heads
    fixed): synthesized calibration keeps batch 1 per call, and the approximate rewrite is
    fitted and verified (it used to fail: 'Got invalid dimensions for input: q')."""

    class Core(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v

    q = torch.randn(1, 12, 32, 64)
    n = torch.export.Dim("n", min=2, max=1024)
    path = tmp_path / "core.onnx"
    torch.onnx.export(Core(), (q, q.clone(), q.clone()), str(path), input_names=["q", "k", "v"], dynamo=True,
                      dynamic_shapes=({2: n}, {2: n}, {2: n}), external_data=False)
    result = kernelize.optimize(str(path), rewrites=["attention=linear:favor+"], measure_latency=False)
    section = result.report["approximate"]
    assert section["chosen"] == {"attention[0]": "linear:favor"}
    assert section["calibration_samples"]["fit"] >= 1 and 0 < section["held_out_error"] < float("inf")


def test_lengths_grow_to_what_a_convolution_stack_needs():
    """Audio through a kernel-25, stride-5 Conv needs 25 samples: the verification shapes
    (lengths 7, 13, 32) are shifted up together, keeping distinct lengths, and latency's
    default length moves up to the shortest that runs."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input_values", TensorProto.FLOAT, ["batch", "samples"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 25)).astype(np.float32), "w")
    nodes = [helper.make_node("Unsqueeze", ["input_values", "one"], ["x3"]),
             helper.make_node("Conv", ["x3", "w"], ["y"], strides=[5])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [weight, numpy_helper.from_array(
        np.array([1], np.int64), "one")]), opset_imports=[helper.make_opsetid("", 17)])
    signature = ir.from_proto(proto)
    shapes = verify.accepted_shapes(proto, signature)
    lengths = [s for _, s in shapes]
    assert lengths[0] == 25 and lengths == [25, 31, 50], shapes
    assert verify.accepted_length(ort_backend.session(proto), signature, 7) == 25
