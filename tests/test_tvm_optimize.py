"""``kernelize optimize --backend tvm``: verified build, artifact, and running it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kernelize
from kernelize.cli import main
from kernelize.deploy import runner as runner_mod


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.slow
def test_tvm_cpu_artifact_runs_and_matches(encoder, tmp_path):
    out = tmp_path / "art"
    result = kernelize.optimize(encoder, (torch.randn(2, 9, 32),), backend="tvm", target="cpu",
                                shape={"batch": 2, "seq": 16}, output_dir=out, measure_latency=False)
    tvm_report = result.report["tvm"]
    assert tvm_report["shapes"] and max(tvm_report["max_abs_error_vs_ort"].values()) <= 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tvm" and manifest["model"] == "model.so"
    x = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)
    art = runner_mod.load(out)
    (name,) = [i["name"] for i in manifest["inputs"]]
    got = list(art.run({name: x}).values())[0]
    with torch.no_grad():
        expected = encoder(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-4


@pytest.mark.slow
def test_tvm_arm64_artifact_is_an_aarch64_shared_object(encoder, tmp_path):
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("gcc-aarch64-linux-gnu is not installed (.ci/run installs it)")
    out = tmp_path / "arm"
    result = kernelize.optimize(encoder, (torch.randn(2, 8, 32),), backend="tvm", target="arm64",
                                output_dir=out, measure_latency=False)
    assert "not run" in result.report["tvm"]["max_abs_error_vs_ort"]
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[16] == 3  # ET_DYN: a shared object
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_ort_backend_refuses_other_targets(capsys, tmp_path):
    code = main(["optimize", "kernelize.models.minilm:build", "--target", "cuda", "-o", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "supports targets cpu and arm64" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ort_arm64_artifact_has_a_loadable_ort_model(encoder, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "mobile"
    kernelize.optimize(encoder, (torch.randn(2, 9, 32),), backend="ort", target="arm64", output_dir=out,
                       measure_latency=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mobile_model"] == "model.ort" and "model.ort" in manifest["files"]
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier
    x = np.random.default_rng(1).standard_normal((3, 11, 32)).astype(np.float32)
    mobile = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = mobile.get_inputs()[0].name
    got, expected = mobile.run(None, {name: x})[0], full.run(None, {name: x})[0]
    assert np.max(np.abs(got - expected)) <= 1e-5


def test_unknown_tvm_target_is_a_usage_error(capsys, tmp_path):
    code = main(["optimize", "kernelize.models.minilm:build", "--backend", "tvm", "--target", "tpu9",
                 "-o", str(tmp_path / "o"), "-q"])
    assert code == 2 and "unknown target" in capsys.readouterr().err


def test_bad_build_shape_is_a_usage_error(capsys, tmp_path):
    code = main(["optimize", "kernelize.models.minilm:build", "--backend", "tvm", "--shape", "batch=zero",
                 "-o", str(tmp_path / "o"), "-q"])
    assert code == 2 and "--shape" in capsys.readouterr().err


def test_unknown_shape_name_is_a_usage_error():
    """``--shape sequence=64`` on a model whose axes are batch/seq (or its own symbols) is
    refused with the names it does have, instead of silently building 1 x 128."""
    import onnx
    import pytest

    from kernelize.backends import tvm as tvm_backend
    from kernelize.errors import UsageError

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s72", 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match=r"sequence, which the model does not have \(use b, batch, s72, seq\)"):
        tvm_backend.input_shapes(model, {"sequence": 64})
    assert tvm_backend.input_shapes(model, {"s72": 5, "batch": 2}) == {"x": [2, 5, 8]}
