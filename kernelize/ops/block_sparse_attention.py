"""kernelize.BlockSparseAttention (BigBird-style, without random blocks), and the banded
block kernel it shares with kernelize.SlidingWindowAttention.

Rule (query position i, key position j, ``b = block``, ``qb = i // b``, ``kb = j // b``):
key j is attended iff ``|qb - kb| <= local_blocks`` or ``kb < global_blocks`` or
``qb < global_blocks`` (global blocks attend everything and are attended by everyone);
with ``causal`` additionally ``j <= i``.

The kernel (ONNX body and TVM lowering) never forms the S x S score matrix: the queries are
padded to a multiple of the block and reshaped to ``[B, H, nb, b, D]``; each query block
gathers only its own key slots (the global prefix, then the contiguous band of blocks around
it) and runs ``Q_block K_slots^T``, softmax and ``P V_slots`` over those slots alone. A fixed
additive mask drops slots outside the rule, outside ``[0, S)`` or repeating a prefix key. The
global query blocks take a dense row pass over all keys.

Shared conventions of the sparse attention operators (also SlidingWindowAttention, TopKAttention):

* self-attention only: the key length equals the query length;
* ``bias?`` is supported in the key-padding form ``[B or 1, 1, 1, S]`` (the banded kernels
  gather it per slot; another shape fails at run time in ONNX and at build time in TVM). A
  value ``<= -1e4`` drops the key; any other value is added to the score as-is;
* a query row that is left with no key (all its allowed keys padded) outputs 0;
* below ``exact_below`` query positions, exact softmax attention (plus the causal mask) runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from kernelize.ops.attention import emit_sdpa, exact_attention
from kernelize.ops.base import Operator, const, emit_length_dispatch

NEG = -1e30  # additive score of a dropped slot: finite, so no row turns NaN (empty rows are zeroed)
MASKED_BIAS = -1e4  # a bias value at or below this drops the key


# -- NumPy: references ----------------------------------------------------------------------
def masked_attention_reference(query, key, value, bias, scale: float, allowed: np.ndarray) -> np.ndarray:
    """Dense softmax attention over the keys ``allowed`` ([S, S] bool) permits, float64.

    Keys whose bias is ``<= MASKED_BIAS`` are dropped, other bias values are added; rows with
    no key left give 0. This is what the sparse kernels are checked against."""
    q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    keep = np.broadcast_to(allowed, scores.shape)
    if bias is not None:
        b = np.broadcast_to(np.asarray(bias, np.float64), scores.shape)
        keep = keep & (b > MASKED_BIAS)
        scores = scores + np.where(keep, b, 0.0)
    scores = np.where(keep, scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    e = np.where(keep, np.exp(scores - peak), 0.0)
    total = np.sum(e, axis=-1, keepdims=True)
    probs = e / np.where(total > 0, total, 1.0)
    return (probs @ v).astype(np.float32)


def exact_reference(query, key, value, bias, scale: float, causal: bool) -> np.ndarray:
    """Exact attention (the ``exact_below`` path): kernelize.Attention plus the causal mask."""
    return exact_attention(query, key, value, bias, scale=scale, causal=causal).astype(np.float32)


def block_sparse_allowed(seq: int, block: int, local_blocks: int, global_blocks: int, causal: bool) -> np.ndarray:
    """[seq, seq] bool: the BigBird rule of the module docstring."""
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    qb, kb = i // block, j // block
    allowed = (np.abs(qb - kb) <= local_blocks) | (kb < global_blocks) | (qb < global_blocks)
    return allowed & (j <= i) if causal else allowed


# -- the band of key slots of one query block ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class Band:
    """The key slots query block ``t`` gathers: slot ``l < prefix`` is key ``l`` (sinks /
    global keys, shared by every block), slot ``l >= prefix`` is key
    ``t * block - before + (l - prefix)`` (a contiguous band around the block)."""

    block: int
    prefix: int
    before: int
    length: int

    @property
    def width(self) -> int:
        return self.prefix + self.length

    def positions(self, blocks: int) -> np.ndarray:
        """[blocks, width] int64 key positions (may fall outside [0, S))."""
        starts = np.arange(blocks)[:, None] * self.block - self.before
        band = starts + np.arange(self.length)[None, :]
        prefix = np.broadcast_to(np.arange(self.prefix)[None, :], (blocks, self.prefix))
        return np.concatenate([prefix, band], axis=1).astype(np.int64)

    def valid(self, seq: int, rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """[nb, block, width] bool: slot kept for query ``t * block + r`` (NumPy twin of
        :func:`emit_band_attention`'s mask; used where shapes are static)."""
        blocks = -(-seq // self.block)
        kpos = self.positions(blocks)[:, None, :]
        qpos = np.arange(blocks * self.block).reshape(blocks, self.block, 1)
        slot = np.arange(self.width)[None, None, :]
        ok = (kpos >= 0) & (kpos < seq) & rule(qpos, kpos)
        return ok & ((slot < self.prefix) | (kpos >= self.prefix))


def band_cost(band: Band, shape: dict) -> float:
    """Multiply-adds of the banded kernel (Q K^T and P V over the gathered slots, padded
    query blocks included)."""
    b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_size"]
    blocks = -(-s // band.block)
    return 2.0 * b * h * blocks * band.block * band.width * d


# -- ONNX: standard-op kernels ------------------------------------------------------------
def _i64(tape, value):
    return const(tape, value, np.int64)


def _dim(tape, x, axis: int) -> ir.Value:
    """[1] int64: size of ``x`` along ``axis``."""
    return tape.op("Shape", [x], {"start": axis, "end": axis + 1})


def _scalar(tape, x):
    return tape.op("Squeeze", [x, _i64(tape, [0])])


def emit_band_attention(tape, query, key, value, bias, scale: float, band: Band,
                        rule: Callable[[ir.tape.Tape, ir.Value, ir.Value], ir.Value]) -> ir.Value:
    """The banded block kernel in standard ops (dynamic sequence length).

    ``rule(tape, qpos [nb, b, 1], kpos [nb, 1, L])`` (int64 positions) returns the bool
    tensor of allowed (query, key) pairs; range checks and prefix de-duplication are added
    here."""
    b = band.block
    seq1 = _dim(tape, query, 2)
    seq = _scalar(tape, seq1)
    blocks = tape.op("Div", [tape.op("Add", [seq, _i64(tape, b - 1)]), _i64(tape, b)])
    blocks1 = tape.op("Unsqueeze", [blocks, _i64(tape, [0])])
    padded = tape.op("Mul", [blocks, _i64(tape, b)])
    lead = tape.op("Shape", [query], {"start": 0, "end": 2})
    head = _dim(tape, query, 3)
    head_v = _dim(tape, value, 3)

    # queries: [B, H, nb, b, D]
    extra = tape.op("Unsqueeze", [tape.op("Sub", [padded, seq]), _i64(tape, [0])])
    pads = tape.op("Concat", [_i64(tape, [0] * 6), extra, _i64(tape, [0])], {"axis": 0})
    q_blocks = tape.op("Reshape", [tape.op("Pad", [query, pads]),
                                   tape.op("Concat", [lead, blocks1, _i64(tape, [b]), head], {"axis": 0})])

    # key slots: [nb, L] positions, clamped for the gathers
    starts = tape.op("Sub", [tape.op("Mul", [tape.op("Range", [_i64(tape, 0), blocks, _i64(tape, 1)]),
                                             _i64(tape, b)]), _i64(tape, band.before)])
    kpos = tape.op("Add", [tape.op("Unsqueeze", [starts, _i64(tape, [1])]),
                           _i64(tape, np.arange(band.length)[None, :])])
    if band.prefix:
        prefix = tape.op("Expand", [_i64(tape, np.arange(band.prefix)[None, :]),
                                    tape.op("Concat", [blocks1, _i64(tape, [band.prefix])], {"axis": 0})])
        kpos = tape.op("Concat", [prefix, kpos], {"axis": 1})
    last = tape.op("Sub", [seq, _i64(tape, 1)])
    index = tape.op("Max", [tape.op("Min", [kpos, last]), _i64(tape, 0)])

    # the mask: [nb, b, L] (+ padding: [Bb, 1, nb, b, L])
    qpos = tape.op("Reshape", [tape.op("Range", [_i64(tape, 0), padded, _i64(tape, 1)]), _i64(tape, [-1, b, 1])])
    kpos3 = tape.op("Unsqueeze", [kpos, _i64(tape, [1])])
    valid = tape.op("And", [tape.op("GreaterOrEqual", [kpos3, _i64(tape, 0)]), tape.op("Less", [kpos3, seq])])
    valid = tape.op("And", [valid, rule(tape, qpos, kpos3)])
    if band.prefix:
        slot = _i64(tape, np.arange(band.width)[None, None, :])
        fresh = tape.op("Or", [tape.op("Less", [slot, _i64(tape, band.prefix)]),
                               tape.op("GreaterOrEqual", [kpos3, _i64(tape, band.prefix)])])
        valid = tape.op("And", [valid, fresh])
    mask = tape.op("Where", [valid, const(tape, 0.0), const(tape, NEG)])
    if bias is not None:
        flat = tape.op("Reshape", [bias, tape.op("Concat", [_dim(tape, bias, 0), _i64(tape, [1]), seq1], {"axis": 0})])
        gathered = tape.op("Unsqueeze", [tape.op("Gather", [flat, index], {"axis": 2}), _i64(tape, [3])])
        mask = tape.op("Add", [mask, _bias_or_neg(tape, gathered)])

    key_t = tape.op("Transpose", [tape.op("Gather", [key, index], {"axis": 2})], {"perm": [0, 1, 2, 4, 3]})
    scores = tape.op("Mul", [tape.op("MatMul", [q_blocks, key_t]), const(tape, scale)])
    probs = tape.op("Softmax", [tape.op("Add", [scores, mask])], {"axis": -1})
    out = tape.op("MatMul", [probs, tape.op("Gather", [value, index], {"axis": 2})])
    if bias is not None:
        out = tape.op("Mul", [out, _row_has_key(tape, mask)])
    out = tape.op("Reshape", [out, tape.op("Concat", [lead, _i64(tape, [-1]), head_v], {"axis": 0})])
    return tape.op("Slice", [out, _i64(tape, [0]), seq1, _i64(tape, [2])])


def _bias_or_neg(tape, bias):
    """The bias where it keeps the key, NEG where it drops it (also turns -inf into NEG)."""
    return tape.op("Where", [tape.op("Greater", [bias, const(tape, MASKED_BIAS)]), bias, const(tape, NEG)])


def _row_has_key(tape, mask):
    """1.0 for rows of the additive ``mask`` with at least one kept slot, else 0.0."""
    kept = tape.op("Cast", [tape.op("Greater", [mask, const(tape, NEG / 2)])], {"to": ir.DataType.FLOAT})
    return tape.op("ReduceMax", [kept, _i64(tape, [-1])], {"keepdims": 1})


def causal_mask(tape, rows: ir.Value, cols: ir.Value) -> ir.Value:
    """[rows, cols] additive mask: 0 where key <= query, NEG elsewhere (``rows``/``cols``
    scalar int64)."""
    qpos = tape.op("Unsqueeze", [tape.op("Range", [_i64(tape, 0), rows, _i64(tape, 1)]), _i64(tape, [1])])
    kpos = tape.op("Range", [_i64(tape, 0), cols, _i64(tape, 1)])
    return tape.op("Where", [tape.op("LessOrEqual", [kpos, qpos]), const(tape, 0.0), const(tape, NEG)])


def emit_dense_rows(tape, query, key, value, bias, scale: float, causal: bool) -> ir.Value:
    """Softmax attention of ``query`` (the first rows of the sequence) over all keys, with
    the sparse operators' bias convention (used for global query blocks)."""
    rows = _scalar(tape, _dim(tape, query, 2))
    cols1 = _dim(tape, key, 2)
    mask = causal_mask(tape, rows, _scalar(tape, cols1)) if causal else None
    if bias is not None:
        flat = tape.op("Reshape", [bias, tape.op("Concat", [_dim(tape, bias, 0), _i64(tape, [1, 1]), cols1],
                                                 {"axis": 0})])
        padding = _bias_or_neg(tape, flat)
        mask = padding if mask is None else tape.op("Add", [mask, padding])
    out = emit_sdpa(tape, query, key, value, mask, scale)
    if bias is not None:
        out = tape.op("Mul", [out, _row_has_key(tape, mask)])
    return out


def emit_exact(tape, query, key, value, bias, scale: float, causal: bool) -> ir.Value:
    """Exact attention (the ``exact_below`` branch): softmax(Q K^T scale + bias + causal) V."""
    if causal:
        mask = causal_mask(tape, _scalar(tape, _dim(tape, query, 2)), _scalar(tape, _dim(tape, key, 2)))
        bias = mask if bias is None else tape.op("Add", [bias, mask])
    return emit_sdpa(tape, query, key, value, bias, scale)


# -- the operator -------------------------------------------------------------------------------
def block_band(block: int, local_blocks: int, global_blocks: int, causal: bool) -> Band:
    """The slots of a non-global query block: global key blocks, then the neighbour blocks
    (only the past ones and its own when causal)."""
    after = 0 if causal else local_blocks
    return Band(block=block, prefix=global_blocks * block, before=local_blocks * block,
                length=(local_blocks + 1 + after) * block)


def block_sparse_cost(attrs: dict, shape: dict) -> float:
    """Multiply-adds of the BlockSparseAttention kernel: the banded pass over all blocks plus
    the dense pass of the global query rows."""
    band = block_band(attrs["block"], attrs["local_blocks"], attrs["global_blocks"], bool(attrs["causal"]))
    global_rows = min(attrs["global_blocks"] * attrs["block"], shape["seq"])
    dense_rows = 2.0 * shape["batch"] * shape["heads"] * global_rows * shape["seq"] * shape["head_size"]
    return band_cost(band, shape) + dense_rows


class BlockSparseAttention(Operator):
    """BigBird-style block-sparse attention (local + global blocks, no random blocks); see
    the module docstring for the rule, the kernel and the bias convention. The cost is about
    ``(2 local_blocks + 1 + global_blocks) * block`` keys per query instead of S."""

    name = "BlockSparseAttention"
    inputs = ("query", "key", "value", "bias?")
    attributes = {"scale": float, "causal": int, "exact_below": int, "block": int, "local_blocks": int,
                  "global_blocks": int}

    def reference(self, query, key, value, bias=None, *, scale, causal=0, exact_below=0, block=64,
                  local_blocks=1, global_blocks=0):
        seq = query.shape[-2]
        if seq < exact_below:
            return exact_reference(query, key, value, bias, scale, bool(causal))
        allowed = block_sparse_allowed(seq, block, local_blocks, global_blocks, bool(causal))
        return masked_attention_reference(query, key, value, bias, scale, allowed)

    @staticmethod
    def settings(attrs):
        return (float(attrs["scale"]), bool(attrs.get("causal", 0)), int(attrs.get("block", 64)),
                int(attrs.get("local_blocks", 1)), int(attrs.get("global_blocks", 0)))

    def body(self, tape, inputs, attrs):
        query, key, value, bias = inputs
        scale, causal, block, local_blocks, global_blocks = self.settings(attrs)
        band = block_band(block, local_blocks, global_blocks, causal)

        def rule(t, qpos, kpos):
            qb = t.op("Div", [qpos, _i64(t, block)])
            kb = t.op("Div", [kpos, _i64(t, block)])  # kpos < 0 is dropped by the range check
            near = t.op("LessOrEqual", [t.op("Abs", [t.op("Sub", [qb, kb])]), _i64(t, local_blocks)])
            allowed = t.op("Or", [near, t.op("Less", [kb, _i64(t, global_blocks)])])
            allowed = t.op("Or", [allowed, t.op("Less", [qb, _i64(t, global_blocks)])])
            return t.op("And", [allowed, t.op("LessOrEqual", [kpos, qpos])]) if causal else allowed

        def approximate(t):
            out = emit_band_attention(t, query, key, value, bias, scale, band, rule)
            if not global_blocks:
                return out
            head_rows = t.op("Slice", [query, _i64(t, [0]), _i64(t, [global_blocks * block]), _i64(t, [2])])
            dense = emit_dense_rows(t, head_rows, key, value, bias, scale, causal)
            rest = t.op("Slice", [out, _i64(t, [global_blocks * block]), _i64(t, [2 ** 62]), _i64(t, [2])])
            return t.op("Concat", [dense, rest], {"axis": 2})

        exact = lambda t: emit_exact(t, query, key, value, bias, scale, causal)  # noqa: E731
        return [emit_length_dispatch(tape, query, int(attrs.get("exact_below", 0)), exact, approximate)]
