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


@pytest.mark.slow
def test_token_ids_past_the_table_are_refused_by_a_tvm_artifact(tmp_path, capsys):
    """TVM's Gather reads past the embedding table (an id of 100000 crashed the process, an id
    equal to the vocabulary size gave a wrong result): the manifest carries each id input's
    range and the runner refuses ids outside it, in one line (issue 13)."""
    import json

    import numpy as np

    from kernelize.cli import main

    module, kind = zoo.build("bert")
    model = zoo.export(module, kind, "dynamo", tmp_path / "model.onnx")
    art = tmp_path / "art"
    kernelize.optimize(model, backend="tvm", target="cpu", shape={"batch": 1, "seq": 16}, output_dir=art,
                       measure_latency=False)
    capsys.readouterr()  # the export's own warnings
    entry = next(e for e in json.loads((art / "manifest.json").read_text())["inputs"] if e["name"] == "input_ids")
    assert entry["range"] == [0, zoo.VOCAB]
    for bad in (100000, zoo.VOCAB, -1):
        ids = np.full((1, 16), 5, np.int64)
        ids[0, 3] = bad
        path = tmp_path / f"ids{bad}.npz"
        np.savez(path, input_ids=ids, attention_mask=np.ones((1, 16), np.int64))
        assert main(["run", str(art), "--input", str(path), "--output", str(tmp_path / "y.npz")]) == 1
        err = capsys.readouterr().err.strip()
        assert f"holds {bad}, outside [0, {zoo.VOCAB})" in err and len(err.splitlines()) == 1, err
    good = tmp_path / "good.npz"
    np.savez(good, input_ids=np.full((1, 16), zoo.VOCAB - 1, np.int64), attention_mask=np.ones((1, 16), np.int64))
    assert main(["run", str(art), "--input", str(good), "--output", str(tmp_path / "y.npz")]) == 0
