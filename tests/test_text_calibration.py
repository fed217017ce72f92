"""Text calibration (issue 16): ``--calib-text FILE|DIR`` tokenized with the model folder's
tokenizer (or ``--tokenizer``), ``--calib-seq`` / ``--calib-samples``; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernelize.cli import main
from kernelize.errors import UsageError
from kernelize.frontends import text


def _run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kernelize: error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def fast_text_run(tiny_hf_folder, passages_file, tmp_path_factory):
    """``kernelize optimize FOLDER --recipe fast --calib-text FILE`` as the issue asks."""
    out = tmp_path_factory.mktemp("fast") / "art"
    code = main(["optimize", str(tiny_hf_folder), "-o", str(out), "--recipe", "fast", "--calib-text",
                 str(passages_file), "--calib-seq", "16", "--calib-samples", "6", "-q"])
    return code, out


def test_passages_of_a_file_and_of_a_folder(tmp_path, passages_file):
    assert text.read_passages(passages_file)[:2] == ["the cat sat on the mat.", "it was a fine day for a walk in the park"]
    assert len(text.read_passages(passages_file)) == 6  # the blank line is skipped
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second\npassage, over two lines\n")
    (folder / "a.txt").write_text("first passage")
    (folder / ".hidden").write_text("not a passage")
    assert text.read_passages(folder) == ["first passage", "second passage, over two lines"]


def test_tokenized_as_the_tokenizer_pads_and_truncates(tiny_hf_folder):
    tokenizer = text.load_tokenizer(tiny_hf_folder)
    feeds = text.tokenize(["the cat", "the cat sat on the mat and it was a fine day for a walk"], tokenizer, 8)
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.shape == (2, 8) and a.dtype == np.int64 for a in feeds.values())
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids[0, 0] == tokenizer.cls_token_id and mask[0].tolist() == [1] * 4 + [0] * 4  # [CLS] the cat [SEP] pad
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == tokenizer.sep_token_id  # truncated, ending as the tokenizer ends


def test_optimize_a_folder_with_text_calibration(fast_text_run):
    code, out = fast_text_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    section = report["approximate"]
    assert section["calibration"].startswith("text: ") and "6 passages at 16 tokens" in section["calibration"]
    assert section["seq"] == 16 and section["calibration_samples"] == {"fit": 3, "held_out": 3}
    assert section["sites"]  # attention and projection sites were calibrated on the text
    assert (out / "report.html").is_file()


def test_text_with_an_onnx_model_needs_a_tokenizer(tiny_hf_folder, passages_file, tmp_path, capsys):
    import onnx_ir as ir

    from kernelize.frontends import huggingface

    model, _ = huggingface.load_folder(tiny_hf_folder)
    path = tmp_path / "tiny.onnx"
    ir.save(model, path)
    code, _, err = _run(["optimize", str(path), "-o", str(tmp_path / "o"), "--recipe", "fast", "--calib-text",
                         str(passages_file), "-q"], capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    _one_line(err, "--calib-text needs a tokenizer")
    code, out, err = _run(["inspect", str(path), "--recipe", "fast", "--calib-text", str(passages_file),
                           "--tokenizer", str(tiny_hf_folder), "--calib-seq", "12", "--calib-samples", "4",
                           "--rewrite", "attention=linear:elu", "--json", "-q"], capsys)
    assert code == 0, err
    assert "4 passages at 12 tokens" in json.loads(out)["approximate"]["calibration"]


@pytest.mark.parametrize("case", ["empty", "missing", "blank-lines", "empty-folder", "not-utf8"])
def test_bad_text_is_one_line(case, tiny_hf_folder, tmp_path, capsys):
    path = tmp_path / "calib.txt"
    if case == "empty":
        path.write_text("")
    elif case == "blank-lines":
        path.write_text("\n   \n\n")
    elif case == "empty-folder":
        path = tmp_path / "texts"
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = _run(["optimize", str(tiny_hf_folder), "-o", str(tmp_path / "o"), "--recipe", "fast",
                         "--calib-text", str(path), "-q"], capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    needle = {"empty": "no passages (empty file)", "missing": "calibration text not found",
              "blank-lines": "no passages (empty file)", "empty-folder": "no passages (empty folder)",
              "not-utf8": "is not UTF-8 text"}[case]
    _one_line(err, needle)


def test_folder_without_tokenizer_is_one_line(tiny_hf_folder, passages_file, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_hf_folder / name).read_bytes())
    calib = text.TextCalibration(passages_file, seq=8, samples=4)
    calib.check(folder)  # a Hugging Face folder: its tokenizer is looked for there
    with pytest.raises(Exception) as err:
        text.load_tokenizer(folder)
    assert "no usable tokenizer" in str(err.value) and "\n" not in str(err.value)
    code, _, err_text = _run(["optimize", str(folder), "-o", str(tmp_path / "o"), "--recipe", "fast",
                              "--calib-text", str(passages_file), "--calib-seq", "8", "-q"], capsys)
    assert code == 1 and not (tmp_path / "o").exists()
    _one_line(err_text, "no usable tokenizer")


def test_option_combinations_are_checked(tiny_hf_folder, passages_file, tmp_path, capsys):
    npz = tmp_path / "c.npz"
    np.savez(npz, input_ids=np.zeros((2, 8), np.int64))
    cases = [(["--calib", str(npz), "--calib-text", str(passages_file)], "not both"),
             (["--calib-seq", "16"], "go(es) with --calib-text"),
             (["--calib-text", str(passages_file), "--calib-seq", "1"], "--calib-seq must be an integer of at least 2"),
             (["--calib-text", str(passages_file), "--tokenizer", str(tmp_path / "nope")], "tokenizer folder not found")]
    for extra, needle in cases:
        code, _, err = _run(["optimize", str(tiny_hf_folder), "-o", str(tmp_path / "o"), "--recipe", "fast", "-q",
                             *extra], capsys)
        assert code == 2, (extra, err)
        _one_line(err, needle)
    with pytest.raises(UsageError, match="at least 2"):
        text.TextCalibration(passages_file, samples=1)


def test_token_ids_past_the_embedding_table_are_one_line(tiny_hf_folder, tmp_path):
    """A tokenizer of another model (its ids past this model's table) stops before any run."""
    from kernelize.frontends import huggingface
    from kernelize.passes import calibrate

    model, _ = huggingface.load_folder(tiny_hf_folder)
    rows = len((tiny_hf_folder / "vocab.txt").read_text().split())
    feeds = {"input_ids": np.full((2, 8), rows + 5, np.int64), "attention_mask": np.ones((2, 8), np.int64),
             "token_type_ids": np.zeros((2, 8), np.int64)}
    with pytest.raises(UsageError, match=f"ids up to {rows + 5}, the model's embedding table has {rows} rows"):
        calibrate.load(model, feeds)
