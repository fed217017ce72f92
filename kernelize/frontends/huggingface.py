"""Hugging Face frontend: a local model folder (``config.json``, weights, tokenizer files)
into the IR, as a user of ``optimum-cli export onnx --model DIR`` would get it.

The folder is loaded with ``transformers`` (the class its config names, else ``AutoModel``),
never from the network. Example inputs follow the modality: the folder's tokenizer on two
sentences for text, ``pixel_values`` for vision, ``input_values`` for audio. The export is
``torch.onnx.export(dynamo=True)`` with the batch and sequence axes dynamic and named
``batch`` and ``sequence``; inputs and outputs keep Hugging Face's names (``input_ids``,
``attention_mask``, ``last_hidden_state``, ``pooler_output``, ``logits``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx_ir as ir

from kernelize.errors import KernelizeError
from kernelize.frontends import onnx as onnx_frontend

SENTENCES = ["kernelize rewrites transformer graphs into faster equivalent ones.",
             "An example sentence, a little longer than the first one, for the export."]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def is_model_folder(path) -> bool:
    """Whether ``path`` is a folder (a Hugging Face model folder has a config.json)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir()


def load_folder(folder: str | os.PathLike) -> tuple[ir.Model, str]:
    """(IR model, a name for reports) of the Hugging Face model in ``folder``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise KernelizeError(f"{folder} has no config.json: not a Hugging Face model folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module, example = _load(folder)
    return _export(module, example), str(folder)


def _load(folder: Path):
    import torch
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" (kernelize reports its own steps)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as err:
        raise KernelizeError(f"{folder}: {_first_line(err)}") from None
    except OSError as err:
        raise KernelizeError(f"{folder}: cannot read the config: {_first_line(err)}") from None
    names = [n for n in (config.architectures or []) if hasattr(transformers, n)]
    cls = getattr(transformers, names[0]) if names else transformers.AutoModel
    try:
        module = cls.from_pretrained(folder, local_files_only=True).eval()
    except OSError as err:  # missing weights, or files it would have to download
        raise KernelizeError(f"{folder}: cannot load the model offline: {_first_line(err)}") from None
    except ValueError as err:
        raise KernelizeError(f"{folder}: {_first_line(err)}") from None
    with torch.no_grad():
        return module, _example_inputs(folder, config, module)


def _example_inputs(folder: Path, config, module) -> dict:
    """Inputs of one call, by modality, as the model's forward names them."""
    import inspect

    import torch
    import transformers

    accepted = set(inspect.signature(module.forward).parameters)
    if "input_ids" in accepted:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise KernelizeError(f"{folder}: a text model without a usable tokenizer: {_first_line(err)}") from None
        encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in TEXT_INPUTS and k in accepted}
    if "pixel_values" in accepted:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size)}
    if "input_values" in accepted:
        return {"input_values": torch.randn(2, 16000)}
    raise KernelizeError(f"{folder}: {type(module).__name__} takes none of input_ids, pixel_values, input_values")


def _export(module, example: dict) -> ir.Model:
    import torch

    names = list(example)
    outputs = _output_names(module, example)

    class Positional(torch.nn.Module):
        """Keyword inputs by position, the model's output fields as a tuple."""

        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, *args):
            out = self.model(**dict(zip(names, args)))
            return tuple(out[k] for k in outputs)

    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=2, max=_max_length(module))
    dynamic = tuple({0: batch, 1: sequence} if k in TEXT_INPUTS else {0: batch} for k in names)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "model.onnx")
        try:
            torch.onnx.export(Positional().eval(), tuple(example.values()), path, input_names=names,
                              output_names=outputs, dynamic_shapes=(dynamic,), dynamo=True, verbose=False)
        except Exception as err:  # noqa: BLE001 - export failures come in many types
            raise KernelizeError(f"torch export failed: {_first_line(err, last=True)}") from None
        return onnx_frontend.load(path)


def _output_names(module, example: dict) -> list[str]:
    """The fields of the model's output on ``example`` that are tensors (no cache, no tuples)."""
    import torch

    with torch.no_grad():
        out = module(**example)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


def _max_length(module) -> int:
    """The longest sequence the position table takes (RoBERTa-style offsets leave 2 fewer)."""
    config = module.config
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions < 4:
        return 4096
    pad = getattr(config, "pad_token_id", None)
    return positions - (pad + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") and pad else 0)


def _first_line(err: BaseException, last: bool = False) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(err).__name__
