"""The model zoo: small random-weight architectures from ``transformers`` and torch, each
exported the three ways users export them (issue 12). The tests (``tests/test_zoo.py``) and
the coverage benchmark (``benchmarks/zoo.py``) take their models from here.

Exporters: ``dynamo`` is ``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence,
``dynamo_static`` the same with the example's shapes fixed, ``legacy`` the TorchScript
exporter (``dynamo=False``, opset 17, dynamic axes) as Hugging Face Optimum writes.
Random weights: good for structure and exactness, not for accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

VOCAB, HIDDEN, HEADS, LAYERS = 120, 32, 4, 2
EXPORTERS = ("dynamo", "dynamo_static", "legacy")
EXPORT_SHAPE = (2, 16)  # batch, sequence of the example the exporters trace
CHECK_SHAPE = (3, 11)  # a second shape for the dynamic exports, with a padded row
SAMPLES_PER_FRAME = 20  # audio: the convolution stack's total stride

TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=2 * HIDDEN, max_position_embeddings=64)
IMAGE = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
             image_size=16, patch_size=4, num_channels=3)
AUDIO = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
             conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=4,
             num_conv_pos_embedding_groups=2)
BASE = {"text": TEXT, "image": IMAGE, "audio": AUDIO}
DECODER = dict(use_cache=False)
DEBERTA_V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
                  norm_rel_ebd="layer_norm", share_att_key=True)  # as microsoft/deberta-v3-* configure it


def _hf(model_type: str, kind: str, **extra) -> Callable:
    """A builder of a random-weight ``transformers`` model of ``model_type``: small, eager attention."""
    def build():
        import transformers

        config = transformers.AutoConfig.for_model(model_type, **{**BASE[kind], **extra})
        config._attn_implementation = "eager"
        return transformers.AutoModel.from_config(config), kind
    return build


def _torch_encoder():
    import torch

    layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 2 * HIDDEN, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False), "hidden"


def _torch_decoder():
    import torch

    layer = torch.nn.TransformerDecoderLayer(HIDDEN, HEADS, 2 * HIDDEN, dropout=0.0, batch_first=True,
                                             norm_first=True)
    decoder = torch.nn.TransformerDecoder(layer, LAYERS // 2)

    class SelfConditioned(torch.nn.Module):
        """A decoder attending to itself and, through cross-attention, to its input."""

        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, x):
            return self.decoder(x, x)

    return SelfConditioned(), "hidden"


def _torch_mha():
    import torch

    attention = torch.nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
    norm = torch.nn.LayerNorm(HIDDEN)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.norm = attention, norm

        def forward(self, x):
            for _ in range(LAYERS):  # one module applied twice: two sites sharing weights
                x = self.norm(x + self.attention(x, x, x, need_weights=False)[0])
            return x

    return Block(), "hidden"


ARCHITECTURES: dict[str, Callable] = {
    # encoders
    "bert": _hf("bert", "text"),
    "roberta": _hf("roberta", "text"),
    "xlm_roberta": _hf("xlm-roberta", "text"),
    "distilbert": _hf("distilbert", "text", hidden_dim=2 * HIDDEN),
    "electra": _hf("electra", "text", embedding_size=HIDDEN),
    "albert": _hf("albert", "text"),
    "mpnet": _hf("mpnet", "text"),
    "deberta": _hf("deberta", "text", relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16),
    "deberta_v2": _hf("deberta-v2", "text", **DEBERTA_V3),
    "ernie": _hf("ernie", "text"),
    "megatron_bert": _hf("megatron-bert", "text"),
    "roformer": _hf("roformer", "text"),
    "data2vec_text": _hf("data2vec-text", "text"),
    "rembert": _hf("rembert", "text"),
    "mobilebert": _hf("mobilebert", "text"),
    "layoutlm": _hf("layoutlm", "text"),
    "ibert": _hf("ibert", "text"),
    "xlm": _hf("xlm", "text"),
    "big_bird": _hf("big_bird", "text", attention_type="original_full"),
    "nystromformer": _hf("nystromformer", "text"),
    "convbert": _hf("convbert", "text"),
    "modernbert_local": _hf("modernbert", "text", pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                            sep_token_id=2, global_attn_every_n_layers=2, local_attention=4),
    "torch_encoder": _torch_encoder,
    "torch_decoder": _torch_decoder,
    "torch_mha": _torch_mha,
    # decoders, without a cache
    "llama_gqa": _hf("llama", "text", num_key_value_heads=2, **DECODER),
    "mistral_sliding": _hf("mistral", "text", num_key_value_heads=2, sliding_window=4, **DECODER),
    "qwen2": _hf("qwen2", "text", num_key_value_heads=2, **DECODER),
    "qwen3": _hf("qwen3", "text", num_key_value_heads=2, head_dim=8, **DECODER),
    "gemma_mqa": _hf("gemma", "text", num_key_value_heads=1, head_dim=8, **DECODER),
    "phi": _hf("phi", "text", **DECODER),
    "phi3": _hf("phi3", "text", num_key_value_heads=2, pad_token_id=0, **DECODER),
    "stablelm": _hf("stablelm", "text", num_key_value_heads=2, **DECODER),
    "olmo": _hf("olmo", "text", **DECODER),
    "starcoder2": _hf("starcoder2", "text", num_key_value_heads=2, **DECODER),
    "gpt2": _hf("gpt2", "text", **DECODER),
    "gpt_neo_local": _hf("gpt_neo", "text", attention_types=[[["global", "local"], 1]], window_size=4, **DECODER),
    "gptj": _hf("gptj", "text", rotary_dim=4, **DECODER),
    "gpt_neox": _hf("gpt_neox", "text", **DECODER),
    "codegen": _hf("codegen", "text", rotary_dim=4, n_ctx=64, **DECODER),
    "opt": _hf("opt", "text", ffn_dim=2 * HIDDEN, word_embed_proj_dim=HIDDEN, **DECODER),
    "bloom": _hf("bloom", "text", **DECODER),
    "falcon": _hf("falcon", "text", **DECODER),
    # vision
    "vit": _hf("vit", "image"),
    "deit": _hf("deit", "image"),
    "beit": _hf("beit", "image", use_relative_position_bias=True),
    "dinov2": _hf("dinov2", "image"),
    "data2vec_vision": _hf("data2vec-vision", "image"),
    "clip_vision": _hf("clip_vision_model", "image"),
    "siglip_vision": _hf("siglip_vision_model", "image"),
    # audio
    "wav2vec2": _hf("wav2vec2", "audio"),
    "hubert": _hf("hubert", "audio"),
    "data2vec_audio": _hf("data2vec-audio", "audio"),
    "unispeech": _hf("unispeech", "audio"),
    "sew": _hf("sew", "audio", squeeze_factor=1),
    "wavlm": _hf("wavlm", "audio"),
}
# architectures with softmaxes that are not attention: how many per layer
OTHER_SOFTMAX = {"convbert": 1}  # the span-based dynamic convolution normalizes its kernel (axis 1)
# architectures without a normalization to find, and why
NO_NORMALIZATION = {"mobilebert": "NoNorm is an elementwise affine map (x * w + b), not a normalization"}


def build(arch: str):
    """(module in eval mode, input kind) of the zoo's ``arch``, seeded."""
    import torch

    torch.manual_seed(0)
    module, kind = ARCHITECTURES[arch]()
    return module.eval(), kind


