"""TVM lowering of kernelize.BlockSparseAttention (kernelize/ops/block_sparse_attention.py),
and the banded block kernel, dense-row and exact passes it shares with the lowerings of
SlidingWindowAttention and TopKAttention (conventions: the ops module's docstring)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from tvm import relax, te, tirx

from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import length_dispatch, sdpa, softmax, static_shape
from kernelize.errors import KernelizeError
from kernelize.ops.block_sparse_attention import MASKED_BIAS, NEG, Band, BlockSparseAttention, block_band

SLOT_MULTIPLE = 16  # slots per block padded to a multiple of this (two AVX2 vectors, one AVX-512
# vector), or the Q K^T matmul and the softmax over the slots are not vectorized at all


def _check_padding_bias(bias, batch: int, seq: int, op_name: str):
    shape = static_shape(bias)
    if len(shape) != 4 or shape[1:3] != [1, 1] or shape[3] != seq or shape[0] not in (1, batch):
        raise KernelizeError(f"{op_name}: the TVM kernel supports only a key-padding bias "
                             f"[B or 1, 1, 1, S], not {shape}")


def causal_mask(rows: int, cols: int):
    """[rows, cols] additive constant: 0 where key <= query, NEG elsewhere."""
    return relax.const(np.where(np.tril(np.ones((rows, cols), bool)), 0.0, NEG).astype(np.float32), "float32")


def padding_or_neg(bb, bias):
    """The bias where it keeps the key, NEG where it drops it (also turns -inf into NEG)."""
    op = relax.op
    return bb.emit(op.where(op.greater(bias, relax.const(np.float32(MASKED_BIAS), "float32")), bias,
                            relax.const(np.float32(NEG), "float32")))


def band_attention(bb, query, key, value, bias, scale: float, band: Band,
                   rule: Callable[[np.ndarray, np.ndarray], np.ndarray], op_name: str):
    """The banded block kernel as Relax: TE gathers of the key/value slots (K gathered straight
    into the [.., D, L] layout the matmul schedule wants), two batched matmuls over
    ``[B, H, nb]`` and the project's softmax. The slot mask is a constant (static shapes).
    The slots are padded to a multiple of ``SLOT_MULTIPLE`` with masked copies of key 0: the
    matmul and softmax schedules vectorize only widths the vector divides (window 256 + 4
    sinks gave 578 slots: Q K^T ran 4x slower unvectorized than at 592)."""
    op = relax.op
    batch, heads, seq, head = static_shape(query)
    head_v = static_shape(value)[3]
    b = band.block
    blocks = -(-seq // b)
    width = -(-band.width // SLOT_MULTIPLE) * SLOT_MULTIPLE  # extra slots: key 0, masked
    extra = width - band.width
    positions = np.pad(np.clip(band.positions(blocks), 0, seq - 1), ((0, 0), (0, extra)))
    index = relax.const(positions.astype(np.int32), "int32")
    mask = np.pad(np.where(band.valid(seq, rule), 0.0, NEG), ((0, 0), (0, 0), (0, extra)), constant_values=NEG)
    mask = mask.astype(np.float32)

    def blocked_queries(q):
        return te.compute((batch, heads, blocks, b, head), lambda n, h, t, r, d: tirx.if_then_else(
            t * b + r < seq, q[n, h, tirx.min(t * b + r, seq - 1), d], tirx.const(0.0, "float32")),
            name="query_blocks")

    def gather_keys_t(k, idx):
        return te.compute((batch, heads, blocks, head, width), lambda n, h, t, d, l: k[n, h, idx[t, l], d],
                          name="key_slots_t")

    def gather_values(v, idx):
        return te.compute((batch, heads, blocks, width, head_v), lambda n, h, t, l, d: v[n, h, idx[t, l], d],
                          name="value_slots")

    q_blocks = bb.emit_te(blocked_queries, query, primfunc_name_hint="query_blocks")
    key_t = bb.emit_te(gather_keys_t, key, index, primfunc_name_hint="key_slots_t")
    values = bb.emit_te(gather_values, value, index, primfunc_name_hint="value_slots")
    scores = bb.emit(op.matmul(q_blocks, key_t))
    scores = bb.emit(op.multiply(scores, relax.const(np.float32(scale), "float32")))
    additive = relax.const(mask, "float32")
    if bias is not None:
        _check_padding_bias(bias, batch, seq, op_name)
        padding = bb.emit_te(lambda bias_, idx: te.compute(
            (static_shape(bias)[0], 1, blocks, 1, width),
            lambda n, _h, t, _r, l: tirx.Select(bias_[n, 0, 0, idx[t, l]] > tirx.const(MASKED_BIAS, "float32"),
                                                 bias_[n, 0, 0, idx[t, l]], tirx.const(NEG, "float32")),
            name="padding_slots"), bias, index, primfunc_name_hint="padding_slots")
        additive = bb.emit(op.add(additive, padding))
    scores = bb.emit(op.add(scores, additive))
    out = bb.emit(op.matmul(softmax(bb, scores), values))
    if bias is not None:
        out = bb.emit(op.multiply(out, row_has_key(bb, additive)))
    out = bb.emit(op.reshape(out, (batch, heads, blocks * b, head_v)))
    if blocks * b != seq:
        out = bb.emit(op.strided_slice(out, axes=[2], begin=[0], end=[seq]))
    return out


def row_has_key(bb, additive):
    """1.0 for rows of the additive mask with at least one kept slot, else 0.0."""
    op = relax.op
    kept = bb.emit(op.astype(op.greater(additive, relax.const(np.float32(NEG / 2), "float32")), "float32"))
    return bb.emit(op.max(kept, axis=[-1], keepdims=True))


def dense_rows(bb, query, key, value, bias, scale: float, causal: bool):
    """TVM twin of ``emit_dense_rows`` (``query`` holds the first rows of the sequence)."""
    op = relax.op
    rows = static_shape(query)[2]
    cols = static_shape(key)[2]
    mask = causal_mask(rows, cols) if causal else None
    if bias is not None:
        padding = padding_or_neg(bb, bias)
        mask = padding if mask is None else bb.emit(op.add(mask, padding))
    key_t = bb.emit(op.permute_dims(key, [0, 1, 3, 2]))
    out = sdpa(bb, query, key_t, value, mask, scale)
    if bias is not None:
        out = bb.emit(op.multiply(out, row_has_key(bb, mask)))
    return out


def exact(bb, query, key, value, bias, scale: float, causal: bool):
    """TVM twin of ``emit_exact``: softmax(Q K^T scale + bias + causal) V."""
    op = relax.op
    if causal:
        mask = causal_mask(static_shape(query)[2], static_shape(key)[2])
        bias = mask if bias is None else bb.emit(op.add(bias, mask))
    key_t = bb.emit(op.permute_dims(key, [0, 1, 3, 2]))
    return sdpa(bb, query, key_t, value, bias, scale)


@lowering("BlockSparseAttention")
def block_sparse_attention(bb, inputs, attrs):
    query, key, value, bias = inputs
    scale, causal, block, local_blocks, global_blocks = BlockSparseAttention.settings(attrs)
    band = block_band(block, local_blocks, global_blocks, causal)

    def rule(qpos, kpos):
        qb, kb = qpos // block, kpos // block
        allowed = (np.abs(qb - kb) <= local_blocks) | (kb < global_blocks) | (qb < global_blocks)
        return allowed & (kpos <= qpos) if causal else allowed

    def approximate():
        out = band_attention(bb, query, key, value, bias, scale, band, rule, BlockSparseAttention.name)
        seq = static_shape(query)[2]
        rows = min(global_blocks * block, seq)
        if not rows:
            return out
        head_rows = bb.emit(relax.op.strided_slice(query, axes=[2], begin=[0], end=[rows]))
        dense = dense_rows(bb, head_rows, key, value, bias, scale, causal)
        if rows == seq:
            return dense
        rest = bb.emit(relax.op.strided_slice(out, axes=[2], begin=[rows], end=[seq]))
        return bb.emit(relax.op.concat([dense, rest], axis=2))

    return length_dispatch(query, int(attrs.get("exact_below", 0)),
                           lambda: exact(bb, query, key, value, bias, scale, causal), approximate)
