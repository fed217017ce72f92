"""Hugging Face model folders (issue 16): the packaged all-MiniLM-L6-v2 folder exports with
Hugging Face's input and output names and named dynamic axes; folders that are not models
get a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernelize.errors import KernelizeError
from kernelize.frontends import huggingface
from kernelize.models import minilm


@pytest.mark.slow
def test_minilm_folder_exports_with_hugging_face_names():
    import torch
    import transformers

    from kernelize.backends import ort as ort_backend

    model, _ = huggingface.load_folder(minilm.model_dir())
    inputs = {v.name: [str(d) for d in v.shape] for v in model.graph.inputs}
    assert inputs == {n: ["batch", "sequence"] for n in ("input_ids", "token_type_ids", "attention_mask")}
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state", "pooler_output"]
    ids, mask = minilm.tokenize(["A held-out sentence that the export never saw, padded.", "Short one."])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = ort_backend.run(ort_backend.session(model), feeds)["last_hidden_state"]
    reference = transformers.AutoModel.from_pretrained(minilm.model_dir()).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    assert float(np.max(np.abs(got - expected))) < 1e-4


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(KernelizeError, match="no config.json: not a Hugging Face model folder"):
        huggingface.load_folder(tmp_path)


def test_unknown_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(KernelizeError, match="no-such-architecture") as err:
        huggingface.load_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_folder_without_weights_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text((Path(minilm.model_dir()) / "config.json").read_text())
    with pytest.raises(KernelizeError, match="cannot load the model offline"):
        huggingface.load_folder(tmp_path)


@pytest.mark.slow
def test_inspect_takes_the_folder_on_the_command_line(capsys):
    """``kernelize inspect <folder>``: the MiniLM folder's six attention sites are found."""
    from kernelize.cli import main

    assert main(["inspect", minilm.model_dir()]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "6" in out


def test_a_folder_that_is_not_a_model_is_one_line_on_the_command_line(tmp_path, capsys):
    from kernelize.cli import main

    assert main(["optimize", str(tmp_path), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a Hugging Face model folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
