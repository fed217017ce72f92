"""The command line: help, exit codes, one-line errors and no partial output on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kernelize.cli import main


def _no_attention_model(path, external=False):
    """x @ W -> Relu: a valid model with nothing to fuse."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    if external:
        onnx.save_model(model, path, save_as_external_data=True, location="tiny.onnx.data",
                        all_tensors_to_one_file=True, size_threshold=0)
    else:
        onnx.save_model(model, path)
    return path


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, expected_code=1, needle=""):
    assert code == expected_code
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1, err
    assert lines[0].startswith("kernelize: error:")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_help_on_every_command(capsys):
    for args in (["--help"], ["optimize", "--help"], ["inspect", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
        assert "usage: kernelize" in capsys.readouterr().out


def test_missing_file(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(["optimize", str(tmp_path / "nope.onnx"), "-o", str(out), "-q"], capsys)
    _assert_one_line_error(code, err, 1, "not found")
    assert not out.exists()


def test_truncated_file(tmp_path, capsys):
    good = _no_attention_model(tmp_path / "good.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[:57])
    out = tmp_path / "out"
    code, _, err = _run(["optimize", str(bad), "-o", str(out), "-q"], capsys)
    _assert_one_line_error(code, err, 1, "not a valid ONNX file")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_garbage_file(tmp_path, capsys):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(os.urandom(4096))
    code, _, err = _run(["inspect", str(bad)], capsys)
    _assert_one_line_error(code, err, 1)


def test_external_data_outside_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _no_attention_model(folder / "tiny.onnx", external=True)
    (tmp_path / "secret.bin").write_bytes((folder / "tiny.onnx.data").read_bytes())
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save_model(proto, path)
    out = tmp_path / "out"
    code, _, err = _run(["optimize", str(path), "-o", str(out), "-q"], capsys)
    _assert_one_line_error(code, err, 1, "outside the model's folder")
    assert not out.exists()


def test_external_data_inside_folder_loads(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _no_attention_model(folder / "tiny.onnx", external=True)
    code, out, _ = _run(["inspect", str(path)], capsys)
    assert code == 0 and "sites: none" in out


def test_no_attention_succeeds_with_zero_sites(tmp_path, capsys):
    path = _no_attention_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    code, stdout, _ = _run(["optimize", str(path), "-o", str(out), "-q", "--no-latency"], capsys)
    assert code == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["sites"] == [] and report["summary"]["sites"] == {}
    assert (out / "model.onnx").is_file() and (out / "report.txt").is_file()
    assert max(report["end_to_end"]["outputs"].values()) == 0.0


@pytest.mark.parametrize("flag,value", [("--recipe", "turbo"), ("--backend", "tensorrt")])
def test_unknown_recipe_or_backend(tmp_path, capsys, flag, value):
    path = _no_attention_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    code, _, err = _run(["optimize", str(path), "-o", str(out), flag, value, "-q"], capsys)
    _assert_one_line_error(code, err, 2, value)
    assert not out.exists()


def test_existing_output_needs_force(tmp_path, capsys):
    path = _no_attention_model(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(["optimize", str(path), "-o", str(out), "-q", "--no-latency"], capsys)
    _assert_one_line_error(code, err, 1, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = _run(["optimize", str(path), "-o", str(out), "-q", "--no-latency", "--force"], capsys)
    assert code == 0 and (out / "model.onnx").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("where", ["input_folder", "cwd", "parent", "root"])
def test_output_that_would_delete_the_input_is_refused(tmp_path, capsys, monkeypatch, where):
    """``-o <the input's folder> --force`` (and ``.``, ``..``, ``/``) would replace the user's
    files: a one-line error, and the input is still there."""
    folder = tmp_path / "models"
    folder.mkdir()
    path = _no_attention_model(folder / "tiny.onnx")
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = {"input_folder": str(folder), "cwd": ".", "parent": "..", "root": "/"}[where]
    code, _, err = _run(["optimize", str(path), "-o", out, "-q", "--no-latency", "--force"], capsys)
    _assert_one_line_error(code, err, 1, "refusing" if where in ("cwd", "parent") else "contains the input")
    assert work.is_dir()
    assert path.is_file() and sorted(p.name for p in folder.iterdir()) == ["tiny.onnx"]


def test_bad_builder_spec(capsys):
    code, _, err = _run(["inspect", "no_such_pkg.models:build"], capsys)
    _assert_one_line_error(code, err, 1, "cannot import")


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["optimize", "--threads"])
    assert exc.value.code == 2


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kernelize", "optimize", str(tmp_path / "missing.onnx"),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("kernelize: error: model file not found")


def test_slower_result_is_warned_about(tmp_path, capsys, monkeypatch):
    """A model measured slower than the original is still written, with a warning on the
    console and in the report."""
    from kernelize.backends import ort as ort_backend

    times = iter([1.0, 2.0])
    monkeypatch.setattr(ort_backend, "latency_ms", lambda *a, **k: {"median_ms": next(times), "runs": 3})
    path = _no_attention_model(tmp_path / "tiny.onnx")
    code, out, _ = _run(["optimize", str(path), "-o", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "warning: the optimized model is slower than the original (0.50x" in out
    import json

    assert "slower" in json.loads((tmp_path / "out" / "report.json").read_text())["latency"]["warning"]


def test_sigterm_while_writing_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    """SIGTERM in the middle of writing the artifact: one line, exit 143, and neither the
    output nor kernelize's hidden temp folder is left behind."""
    import os
    import signal

    from kernelize.deploy import artifact

    real = artifact.sha256_file

    def terminated_midway(path):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(path)

    monkeypatch.setattr(artifact, "sha256_file", terminated_midway)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        path = _no_attention_model(tmp_path / "tiny.onnx")
        code, _, err = _run(["optimize", str(path), "-o", str(tmp_path / "out"), "-q", "--no-latency"], capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and err.strip() == "kernelize: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_version(capsys):
    import kernelize

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kernelize {kernelize.__version__}"


def test_artifacts_follow_the_umask(tmp_path, capsys):
    """The artifact folder, its files and a packed archive get the modes a plain mkdir/open
    would give (mkdtemp and mkstemp make them private), issue 13."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert main(["optimize", _no_attention_model(str(tmp_path / "tiny.onnx")), "-o", str(out), "-q",
                     "--no-latency"]) == 0
        assert main(["pack", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {(f.stat().st_mode & 0o777) for f in out.iterdir()} == {0o644}
    assert (tmp_path / "out.tar.gz").stat().st_mode & 0o777 == 0o644
