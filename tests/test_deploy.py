"""Artifacts (kernelize.deploy): write/verify/pack, run without the compiler, run/bench/deploy
commands, and deployment over TVM RPC to loopback servers (direct and through a tracker).

The artifacts are built here, from a tiny ONNX graph (ort) and a tiny Relax module exported
to a .so (tvm), so these tests do not depend on kernelize's own compilers.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernelize.cli import main
from kernelize.deploy import artifact, runner
from kernelize.errors import KernelizeError

REPO = Path(__file__).resolve().parents[1]
W8 = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
REPORT = {"model": "tiny", "recipe": "exact", "backend": "ort",
          "sites": [{"id": "ffn_0", "pattern": "ffn", "rewrite": "FeedForward", "output": "y", "nodes": 3,
                     "max_abs_error": 1.5e-7}],
          "near_misses": [], "summary": {"sites": {"ffn": 1}},
          "custom_rewrites": [{"name": "erf_gelu", "exact": False, "sites": 1, "status": "applied",
                               "detail": "1 site(s)", "max_abs_error": 2e-4}],
          "end_to_end": {"outputs": {"y": 3e-7}, "shapes": [[1, 7]]}}


# ----------------------------------------------------------------------------- builders

def _ort_multi_model():
    """(x[batch, seq, 8], b[8]) -> y = relu(x @ W + b), s = sum(y, -1)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["h2"]),
         helper.make_node("Relu", ["h2"], ["y"]), helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0)],
        "tiny_multi",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", "seq"])],
        [numpy_helper.from_array(W8, "w"), numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _ort_single_model():
    """x[batch, 8] -> y = relu(x @ W)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [numpy_helper.from_array(W8, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _write_ort(path, model, **fields):
    inputs, outputs = artifact.signature_from_onnx(model)
    manifest = {"backend": "ort", "inputs": inputs, "outputs": outputs, **fields}
    return artifact.write(path, {"model.onnx": model.SerializeToString()}, manifest, REPORT)


def _relax_module():
    """main(x[n, 16], w[16, 4]) -> (relu(x @ w), sum(relu(x @ w), axis 1))."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 16], "float32"))
    w = relax.Var("w", relax.TensorType([16, 4], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, w)))
            s = bb.emit(relax.op.sum(y, axis=[1]))
            out = bb.emit_output(relax.Tuple([y, s]))
        bb.emit_func_output(out)
    return bb.get()


def _write_tvm(path, target_spec, library_name, preset):
    import tvm
    from tvm import relax

    mod = _relax_module()
    target = tvm.target.Target(target_spec)
    with target:
        executable = relax.build(relax.get_pipeline("zero")(mod), target=target)
    build = Path(str(path) + "-build")
    build.mkdir()
    executable.export_library(str(build / library_name))
    inputs, outputs = artifact.signature_from_relax(mod["main"], ["y", "s"])
    manifest = {"backend": "tvm", "inputs": inputs, "outputs": outputs, "entry": "main",
                "target": {"preset": preset, "string": str(target)}}
    return artifact.write(path, {library_name: build / library_name}, manifest, {**REPORT, "backend": "tvm"})


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """The artifacts every test reads (never modified: tests that tamper copy them first)."""
    base = tmp_path_factory.mktemp("arts")
    return {
        "multi": _write_ort(base / "multi", _ort_multi_model()),
        "single": _write_ort(base / "single", _ort_single_model()),
        "tvm": _write_tvm(base / "tvm", {"kind": "llvm"}, "model.so", "x86_64-cpu"),
        # really cross-compiled for aarch64: a .tar of objects, linked on the device
        "arm64": _write_tvm(base / "arm64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
                            "model.tar", "arm64"),
        "cuda": _write_ort(base / "cuda", _ort_single_model(),
                           target={"preset": "cuda", "string": "onnxruntime:CUDAExecutionProvider"}),
    }


def _copy(src, tmp_path, name="copy"):
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, expected_code=1, needle=""):
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1, err
    assert lines[0].startswith("kernelize: error:")
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def _refused(path, needle, check_target=True):
    with pytest.raises(KernelizeError) as exc:
        artifact.load(path, check_target=check_target)
    message = str(exc.value)
    assert "\n" not in message and needle in message, message
    return message


