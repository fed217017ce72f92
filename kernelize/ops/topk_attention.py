"""kernelize.TopKAttention: each query attends only its ``top_k`` highest-scoring keys.

Rule: per query row, the scores ``Q K^T * scale + bias`` (causal: keys ``j <= i`` only) are
ranked and the ``min(top_k, allowed keys)`` largest kept; softmax runs over those and the
output is ``P V`` gathered over those keys only.

Kernel: the Q K^T scores stay dense (S x S x D multiply-adds: the ranking needs every score);
the softmax and the P V product run over ``k`` keys only (S x k x D), via ONNX ``TopK`` and a
``GatherND`` of the value rows (TVM: ``topi.topk`` and a gather-reduce). So the cost is about
``(1 + k / S) / 2`` of exact attention: the saving is half at best.

Bias: any additive mask broadcastable to ``[B, H, S, S]`` works here (the scores are dense). A
value ``<= -1e4`` drops the key (it can only be picked when fewer than k keys remain, with
weight 0); a row left with no key outputs 0. Self-attention only when ``causal``;
``exact_below`` as for the other sparse operators (exact attention below that length).
"""

from __future__ import annotations

import numpy as np

from kernelize.ops.base import Operator, const, emit_length_dispatch
from kernelize.ops.block_sparse_attention import (MASKED_BIAS, _bias_or_neg, _dim, _i64, _row_has_key, _scalar,
                                                  causal_mask, emit_exact, exact_reference,
                                                  masked_attention_reference)


def topk_cost(attrs: dict, shape: dict) -> float:
    """Multiply-adds: dense Q K^T plus P V over ``min(top_k, S)`` keys."""
    b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_size"]
    return float(b * h * s * d) * (s + min(attrs["top_k"], s))


class TopKAttention(Operator):
    """Top-k sparse attention; see the module docstring."""

    name = "TopKAttention"
    inputs = ("query", "key", "value", "bias?")
    attributes = {"scale": float, "causal": int, "exact_below": int, "top_k": int}

    def reference(self, query, key, value, bias=None, *, scale, causal=0, exact_below=0, top_k=64):
        if query.shape[-2] < exact_below:
            return exact_reference(query, key, value, bias, scale, bool(causal))
        q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
        scores = (q @ np.swapaxes(k, -1, -2)) * scale
        keep = np.ones(scores.shape, bool)
        if bias is not None:
            b = np.broadcast_to(np.asarray(bias, np.float64), scores.shape)
            keep = b > MASKED_BIAS
            scores = scores + np.where(keep, b, 0.0)
        if causal:
            keep = keep & np.tril(np.ones(scores.shape[-2:], bool))
        scores = np.where(keep, scores, -np.inf)
        kth = -np.sort(-scores, axis=-1)[..., min(top_k, scores.shape[-1]) - 1:][..., :1]
        chosen = keep & (scores >= kth)  # ties at the k-th score: measure zero for real data
        return masked_attention_reference(query, key, value, bias, scale, chosen)

    @staticmethod
    def settings(attrs):
        top_k = int(attrs.get("top_k", 64))
        if top_k < 1:
            raise ValueError(f"TopKAttention: top_k must be >= 1, not {top_k}")
        return float(attrs["scale"]), bool(attrs.get("causal", 0)), top_k

    def body(self, tape, inputs, attrs):
        query, key, value, bias = inputs
        scale, causal, top_k = self.settings(attrs)

        def approximate(t):
            key_t = t.op("Transpose", [key], {"perm": [0, 1, 3, 2]})
            scores = t.op("Mul", [t.op("MatMul", [query, key_t]), const(t, scale)])
            seq_k1 = _dim(t, key, 2)
            mask = None
            if causal:
                mask = causal_mask(t, _scalar(t, _dim(t, query, 2)), _scalar(t, seq_k1))
            if bias is not None:
                padding = _bias_or_neg(t, bias)
                mask = padding if mask is None else t.op("Add", [padding, mask])
            if mask is not None:
                scores = t.op("Add", [scores, mask])
            k = t.op("Min", [seq_k1, _i64(t, [top_k])])
            best, index = t.op_multi_out("TopK", [scores, k], {"axis": -1, "largest": 1, "sorted": 0},
                                         num_outputs=2)
            probs = t.op("Softmax", [best], {"axis": -1})
            # P V over the chosen keys: value rows gathered per (batch, head) -> [B, H, S, k, Dv]
            lead = t.op("Shape", [index], {"start": 0, "end": 3})
            flat = t.op("Unsqueeze", [t.op("Reshape", [index, _i64(t, [0, 0, -1])]), _i64(t, [3])])
            rows = t.op("GatherND", [value, flat], {"batch_dims": 2})
            rows = t.op("Reshape", [rows, t.op("Concat", [lead, k, _dim(t, value, 3)], {"axis": 0})])
            out = t.op("MatMul", [t.op("Unsqueeze", [probs, _i64(t, [3])]), rows])
            out = t.op("Squeeze", [out, _i64(t, [3])])
            if bias is not None:
                out = t.op("Mul", [out, _row_has_key(t, mask)])
            return out

        exact = lambda t: emit_exact(t, query, key, value, bias, scale, causal)  # noqa: E731
        return [emit_length_dispatch(tape, query, int(attrs.get("exact_below", 0)), exact, approximate)]
