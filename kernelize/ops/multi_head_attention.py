"""kernelize.MultiHeadAttention: the whole block from hidden states to merged heads.

``Y = merge(Attention(split(Xq Wq + bq), split(Xk Wk + bk), split(Xv Wv + bv), bias))``
with ``split`` = reshape to ``[B, S, heads, head_size]`` then transpose to
``[B, heads, S, head_size]``, and ``merge`` its inverse. The output projection stays
outside (it is an ordinary MatMul).

ONNX Runtime: self-attention becomes ``com.microsoft.Attention`` with the three
projections packed into one GEMM; cross-attention becomes ``com.microsoft.MultiHeadAttention``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kernelize.graph import const_array
from kernelize.ops.attention import emit_sdpa, exact_attention
from kernelize.ops.base import Operator, add_initializer, const, function_inputs, swap_in


class MultiHeadAttention(Operator):
    name = "MultiHeadAttention"
    inputs = ("query_input", "key_input", "value_input",
              "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "bias?")
    attributes = {"num_heads": int, "scale": float}

    def reference(self, xq, xk, xv, wq, bq, wk, bk, wv, bv, bias=None, *, num_heads, scale):
        def split(x, w, b):
            y = np.asarray(x, np.float64) @ w + b
            batch, seq, width = y.shape
            return y.reshape(batch, seq, num_heads, width // num_heads).transpose(0, 2, 1, 3)

        q, k, v = split(xq, wq, bq), split(xk, wk, bk), split(xv, wv, bv)
        out = exact_attention(q, k, v, bias, scale=scale)
        batch, _, seq, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(batch, seq, -1).astype(np.float32)

    def body(self, tape, inputs, attrs):
        xq, xk, xv, wq, bq, wk, bk, wv, bv, bias = inputs
        heads = attrs["num_heads"]
        split_shape = const(tape, [0, 0, heads, -1], np.int64)

        def split(x, w, b):
            y = tape.op("Add", [tape.op("MatMul", [x, w]), b])
            return tape.op("Transpose", [tape.op("Reshape", [y, split_shape])], {"perm": [0, 2, 1, 3]})

        out = emit_sdpa(tape, split(xq, wq, bq), split(xk, wk, bk), split(xv, wv, bv), bias, attrs["scale"])
        merged = tape.op("Transpose", [out], {"perm": [0, 2, 1, 3]})
        return [tape.op("Reshape", [merged, const(tape, [0, 0, -1], np.int64)])]

    def lower_ort(self, node, graph):
        xq, xk, xv, wq, bq, wk, bk, wv, bv, bias = function_inputs(node, self)
        weights = [const_array(v) for v in (wq, wk, wv, bq, bk, bv)]
        if any(w is None for w in weights):
            return False
        heads = node.attributes["num_heads"].value
        scale = node.attributes["scale"].value
        wq_, wk_, wv_, bq_, bk_, bv_ = weights
        prefix = node.name or "mha"
        if xq is xk is xv:
            w = ir.Value(name=f"{prefix}.qkv_weight", const_value=ir.tensor(np.concatenate([wq_, wk_, wv_], 1)))
            b = ir.Value(name=f"{prefix}.qkv_bias", const_value=ir.tensor(np.concatenate([bq_, bk_, bv_])))
            for init in (w, b):
                add_initializer(graph, init)
            extra = []
            if bias is not None and not _full_bias(bias, xq):
                # ONNX Runtime wants [B|1, H|1, S, S]; Expand broadcasts e.g. a [B, 1, 1, S] padding mask
                seq = ir.Node("", "Shape", [xq], attributes=[ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)],
                              num_outputs=1)
                lead = add_initializer(graph, ir.Value(name=f"{prefix}.bias_lead",
                                                       const_value=ir.tensor(np.array([1, 1], np.int64))))
                target = ir.Node("", "Concat", [lead, seq.outputs[0], seq.outputs[0]],
                                 attributes=[ir.AttrInt64("axis", 0)], num_outputs=1)
                expand = ir.Node("", "Expand", [bias, target.outputs[0]], num_outputs=1)
                extra, bias = [seq, target, expand], expand.outputs[0]
            inputs = [xq, w, b, None, None, bias]
            while inputs[-1] is None:
                inputs.pop()
            new = ir.Node("com.microsoft", "Attention", inputs, num_outputs=1,
                          attributes=[ir.AttrInt64("num_heads", heads), ir.AttrFloat32("scale", scale)],
                          name=node.name)
        else:
            return False
        swap_in(graph, node, [*extra, new])
        return True


def _full_bias(bias: ir.Value, x: ir.Value) -> bool:
    """Whether ``bias`` is statically [*, *, S, S] with S the sequence axis of ``x``."""
    if bias.shape is None or len(bias.shape) != 4 or x.shape is None or len(x.shape) != 3:
        return False
    seq = x.shape[1]
    return bias.shape[2] == seq and bias.shape[3] == seq