def _reference_multi(x, b):
    y = np.maximum(x @ W8 + b, 0)
    return y, y.sum(-1)


# ----------------------------------------------------------------------------- artifact: write, load, run

def test_write_load_run_roundtrip(arts):
    with runner.load(arts["multi"]) as model:
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32),
                 "b": np.linspace(-1, 1, 8, dtype=np.float32)}
        out = model.run(feeds)
    y, s = _reference_multi(feeds["x"], feeds["b"])
    assert list(out) == ["y", "s"]
    np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["s"], s, rtol=1e-5, atol=1e-5)


def test_manifest_contents(arts):
    folder = arts["multi"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == artifact.FORMAT and manifest["format_version"] == artifact.FORMAT_VERSION
    assert manifest["backend"] == "ort" and manifest["model"] == "model.onnx"
    assert manifest["target"]["preset"] == "cpu" and manifest["target"]["device"] == "cpu"
    assert manifest["inputs"] == [{"name": "x", "shape": ["batch", "seq", 8], "dtype": "float32"},
                                  {"name": "b", "shape": [8], "dtype": "float32"}]
    assert manifest["outputs"][1] == {"name": "s", "shape": ["batch", "seq"], "dtype": "float32"}
    assert set(manifest["versions"]) >= {"kernelize", "onnxruntime"}
    rewrites = {r["rewrite"]: r for r in manifest["rewrites"]}
    assert rewrites["FeedForward"]["max_abs_error"] == 1.5e-7 and rewrites["erf_gelu"]["max_abs_error"] == 2e-4
    assert manifest["end_to_end_max_abs_error"] == 3e-7
    files = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert files == sorted(manifest["files"]) == ["model.onnx", "report.json", "report.txt"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert json.loads((folder / "report.json").read_text())["model"] == "tiny"
    assert "FeedForward" in (folder / "report.txt").read_text()
    tvm_manifest = json.loads((arts["tvm"] / "manifest.json").read_text())
    assert tvm_manifest["model"] == "model.so" and "tvm" in tvm_manifest["versions"]
    assert tvm_manifest["inputs"][0]["shape"] == ["n", 16]
    assert tvm_manifest["target"]["arch"] == artifact.host()["arch"]
    assert json.loads((arts["arm64"] / "manifest.json").read_text())["target"]["arch"] == "aarch64"


def test_write_needs_force_and_is_atomic(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KernelizeError, match="--force"):
        _write_ort(out, _ort_single_model())
    assert (out / "keep.txt").read_text() == "mine"
    artifact.write(out, {"model.onnx": _ort_single_model().SerializeToString()},
                   {"backend": "ort", "inputs": [{"name": "x", "shape": ["batch", 8], "dtype": "float32"}],
                    "outputs": [{"name": "y", "shape": ["batch", 8], "dtype": "float32"}]}, REPORT, force=True)
    assert not (out / "keep.txt").exists() and artifact.verify(out)["backend"] == "ort"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary folder left


@pytest.mark.parametrize("files,fields,needle", [
    ({"model.onnx": b"x"}, {"backend": "tensorrt"}, "unknown artifact backend"),
    ({"weights.bin": b"x"}, {"backend": "ort"}, "needs one of: model.onnx"),
    ({"model.onnx": b"x", "../evil": b"x"}, {"backend": "ort"}, "invalid artifact file name"),
    ({"model.onnx": "/no/such/file.onnx"}, {"backend": "ort"}, "not found"),
    ({"model.onnx": b"x"}, {"backend": "ort", "inputs": []}, "inputs"),
])
def test_write_refuses_bad_requests(tmp_path, files, fields, needle):
    sig = [{"name": "x", "shape": [1], "dtype": "float32"}]
    manifest = {"inputs": sig, "outputs": sig, **fields}
    with pytest.raises(KernelizeError, match=needle):
        artifact.write(tmp_path / "out", files, manifest, REPORT)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary folder left


def test_external_data_artifact(tmp_path):
    import onnx

    model = _ort_single_model()
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(model, src / "model.onnx", save_as_external_data=True, location="model.onnx.data",
                    all_tensors_to_one_file=True, size_threshold=0)
    inputs, outputs = artifact.signature_from_onnx(src / "model.onnx")
    folder = artifact.write(tmp_path / "art", {"model.onnx": src / "model.onnx", "model.onnx.data":
                                               str(src / "model.onnx.data")},
                            {"backend": "ort", "inputs": inputs, "outputs": outputs}, REPORT)
    shutil.rmtree(src)  # the artifact holds its own copy
    assert set(artifact.verify(folder)["files"]) == {"model.onnx", "model.onnx.data", "report.json", "report.txt"}
    x = np.ones((2, 8), np.float32)
    with runner.load(folder) as loaded:
        np.testing.assert_allclose(loaded.run({"x": x})["y"], np.maximum(x @ W8, 0), rtol=1e-5, atol=1e-5)
    (folder / "model.onnx.data").write_bytes(b"\0" * (folder / "model.onnx.data").stat().st_size)
    _refused(folder, "checksum mismatch for model.onnx.data")


def test_tvm_roundtrip(arts):
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    w = np.random.default_rng(3).standard_normal((16, 4)).astype(np.float32)
    with runner.load(arts["tvm"]) as model:
        out = model.run({"x": x, "w": w})
        stats = model.bench({"x": x, "w": w}, runs=5, warmup=1)
    y = np.maximum(x @ w, 0)
    np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["s"], y.sum(1), rtol=1e-5, atol=1e-5)
    assert stats["runs"] == 5 and stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert sorted(p.name for p in arts["tvm"].iterdir()) == ["manifest.json", "model.so", "report.json",
                                                             "report.txt"]


# ----------------------------------------------------------------------------- archives

def test_pack_unpack_roundtrip(arts, tmp_path):
    archive = artifact.pack(arts["multi"], tmp_path / "multi.tar.gz")
    assert archive.is_file()
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["multi/manifest.json", "multi/model.onnx", "multi/report.json",
                                          "multi/report.txt"]
    feeds = {"x": np.ones((1, 2, 8), np.float32), "b": np.zeros(8, np.float32)}
    with runner.load(archive) as model:  # the archive runs as it is
        from_archive = model.run(feeds)
        extracted = model.artifact.path
        assert extracted.is_dir()
    assert not extracted.exists()  # its temporary copy is gone after close
    folder = artifact.unpack(archive)
    assert folder == tmp_path / "multi" and artifact.verify(folder)["backend"] == "ort"
    with pytest.raises(KernelizeError, match="--force"):
        artifact.unpack(archive)
    with pytest.raises(KernelizeError, match="--force"):
        artifact.pack(arts["multi"], archive)
    with pytest.raises(KernelizeError, match="cannot be inside the artifact folder"):
        artifact.pack(folder, folder / "self.tar.gz")
    with runner.load(folder) as model:
        np.testing.assert_array_equal(model.run(feeds)["y"], from_archive["y"])


def _tar_with(path, entries):
    """entries: (name, bytes | ('symlink', target))."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("entries,needle", [
    ([("art/manifest.json", b"{}"), ("art/../../evil.txt", b"x")], "outside the target folder"),
    ([("/tmp/evil.txt", b"x")], "outside the target folder"),
    ([("art/manifest.json", b"{}"), ("art/link", ("symlink", "/etc/passwd"))], "link or special file"),
    ([("a/manifest.json", b"{}"), ("b/manifest.json", b"{}")], "exactly one top-level folder"),
])
def test_unpack_refuses_unsafe_archives(tmp_path, entries, needle):
    archive = _tar_with(tmp_path / "bad.tar.gz", entries)
    with pytest.raises(KernelizeError, match=needle):
        artifact.unpack(archive, tmp_path / "out")
    _refused(archive, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_tampered_archive_refused(arts, tmp_path):
    archive = artifact.pack(arts["single"], tmp_path / "single.tar.gz")
    with tarfile.open(archive) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = [(n, b"\x00" + c[1:] if n.endswith("model.onnx") else c) for n, c in members]
    _refused(_tar_with(tmp_path / "evil.tar.gz", members), "checksum mismatch for model.onnx")


# ----------------------------------------------------------------------------- refusals


def test_tampered_file_refused(arts, tmp_path, capsys):
    folder = _copy(arts["single"], tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-5] ^= 0xFF  # same size, different content (a weight)
    (folder / "model.onnx").write_bytes(bytes(data))
    _refused(folder, "checksum mismatch for model.onnx")
    code, _, err = _run(["run", str(folder), "--random"], capsys)
    _assert_one_line_error(code, err, 1, "checksum mismatch")


def test_wrong_checksum_refused(arts, tmp_path):
    folder = _copy(arts["single"], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["report.json"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "checksum mismatch for report.json")


def test_truncated_file_refused(arts, tmp_path):
    folder = _copy(arts["single"], tmp_path)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:40])
    _refused(folder, "model.onnx has 40 bytes")


def test_missing_and_unexpected_files_refused(arts, tmp_path):
    folder = _copy(arts["single"], tmp_path)
    (folder / "report.txt").unlink()
    _refused(folder, "file report.txt is missing")
    folder = _copy(arts["single"], tmp_path, "copy2")
    (folder / "model.onnx.data").write_bytes(b"not listed")
    _refused(folder, "unexpected file model.onnx.data")
    folder = _copy(arts["single"], tmp_path, "copy3")
    (folder / "manifest.json").unlink()
    _refused(folder, "no manifest.json")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(format_version=artifact.FORMAT_VERSION + 1), "newer than this kernelize reads"),
    (lambda m: m.update(format="something-else"), "not a kernelize artifact"),
    (lambda m: m.update(backend="tensorrt"), "unknown backend"),
    (lambda m: m.pop("inputs"), "has no 'inputs'"),
])
def test_bad_manifest_refused(arts, tmp_path, edit, needle):
    folder = _copy(arts["single"], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, needle)


def test_not_an_artifact(tmp_path):
    _refused(tmp_path / "nope", "artifact not found")
    (tmp_path / "junk.bin").write_bytes(os.urandom(100))
    _refused(tmp_path / "junk.bin", "not an artifact folder or .tar.gz")
    (tmp_path / "manifest.json").write_text("{not json")
    _refused(tmp_path, "not valid JSON")


@pytest.mark.parametrize("which,needle", [("arm64", "aarch64"), ("cuda", "no cuda device")])
def test_wrong_target_refused(arts, capsys, which, needle):
    message = _refused(arts[which], needle)
    assert "this machine" in message
    artifact.load(arts[which], check_target=False).close()  # intact: only the target is wrong
    code, _, err = _run(["run", str(arts[which]), "--random"], capsys)
    _assert_one_line_error(code, err, 1, needle)
    code, _, err = _run(["bench", str(arts[which])], capsys)
    _assert_one_line_error(code, err, 1, needle)


# ----------------------------------------------------------------------------- input validation

GOOD_X = np.zeros((2, 3, 8), np.float32)
GOOD_B = np.zeros(8, np.float32)


@pytest.mark.parametrize("feeds,needle", [
    ({"x": GOOD_X.astype(np.float64), "b": GOOD_B}, "input 'x' has dtype float64, expected float32"),
    ({"x": GOOD_X[0], "b": GOOD_B}, "expected (batch, seq, 8) (rank 3, not 2)"),
    ({"x": np.zeros((2, 3, 7), np.float32), "b": GOOD_B}, "dim 2 must be 8"),
    ({"x": GOOD_X}, "missing input 'b'"),
    ({"x": GOOD_X, "b": GOOD_B, "z": GOOD_B}, "unknown input 'z'"),
])
def test_wrong_inputs_rejected(arts, tmp_path, capsys, feeds, needle):
    with runner.load(arts["multi"]) as model:
        with pytest.raises(KernelizeError) as exc:
            model.run(feeds)
    assert "\n" not in str(exc.value) and needle in str(exc.value)
    np.savez(tmp_path / "in.npz", **feeds)
    code, out, err = _run(["run", str(arts["multi"]), "--input", str(tmp_path / "in.npz")], capsys)
    _assert_one_line_error(code, err, 1, needle)
    assert out == ""


def test_inconsistent_symbolic_dims_rejected(arts):
    with runner.load(arts["tvm"]) as model:
        model.run({"x": np.zeros((5, 16), np.float32), "w": np.zeros((16, 4), np.float32)})  # n = 5 is fine
        with pytest.raises(KernelizeError, match="dim 0 must be 16"):
            model.run({"x": np.zeros((5, 16), np.float32), "w": np.zeros((4, 4), np.float32)})
    sig = [{"name": "a", "shape": ["batch", 4], "dtype": "float32"},
           {"name": "m", "shape": ["batch", 4], "dtype": "float32"}]
    with pytest.raises(KernelizeError, match="input 'm' has batch=3 at dim 0, but input 'a' has batch=2"):
        runner.validate(sig, {"a": np.zeros((2, 4), np.float32), "m": np.zeros((3, 4), np.float32)})


# ----------------------------------------------------------------------------- CLI: run, bench, pack

def test_cli_run_npy(arts, tmp_path, capsys):
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, _ = _run(["run", str(arts["single"]), "--input", str(tmp_path / "x.npy"),
                         "--output", str(tmp_path / "y.npy")], capsys)
    assert code == 0 and "wrote" in out
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.maximum(x @ W8, 0), rtol=1e-5, atol=1e-5)
    code, out, _ = _run(["run", str(arts["single"]), "-i", str(tmp_path / "x.npy")], capsys)
    assert code == 0 and "y: shape [3, 8] float32" in out


def test_cli_run_npz(arts, tmp_path, capsys):
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 4, 8)).astype(np.float32),
             "b": np.full(8, 0.5, np.float32)}
    np.savez(tmp_path / "in.npz", **feeds)
    code, _, _ = _run(["run", str(arts["multi"]), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "o.npz")],
                      capsys)
    assert code == 0
    with np.load(tmp_path / "o.npz") as out:
        assert sorted(out.files) == ["s", "y"]
        y, s = _reference_multi(feeds["x"], feeds["b"])
        np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["s"], s, rtol=1e-5, atol=1e-5)


def test_cli_run_random(arts, tmp_path, capsys):
    code, _, _ = _run(["run", str(arts["multi"]), "--random", "--shape", "seq=7", "-o", str(tmp_path / "o.npz")],
                      capsys)
    assert code == 0
    with np.load(tmp_path / "o.npz") as out:
        assert out["y"].shape == (1, 7, 8) and out["s"].shape == (1, 7)
    code, out, _ = _run(["run", str(arts["tvm"]), "--random"], capsys)
    assert code == 0 and "y: shape [1, 4] float32" in out and "s: shape [1] float32" in out
    code, out, _ = _run(["run", str(arts["multi"]), "--random"], capsys)  # defaults: batch 1, seq 128
    assert code == 0 and "y: shape [1, 128, 8]" in out


@pytest.mark.parametrize("args,code,needle", [
    (["run", "{multi}"], 2, "give exactly one of --input FILE or --random"),
    (["run", "{multi}", "--random", "-i", "{tmp}/x.npy"], 2, "give exactly one"),
    (["run", "{multi}", "--random", "--shape", "seq"], 2, "--shape wants DIM=N"),
    (["run", "{multi}", "--random", "--shape", "nope=3"], 1, "no symbolic dim of that name"),
    (["run", "{multi}", "--random", "-o", "{tmp}/o.txt"], 2, "--output must end in .npy or .npz"),
    (["run", "{multi}", "--random", "-o", "{tmp}/o.npy"], 1, "has 2 outputs (y, s): use a .npz"),
    (["run", "{multi}", "-i", "{tmp}/x.npy"], 1, "takes 2 inputs (x, b): pass a .npz"),
    (["run", "{multi}", "-i", "{tmp}/missing.npy"], 1, "input file not found"),
    (["run", "{multi}", "-i", "{tmp}/junk.npy"], 1, "cannot read"),
    (["run", "{tmp}/nothing", "--random"], 1, "artifact not found"),
    (["bench", "{multi}", "--runs", "0"], 2, "--runs must be at least 1"),
    (["run", "{multi}", "--random", "--threads", "0"], 2, "--threads must be at least 1"),
])
def test_cli_run_mistakes(arts, tmp_path, capsys, args, code, needle):
    np.save(tmp_path / "x.npy", np.zeros((1, 8), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    args = [a.format(multi=arts["multi"], tmp=tmp_path) for a in args]
    got, _, err = _run(args, capsys)
    _assert_one_line_error(got, err, code, needle)
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.txt").exists()


def test_cli_bench(arts, tmp_path, capsys):
    code, out, _ = _run(["bench", str(arts["single"]), "--runs", "7", "--shape", "batch=2"], capsys)
    assert code == 0
    assert "x 2x8" in out and "7 runs" in out and "median" in out and "p10" in out and "p90" in out
    code, out, _ = _run(["bench", str(arts["tvm"]), "--runs", "5", "--json"], capsys)
    stats = json.loads(out)
    assert code == 0 and stats["runs"] == 5 and stats["backend"] == "tvm"
    assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"] and stats["spread_pct"] >= 0
    code, out, _ = _run(["bench", str(arts["multi"]), "--runs", "3", "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "median" in out and json.loads((tmp_path / "b.json").read_text())["runs"] == 3


def test_cli_pack_unpack(arts, tmp_path, capsys):
    code, out, _ = _run(["pack", str(arts["single"]), "-o", str(tmp_path / "s.tar.gz")], capsys)
    assert code == 0 and (tmp_path / "s.tar.gz").is_file()
    code, _, _ = _run(["pack", str(tmp_path / "s.tar.gz"), "--unpack", "-o", str(tmp_path / "s")], capsys)
    assert code == 0 and artifact.verify(tmp_path / "s")
    code, _, err = _run(["pack", str(tmp_path / "s.tar.gz"), "--unpack", "-o", str(tmp_path / "s")], capsys)
    _assert_one_line_error(code, err, 1, "--force")
    code, out, _ = _run(["run", str(tmp_path / "s.tar.gz"), "--random"], capsys)
    assert code == 0 and "y: shape [1, 8]" in out


def test_help_on_deploy_commands(capsys):
    for args in (["run", "--help"], ["bench", "--help"], ["deploy", "--help"], ["pack", "--help"], ["--help"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "usage: kernelize" in text
    assert main([]) == 2


# ----------------------------------------------------------------------------- without the compiler

def test_importing_runner_is_light():
    """`import kernelize.deploy.runner` pulls neither torch, onnxscript, onnx nor kernelize.api."""
    code = textwrap.dedent("""
        import sys
        import kernelize
        eager = "kernelize.api" in sys.modules
        import kernelize.deploy.runner, kernelize.deploy.artifact, kernelize.deploy.remote, kernelize.cli
        heavy = sorted(m for m in ("torch", "onnxscript", "onnx", "onnx_ir", "kernelize.api", "tvm", "onnxruntime")
                       if m in sys.modules)
        print(eager, ",".join(heavy))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    eager, heavy = proc.stdout.split()[0] == "True", proc.stdout.split()[1:] or [""]
    assert not eager and heavy == [""], proc.stdout


def test_runs_without_torch_onnx_or_the_compiler(arts):
    """A target with numpy + onnxruntime / TVM runtime only: torch, onnx, onnxscript, onnx_ir and
    kernelize.api cannot be imported, and both artifacts still run (API and CLI)."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys, types
        BLOCKED = ("torch", "onnx", "onnxscript", "onnx_ir", "transformers", "kernelize.api")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        try:
            import kernelize
        except ImportError:  # kernelize/__init__.py imports the compiler: stand in a bare package
            for m in [m for m in sys.modules if m == "kernelize" or m.startswith("kernelize.")]:
                del sys.modules[m]
            pkg = types.ModuleType("kernelize"); pkg.__path__ = [{str(REPO / "kernelize")!r}]
            sys.modules["kernelize"] = pkg
        import numpy as np
        from kernelize.deploy import runner
        from kernelize.cli import main
        with runner.load({str(arts["single"])!r}) as m:
            y = m.run({{"x": np.ones((2, 8), np.float32)}})["y"]
        with runner.load({str(arts["tvm"])!r}) as m:
            s = m.run({{"x": np.ones((2, 16), np.float32), "w": np.ones((16, 4), np.float32)}})["s"]
        assert main(["run", {str(arts["multi"])!r}, "--random", "--shape", "seq=3"]) == 0
        assert main(["bench", {str(arts["tvm"])!r}, "--runs", "3"]) == 0
        print("OK", y.shape, s.tolist(), [b for b in BLOCKED if b in sys.modules])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK (2, 8) [64.0, 64.0] []" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- deploy over TVM RPC

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_range() -> int:
    return random.randint(20000, 55000)


@pytest.fixture(scope="module")
def rpc_server():
    from tvm import rpc

    base = _port_range()
    server = rpc.Server(host="127.0.0.1", port=base, port_end=base + 1000, silent=True)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one server registered with it under key 'kernelize-test'."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (apache-tvm[rpc])")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    base = _port_range()
    trk = Tracker(host="127.0.0.1", port=base, port_end=base + 1000, silent=True)
    server = None
    try:
        server = rpc.Server(host="127.0.0.1", port=base + 1001, port_end=base + 2000, silent=True,
                            key="kernelize-test", tracker_addr=("127.0.0.1", trk.port))
        client = rpc.connect_tracker("127.0.0.1", trk.port)
        deadline = time.time() + 60
        while "kernelize-test" not in client.summary()["queue_info"]:
            assert time.time() < deadline, "the server did not register with the tracker"
            time.sleep(0.2)
        client.close()
        yield f"127.0.0.1:{trk.port}"
    finally:
        if server is not None:
            server.terminate()
        trk.terminate()


def _deploy_and_check(arts, tmp_path, capsys, args):
    out_file = tmp_path / "remote.npz"
    code, out, err = _run(["deploy", str(arts["tvm"]), *args, "--runs", "5", "-o", str(out_file),
                           "--json", str(tmp_path / "d.json"), "-q"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["local_check"]["status"] == "match" and result["local_check"]["max_abs_diff"] == 0.0
    assert result["latency"]["runs"] == 5 and result["latency"]["median_ms"] > 0
    assert "outputs match the local run" in out and "remote latency" in out
    # the device's outputs equal a local run on the same (seeded) random inputs
    code, _, _ = _run(["run", str(arts["tvm"]), "--random", "-o", str(tmp_path / "local.npz")], capsys)
    with np.load(out_file) as remote, np.load(tmp_path / "local.npz") as local:
        assert sorted(remote.files) == sorted(local.files) == ["s", "y"]
        for name in local.files:
            np.testing.assert_array_equal(remote[name], local[name])
    return result


def test_deploy_rpc_loopback(arts, tmp_path, capsys, rpc_server):
    result = _deploy_and_check(arts, tmp_path, capsys, ["--rpc", rpc_server])
    assert result["address"] == rpc_server and result["shapes"] == {"x": [1, 16], "w": [16, 4]}


def test_deploy_archive_with_shape(arts, tmp_path, capsys, rpc_server):
    archive = artifact.pack(arts["tvm"], tmp_path / "tvm.tar.gz")
    code, out, err = _run(["deploy", str(archive), "--rpc", rpc_server, "--shape", "n=6", "--runs", "3",
                           "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["shapes"]["x"] == [6, 16] and result["outputs"]["y"]["shape"] == [6, 4]
    assert result["local_check"]["status"] == "match"


def test_deploy_tracker(arts, tmp_path, capsys, tracker):
    result = _deploy_and_check(arts, tmp_path, capsys, ["--tracker", tracker, "--key", "kernelize-test"])
    assert result["key"] == "kernelize-test"
    # the pool's only device was given back: a second deploy gets it again without waiting
    start = time.perf_counter()
    code, _, err = _run(["deploy", str(arts["tvm"]), "--tracker", tracker, "--key", "kernelize-test",
                         "--timeout", "5", "-q", "--runs", "2"], capsys)
    assert code == 0, err
    assert time.perf_counter() - start < 5


def test_deploy_tracker_busy_device_times_out(arts, capsys, tracker):
    from tvm import rpc

    host, port = tracker.rsplit(":", 1)
    client = rpc.connect_tracker(host, int(port))
    client.summary()
    client._sock.settimeout(30)  # never hang the suite if the device does not come back
    held = client.request("kernelize-test", max_retry=1)  # the only device, now busy
    try:
        start = time.perf_counter()
        code, _, err = _run(["deploy", str(arts["tvm"]), "--tracker", tracker, "--key", "kernelize-test",
                             "--timeout", "1", "-q"], capsys)
        _assert_one_line_error(code, err, 1, "no free device with key 'kernelize-test'")
        assert time.perf_counter() - start < 10
    finally:
        del held
        gc.collect()  # closes the session: the device goes back to the pool
    code, _, err = _run(["deploy", str(arts["tvm"]), "--tracker", tracker, "--key", "kernelize-test",
                         "--runs", "2", "--timeout", "10", "-q"], capsys)
    assert code == 0, err  # and the pool works again


def test_deploy_tracker_unknown_key(arts, capsys, tracker):
    start = time.perf_counter()
    code, _, err = _run(["deploy", str(arts["tvm"]), "--tracker", tracker, "--key", "no-such-key", "-q"], capsys)
    _assert_one_line_error(code, err, 1, "no device with key 'no-such-key'")
    assert "kernelize-test" in err and time.perf_counter() - start < 15


def test_deploy_cross_compiled_artifact_on_wrong_device(arts, capsys, rpc_server):
    code, _, err = _run(["deploy", str(arts["arm64"]), "--rpc", rpc_server, "-q"], capsys)
    _assert_one_line_error(code, err, 1, "the device could not load model.tar")


def test_deploy_unused_port_fails_fast(arts, capsys):
    port = _free_port()
    start = time.perf_counter()
    code, _, err = _run(["deploy", str(arts["tvm"]), "--rpc", f"127.0.0.1:{port}", "-q"], capsys)
    _assert_one_line_error(code, err, 1, f"cannot connect to RPC server 127.0.0.1:{port}")
    code, _, err = _run(["deploy", str(arts["tvm"]), "--tracker", f"127.0.0.1:{port}", "--key", "k", "-q"], capsys)
    _assert_one_line_error(code, err, 1, f"cannot connect to RPC tracker 127.0.0.1:{port}")
    assert time.perf_counter() - start < 10


def test_deploy_silent_listener_times_out(arts, capsys):
    """Something accepts the TCP connection but never speaks RPC: an error after --timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        start = time.perf_counter()
        code, _, err = _run(["deploy", str(arts["tvm"]), "--rpc", f"127.0.0.1:{port}", "--timeout", "1", "-q"],
                            capsys)
        elapsed = time.perf_counter() - start
    _assert_one_line_error(code, err, 1, "did not answer within 1 s")
    assert elapsed < 10


def test_deploy_ort_artifact_refused(arts, capsys):
    code, _, err = _run(["deploy", str(arts["single"]), "--rpc", f"127.0.0.1:{_free_port()}"], capsys)
    _assert_one_line_error(code, err, 1, "is an ort artifact: deploy over TVM RPC needs a tvm artifact")


@pytest.mark.parametrize("args,needle", [
    ([], "give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY"),
    (["--rpc", "127.0.0.1:1", "--tracker", "127.0.0.1:2", "--key", "k"], "give either"),
    (["--rpc", "localhost"], "--rpc wants HOST:PORT"),
    (["--rpc", "localhost:99999"], "--rpc wants HOST:PORT"),
    (["--tracker", "127.0.0.1:9190"], "--tracker needs --key"),
    (["--rpc", "127.0.0.1:1", "--runs", "0"], "--runs must be at least 1"),
    (["--rpc", "127.0.0.1:1", "-o", "out.csv"], "--output must end in .npy or .npz"),
])
def test_deploy_usage_errors(arts, capsys, args, needle):
    code, _, err = _run(["deploy", str(arts["tvm"]), *args], capsys)
    _assert_one_line_error(code, err, 2, needle)