def inputs(kind: str, batch: int, seq: int, pad: bool = False):
    """(torch tensors, input names) of one call; ``pad`` masks the end of the last text row."""
    import torch

    gen = torch.Generator().manual_seed(batch * 100 + seq)
    if kind == "text":
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad and batch > 1:
            mask[-1, seq - seq // 3:] = 0
        return (ids, mask), ["input_ids", "attention_mask"]
    if kind == "image":
        return (torch.randn(batch, 3, 16, 16, generator=gen),), ["pixel_values"]
    if kind == "audio":
        return (torch.randn(batch, SAMPLES_PER_FRAME * seq, generator=gen),), ["input_values"]
    return (torch.randn(batch, seq, HIDDEN, generator=gen),), ["x"]


def check_inputs(kind: str, exporter: str):
    """The inputs an export is checked at: a second shape with a padded row, or for a static
    export its own shape."""
    if exporter == "dynamo_static":
        return inputs(kind, *EXPORT_SHAPE)
    return inputs(kind, *CHECK_SHAPE, pad=True)


def _wrapped(module, kind: str):
    import torch

    class FirstOutput(torch.nn.Module):
        """Positional inputs in, the first output tensor out (what an exporter is given)."""

        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *args):
            if kind == "text":
                out = self.module(input_ids=args[0], attention_mask=args[1])
            elif kind == "image":
                out = self.module(pixel_values=args[0])
            elif kind == "audio":
                out = self.module(input_values=args[0])
            else:
                out = self.module(args[0])
            return out if isinstance(out, torch.Tensor) else out[0]

    return FirstOutput().eval()


def reference(module, kind: str, args) -> np.ndarray:
    """The torch module's own output for ``args`` (what an export must match)."""
    import torch

    with torch.no_grad():
        return _wrapped(module, kind)(*args).numpy()


def export(module, kind: str, exporter: str, path: str | os.PathLike) -> onnx.ModelProto:
    """Export ``module`` as ``exporter`` does to ``path`` (one file) and load it."""
    import torch

    args, names = inputs(kind, *EXPORT_SHAPE)
    wrapped = _wrapped(module, kind)
    path = str(Path(path))
    with torch.no_grad():
        if exporter == "legacy":
            # torch's fused encoder fast path (aten::_transformer_encoder_layer_fwd) has no
            # ONNX export; switched off, the modules run (and export) their plain ops
            torch.backends.mha.set_fastpath_enabled(False)
            axes = {n: ({0: "batch"} if kind == "image" else {0: "batch", 1: "sequence"}) for n in names}
            try:
                torch.onnx.export(wrapped, args, path, input_names=names, output_names=["output"], opset_version=17,
                                  dynamo=False, dynamic_axes=axes)
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
        elif exporter in ("dynamo", "dynamo_static"):
            shapes = None
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=64)
                seq = (torch.export.Dim("samples", min=40, max=1200) if kind == "audio"
                       else torch.export.Dim("sequence", min=2, max=60))
                shapes = (tuple({0: batch} if kind == "image" else {0: batch, 1: seq} for _ in names),)
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=["output"], dynamo=True,
                              dynamic_shapes=shapes, external_data=False)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    return onnx.load(path)
