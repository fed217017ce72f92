"""kernelize.RPEAttention: kernelized attention with a Toeplitz relative-position bias, in
O(n log n) through the FFT (Luo et al. 2021, "Stable, Fast and Accurate: Kernelized Attention
with Relative Positional Encoding").

For one head, with features ``phi`` from :mod:`kernelize.ops.feature_maps` (applied to
``q sqrt(scale)`` and ``k sqrt(scale)``, the feature maps' convention) and the relative bias
vector ``c`` (``rel_bias[h]``, length ``2n - 1``; the bias of query i and key j is
``c[j - i + n - 1]``)::

    out_i = sum_j E[i, j] w_j phi(q_i).phi(k_j) v_j / sum_j E[i, j] w_j phi(q_i).phi(k_j)
    E[i, j] = exp(c[j - i + n - 1] - max(c))      (0 above the diagonal when ``causal``)

(``max(c)`` is taken over the offsets d <= 0 when ``causal``: MPT's and BLOOM's ALiBi vector
``m d`` peaks at a masked offset.) ``w_j`` comes from the optional key-padding ``bias`` ([batch or 1, 1, 1, n]): 0 where
``bias <= -1e4`` (masked), else ``exp(bias_j - max bias)`` (an additive per-key bias is exact
here, as a factor of the key). Other mask shapes are refused: a full [.., n, n] mask is not
Toeplitz; the pattern passes the causal part as the ``causal`` attribute.

E is Toeplitz, so ``sum_j E[i, j] x_j`` for one column x is a convolution: with ``N`` the
power of two >= 2n - 1, E is embedded in an N x N circulant and the product is
``IFFT(FFT(g) * FFT(x_padded))[:n]``. There is one such column for every pair (feature m,
value column e) plus one per feature for the normalizer: M (D + 1) convolutions per head.
Two real columns travel as the real and imaginary part of one complex column (the kernel g is
real, so they do not mix): M/2 (D + 1) complex transforms each way.

Numerics: ``exp(c)`` spans many orders of magnitude for ALiBi at long lengths (slope 0.5 at
n = 8192: exp(-4096)). Subtracting the per-head maximum of c makes every kernel entry <= 1
with the largest exactly 1, so nothing overflows; the constant factor cancels in the ratio.
An FFT convolution's error is relative to the whole signal, not to each output: a row whose
own sum is small next to the largest terms elsewhere (an edge row of a T5 bias whose maximum
offset it lacks; FAVOR+ key features, which span orders of magnitude, damped by ALiBi far
from the row) loses digits. So the transforms run in float64 (measured: float32 transforms
lost 2e-4 on causal ALiBi at n = 1024 in ONNX Runtime's DFT, 2e-3 with FAVOR+ features in
the TVM kernel; both pass 1e-5 in float64); inputs, features and the output stay float32.
The normalizer is clamped at 1e-30 (relu features can make it 0: the output is then 0).

Forms: ``reference`` is the direct O(n^2) computation (float64); ``body`` is standard ONNX
(``DFT`` op in double, a ``Loop`` over feature pairs so memory stays O(B H D N)); ``lower_tvm``
is two hand-written TIR kernels (the kernel's spectrum per head; then per (batch, head) task
in parallel, blocks of ``BLOCK_COLUMNS`` complex columns through a radix-2 FFT: decimation in
frequency forward, so the spectrum comes out bit-reversed, pointwise product with the
kernel's spectrum in the same order, decimation in time back, so no permutation pass is
needed; two radix-2 stages per pass over memory; columns innermost and vectorized; stages
on sub-FFTs of 2 ** ``LOCAL_LOG`` points run sub-block by sub-block, in cache). A block holds
either value columns of one feature pair (contiguous in v, contracted into contiguous
accumulator lanes) or the normalizer columns of up to ``BLOCK_COLUMNS`` pairs. The exact
branch in TVM runs in chunks of heads so its n x n intermediates fit in memory.
``decay = 1`` (set by the RPE methods where the pattern proved the bias is ALiBi and the
attention causal: ``c[d] = c[0] + m d`` on d <= 0, m >= 0; ``reference`` checks it) makes both
backends evaluate E[i, j] = exp(-m (i - j)) as a chunked decay instead of by FFT
(:func:`_emit_decay`, :func:`_lower_decay`: MatMuls over chunks of ``DECAY_CHUNK``
positions): the same operator with the same features, computed another way, O(n) up to a
small [A, A] carry. It is what makes ALiBi fast on ONNX Runtime, whose DFT kernel runs at
15-50 ns per point whatever the length (its FFT path is slower than exact attention at every
measured length). ``far_from = w`` (set where the pattern found the bias constant beyond
offset w on each side: T5's clamped buckets; ``reference`` checks it) takes another exact
route: chunks of b >= w positions, each query chunk with its three neighbouring key chunks at
the true Toeplitz weights, and the keys further away at the two constant far-field weights
through prefix and suffix sums of the chunk states (:func:`_emit_far_field`,
:func:`_lower_far_field`), O(n b). Any other Toeplitz bias takes the FFT.
Self-attention only (as many keys as queries): a Toeplitz bias is square.
``exact_below``: below that many query positions the exact softmax attention with the full
bias (Toeplitz + mask + causal) runs instead.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from kernelize.ops import feature_maps as fm
from kernelize.ops.base import Operator, const, emit_length_dispatch, lower_length_dispatch

MASKED = -1e4  # a key-padding bias at or below this drops the key
TINY = 1e-30  # floor of the normalizer
BLOCK_COLUMNS = 8  # complex columns per FFT block in the TVM kernel (two AVX2 vectors of float64)
FFT_DTYPE = "float64"  # of the TVM kernels' transforms (see the module docstring: precision)
EXACT_CHUNK_BYTES = 1 << 30  # n x n scores per chunk of heads in the exact TVM lowering
DECAY_CHUNK = 64  # positions per chunk of the decay form (ONNX body, ``decay = 1``)
LOCAL_LOG = 8  # stages on sub-FFTs of 2 ** LOCAL_LOG points run sub-block by sub-block (in cache)


def fft_length(n: int) -> int:
    """The power of two >= 2n - 1 the Toeplitz matrix is embedded in (at least 2)."""
    return max(2, 1 << max(0, (2 * n - 2)).bit_length())


def toeplitz(rel_bias: np.ndarray, n: int) -> np.ndarray:
    """T[h, i, j] = rel_bias[h, j - i + n - 1] ([H, n, n])."""
    index = np.arange(n)[None, :] - np.arange(n)[:, None] + n - 1
    return np.asarray(rel_bias)[:, index]


def key_weights(bias: np.ndarray | None, n: int) -> np.ndarray:
    """w_j of the key-padding bias ([B or 1, 1, 1, n] -> same shape), float64."""
    if bias is None:
        return np.ones((1, 1, 1, n))
    bias = np.asarray(bias, np.float64)
    if bias.ndim != 4 or bias.shape[1] != 1 or bias.shape[2] != 1 or bias.shape[3] != n:
        raise ValueError(f"RPEAttention takes only a key-padding bias [batch or 1, 1, 1, {n}], "
                         f"not {list(bias.shape)}")
    masked = bias <= MASKED
    top = np.max(np.where(masked, -np.inf, bias), axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.where(masked, 0.0, np.exp(np.minimum(bias - top, 0.0)))


def bias_peak(c: np.ndarray, n: int, causal) -> np.ndarray:
    """max of c over the offsets the attention sees ([H, 1]): only d <= 0 when causal (BLOOM's
    and MPT's ALiBi vector m d peaks at d = n - 1, a masked offset: subtracting that maximum
    would underflow every causal entry, exp(-m (n - 1)), at long lengths)."""
    c = np.asarray(c, np.float64)
    return np.max(c[:, :n] if causal else c, axis=-1, keepdims=True)


def decay_slopes(c: np.ndarray, n: int) -> np.ndarray:
    """m_h = c[h, n - 1] - c[h, n - 2] (0 when n = 1): the ALiBi slope of a decay-form bias."""
    c = np.asarray(c, np.float64)
    return c[:, n - 1] - c[:, max(n - 2, 0)]


def check_decay(c: np.ndarray, n: int, causal) -> None:
    """``decay = 1`` promises a causal bias ``c[d] = c[0] + m d`` on d <= 0 with m >= 0."""
    if not causal:
        raise ValueError("RPEAttention decay=1 is for causal attention only")
    c = np.asarray(c, np.float64)
    m = decay_slopes(c, n)
    offsets = np.arange(-(n - 1), 1)
    expected = c[:, n - 1:n] + m[:, None] * offsets[None, :]
    if np.any(m < 0) or not np.allclose(c[:, :n], expected, rtol=1e-5, atol=1e-5 * (1 + np.abs(expected).max())):
        raise ValueError("RPEAttention decay=1 needs c[d] = c[0] + m d (m >= 0) on the offsets d <= 0 (ALiBi)")


def check_far_field(c: np.ndarray, n: int, far_from: int) -> None:
    """``far_from = w`` promises c constant on each side beyond w: c[d] = c[-w] for d <= -w and
    c[d] = c[w] for d >= w (T5's buckets clamp at ``max_distance``)."""
    c = np.asarray(c, np.float64)
    if far_from < 1:
        raise ValueError("RPEAttention far_from must be >= 1 (0: no far-field promise)")
    if n > far_from and not (np.all(c[:, :n - far_from] == c[:, :1]) and np.all(c[:, n - 1 + far_from:] == c[:, -1:])):
        raise ValueError(f"RPEAttention far_from={far_from} needs rel_bias constant beyond offset {far_from} "
                         "on each side")


def band_chunk(far_from: int) -> int:
    """Positions per chunk of the far-field form: >= far_from, a multiple of 16."""
    return max(16, -(-far_from // 16) * 16)


def _softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


class RPEAttention(Operator):
    name = "RPEAttention"
    inputs = ("query", "key", "value", "rel_bias", "bias?", "feature_weight?", "feature_bias?")
    attributes = {"feature_map": str, "causal": int, "scale": float, "exact_below": int, "decay": int,
                  "far_from": int}

    # -- NumPy -------------------------------------------------------------------------
    def reference(self, query, key, value, rel_bias, bias=None, feature_weight=None, feature_bias=None, *,
                  feature_map, causal=0, scale, exact_below=0, decay=0, far_from=0):
        q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
        n = q.shape[-2]
        if k.shape[-2] != n:
            raise ValueError("RPEAttention needs as many keys as queries (a Toeplitz bias is square)")
        c = np.asarray(rel_bias, np.float64)
        if c.shape[-1] != 2 * n - 1:
            raise ValueError(f"rel_bias has {c.shape[-1]} offsets, expected 2n - 1 = {2 * n - 1}")
        tri = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
        if n < exact_below:
            scores = (q @ np.swapaxes(k, -1, -2)) * scale + toeplitz(c, n)
            if bias is not None:
                scores = scores + np.asarray(bias, np.float64)
            scores = np.where(tri, scores, -np.inf)
            return (_softmax(scores) @ v).astype(np.float32)
        root = math.sqrt(scale)
        phi_q = fm.reference(feature_map, q * root, "query", feature_weight, feature_bias)
        phi_k = fm.reference(feature_map, k * root, "key", feature_weight, feature_bias)
        if decay:
            check_decay(c, n, causal)
        if far_from:
            check_far_field(c, n, far_from)
        kernel = np.exp(np.where(tri, toeplitz(c - bias_peak(c, n, causal), n), -np.inf))
        weights = (phi_q @ np.swapaxes(phi_k, -1, -2)) * kernel * key_weights(bias, n)
        out = (weights @ v) / np.maximum(np.sum(weights, axis=-1, keepdims=True), TINY)
        return out.astype(np.float32)

    # -- ONNX --------------------------------------------------------------------------
    def body(self, tape, inputs, attrs):
        query, key, value, rel_bias, bias, weight, fbias = inputs
        scale, causal = float(attrs["scale"]), int(attrs.get("causal", 0))

        def exact(t):
            return _emit_exact(t, query, key, value, rel_bias, bias, scale, causal)

        def approximate(t):
            features = _emit_features(t, query, key, value, bias, weight, fbias, attrs["feature_map"], scale)
            if int(attrs.get("decay", 0)):
                return _emit_decay(t, *features, rel_bias, causal)
            if int(attrs.get("far_from", 0)):
                return _emit_far_field(t, *features, rel_bias, causal, int(attrs["far_from"]))
            return _emit_fft(t, *features, rel_bias, causal)

        return [emit_length_dispatch(tape, query, int(attrs.get("exact_below", 0)), exact, approximate)]

    # -- TVM ---------------------------------------------------------------------------
    def lower_tvm(self, bb, inputs, attrs):
        query, key, value, rel_bias, bias, weight, fbias = inputs
        scale, causal = float(attrs["scale"]), int(attrs.get("causal", 0))
        return lower_length_dispatch(
            query, int(attrs.get("exact_below", 0)),
            lambda: _lower_exact(bb, query, key, value, rel_bias, bias, scale, causal),
            lambda: _lower_approximate(bb, inputs, attrs, scale, causal))


def _lower_approximate(bb, inputs, attrs, scale, causal):
    """The kernelized computation in TVM: decay, far-field or FFT form (as in ``body``)."""
    query, key, value, rel_bias, bias, weight, fbias = inputs
    args = (bb, query, key, value, rel_bias, bias, weight, fbias, attrs["feature_map"], scale, causal)
    if int(attrs.get("decay", 0)):
        return _lower_decay(*args)
    if int(attrs.get("far_from", 0)):
        return _lower_far_field(*args, int(attrs["far_from"]))
    return _lower_fft(*args)


# -- ONNX helpers --------------------------------------------------------------------------
def _i64(tape, values):
    return const(tape, values, np.int64)


def _emit_length(tape, query):
    """n as an int64 1-D tensor [n]."""
    return tape.op("Shape", [query], {"start": -2, "end": -1})


def _emit_offsets(tape, n):
    """idx[i, j] = j - i + n - 1 ([n, n] int64) for a Gather of rel_bias."""
    scalar = tape.op("Squeeze", [n, _i64(tape, [0])])
    positions = tape.op("Range", [const(tape, 0, np.int64), scalar, const(tape, 1, np.int64)])
    column = tape.op("Unsqueeze", [positions, _i64(tape, [1])])
    row = tape.op("Unsqueeze", [positions, _i64(tape, [0])])
    return tape.op("Add", [tape.op("Sub", [row, column]), tape.op("Sub", [scalar, const(tape, 1, np.int64)])])


def _emit_exact(tape, query, key, value, rel_bias, bias, scale, causal):
    """softmax(Q K^T scale + T + bias (+ causal)) V with T gathered from rel_bias."""
    n = _emit_length(tape, query)
    offsets = _emit_offsets(tape, n)
    full = tape.op("Gather", [rel_bias, offsets], {"axis": 1})  # [H, n, n]
    key_t = tape.op("Transpose", [key], {"perm": [0, 1, 3, 2]})
    scores = tape.op("Add", [tape.op("Mul", [tape.op("MatMul", [query, key_t]), const(tape, scale)]), full])
    if bias is not None:
        scores = tape.op("Add", [scores, bias])
    if causal:
        above = tape.op("Greater", [offsets, tape.op("Sub", [tape.op("Squeeze", [n, _i64(tape, [0])]),
                                                             const(tape, 1, np.int64)])])
        scores = tape.op("Where", [above, const(tape, -np.inf), scores])
    return tape.op("MatMul", [tape.op("Softmax", [scores], {"axis": -1}), value])


def _emit_kernel_spectrum(tape, rel_bias, n, causal):
    """FFT of the circulant's first column g ([H, N, 2]) and N ([1] int64).

    g[s] = e[n - 1 - s] for 0 <= s < n, g[N + s] = e[n - 1 - s] for -n < s < 0 (0 when causal),
    with e = exp(c - max c): reversed e is r[k] = e[2n - 2 - k], so g = r[n - 1:] | 0 | r[:n - 1]."""
    seen = tape.op("Slice", [rel_bias, _i64(tape, [0]), n, _i64(tape, [1])]) if causal else rel_bias
    top = tape.op("ReduceMax", [seen, _i64(tape, [-1])], {"keepdims": 1})  # see bias_peak
    e = tape.op("Exp", [tape.op("Sub", [rel_bias, top])])
    reversed_e = tape.op("Slice", [e, _i64(tape, [-1]), _i64(tape, [-(2 ** 62)]), _i64(tape, [-1]), _i64(tape, [-1])])
    n_minus_1 = tape.op("Sub", [n, _i64(tape, [1])])
    two_n_minus_1 = tape.op("Sub", [tape.op("Add", [n, n]), _i64(tape, [1])])
    # N = 2 ** ceil(log2(2n - 1)), at least 2 (double precision keeps odd 2n - 1 off the powers)
    exponent = tape.op("Ceil", [tape.op("Div", [tape.op("Log", [tape.op("Cast", [two_n_minus_1], {"to": 11})]),
                                                const(tape, math.log(2.0), np.float64)])])
    length = tape.op("Cast", [tape.op("Pow", [const(tape, [2.0], np.float64), exponent])], {"to": 7})
    length = tape.op("Max", [length, _i64(tape, [2])])
    head = tape.op("Slice", [reversed_e, n_minus_1, two_n_minus_1, _i64(tape, [1])])  # e[n-1], ..., e[0]
    heads = tape.op("Shape", [rel_bias], {"start": 0, "end": 1})
    gap = tape.op("Sub", [length, two_n_minus_1])
    if causal:
        gap = tape.op("Add", [gap, n_minus_1])
        zeros = tape.op("ConstantOfShape", [tape.op("Concat", [heads, gap], {"axis": 0})],
                        {"value": ir.tensor(np.zeros(1, np.float32))})
        g = tape.op("Concat", [head, zeros], {"axis": 1})
    else:
        tail = tape.op("Slice", [reversed_e, _i64(tape, [0]), n_minus_1, _i64(tape, [1])])  # e[2n-2], ..., e[n]
        zeros = tape.op("ConstantOfShape", [tape.op("Concat", [heads, gap], {"axis": 0})],
                        {"value": ir.tensor(np.zeros(1, np.float32))})
        g = tape.op("Concat", [head, zeros, tail], {"axis": 1})
    g = tape.op("Unsqueeze", [tape.op("Cast", [g], {"to": 11}), _i64(tape, [-1])])  # [H, N, 1] real, double
    spectrum = tape.op("DFT", [g, None, const(tape, 1, np.int64)])  # [H, N, 2]
    return spectrum, length


def _emit_features(tape, query, key, value, bias, weight, fbias, kind, scale):
    """(phi(q), phi(k) w, [v | 1], n): the query and key features, the keys weighted by the
    key-padding mask, the value with a ones column for the normalizer, and n ([1] int64)."""
    root = const(tape, math.sqrt(scale))
    phi_q = fm.emit_onnx(tape, kind, tape.op("Mul", [query, root]), "query", weight, fbias)
    phi_k = fm.emit_onnx(tape, kind, tape.op("Mul", [key, root]), "key", weight, fbias)
    n = _emit_length(tape, query)
    if bias is not None:  # key weights w_j, [B or 1, 1, n, 1] against phi_k's key axis
        masked = tape.op("LessOrEqual", [bias, const(tape, MASKED)])
        kept = tape.op("Where", [masked, const(tape, -np.inf), bias])
        top = tape.op("ReduceMax", [kept, _i64(tape, [-1])], {"keepdims": 1})
        top = tape.op("Where", [tape.op("IsInf", [top]), const(tape, 0.0), top])
        w = tape.op("Exp", [tape.op("Min", [tape.op("Sub", [bias, top]), const(tape, 0.0)])])
        w = tape.op("Where", [masked, const(tape, 0.0), w])
        phi_k = tape.op("Mul", [phi_k, tape.op("Transpose", [w], {"perm": [0, 1, 3, 2]})])
    ones_shape = tape.op("Concat", [tape.op("Shape", [value], {"start": 0, "end": 3}), _i64(tape, [1])],
                         {"axis": 0})
    ones = tape.op("ConstantOfShape", [ones_shape], {"value": ir.tensor(np.ones(1, np.float32))})
    value_1 = tape.op("Concat", [value, ones], {"axis": -1})  # [B, H, n, E = D + 1]
    return phi_q, phi_k, value_1, n


def _emit_ratio(tape, acc):
    """numerator / max(normalizer, TINY) of the accumulator [.., E] (normalizer last)."""
    numerator = tape.op("Slice", [acc, _i64(tape, [0]), _i64(tape, [-1]), _i64(tape, [-1])])
    denominator = tape.op("Slice", [acc, _i64(tape, [-1]), _i64(tape, [2 ** 62]), _i64(tape, [-1])])
    return tape.op("Div", [numerator, tape.op("Max", [denominator, const(tape, TINY)])])


def _emit_fft(tape, phi_q, phi_k, value_1, n, rel_bias, causal):
    # an even feature count: features m and m + M/2 share one complex column
    features = tape.op("Shape", [phi_q], {"start": -1})
    odd = tape.op("Mod", [features, _i64(tape, [2])])
    pads = tape.op("Concat", [_i64(tape, [0] * 7), odd], {"axis": 0})
    phi_q = tape.op("Pad", [phi_q, pads])
    phi_k = tape.op("Pad", [phi_k, pads])
    pairs = tape.op("Div", [tape.op("Add", [features, odd]), _i64(tape, [2])])
    spectrum, length = _emit_kernel_spectrum(tape, rel_bias, n, causal)
    spectrum = tape.op("Unsqueeze", [spectrum, _i64(tape, [0, 2])])  # [1, H, 1, N, 2]
    g_re = tape.op("Gather", [spectrum, const(tape, 0, np.int64)], {"axis": -1})
    g_im = tape.op("Gather", [spectrum, const(tape, 1, np.int64)], {"axis": -1})
    acc0 = tape.op("ConstantOfShape", [tape.op("Shape", [value_1])], {"value": ir.tensor(np.zeros(1, np.float32))})

    # the loop body: one pair of features per iteration, accumulated into [B, H, n, E]
    iteration = ir.Value(name="rpe_pair", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond_in = ir.Value(name="rpe_cond_in", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    acc_in = ir.Value(name="rpe_acc_in", type=ir.TensorType(ir.DataType.FLOAT))
    sub = ir.tape.Tape()
    second = sub.op("Add", [iteration, tape.op("Squeeze", [pairs, _i64(tape, [0])])])

    def column(features_value, index):
        return sub.op("Unsqueeze", [sub.op("Gather", [features_value, index], {"axis": -1}), _i64(sub, [-1])])

    k_re = sub.op("Mul", [column(phi_k, iteration), value_1])  # [B, H, n, E]
    k_im = sub.op("Mul", [column(phi_k, second), value_1])
    x = sub.op("Concat", [sub.op("Unsqueeze", [k_re, _i64(sub, [-1])]),
                          sub.op("Unsqueeze", [k_im, _i64(sub, [-1])])], {"axis": -1})
    x = sub.op("Transpose", [sub.op("Cast", [x], {"to": 11})], {"perm": [0, 1, 3, 2, 4]})  # [B, H, E, n, 2]
    length_scalar = sub.op("Squeeze", [length, _i64(sub, [0])])
    xf = sub.op("DFT", [x, length_scalar, const(sub, -2, np.int64)])  # [B, H, E, N, 2]
    x_re = sub.op("Gather", [xf, const(sub, 0, np.int64)], {"axis": -1})
    x_im = sub.op("Gather", [xf, const(sub, 1, np.int64)], {"axis": -1})
    y_re = sub.op("Sub", [sub.op("Mul", [x_re, g_re]), sub.op("Mul", [x_im, g_im])])
    y_im = sub.op("Add", [sub.op("Mul", [x_re, g_im]), sub.op("Mul", [x_im, g_re])])
    y = sub.op("Concat", [sub.op("Unsqueeze", [y_re, _i64(sub, [-1])]),
                          sub.op("Unsqueeze", [y_im, _i64(sub, [-1])])], {"axis": -1})
    y = sub.op("DFT", [y, None, const(sub, -2, np.int64)], {"inverse": 1})
    y = sub.op("Slice", [y, _i64(sub, [0]), n, _i64(sub, [3])])  # [B, H, E, n, 2]
    y = sub.op("Transpose", [sub.op("Cast", [y], {"to": 1})], {"perm": [0, 1, 3, 2, 4]})  # [B, H, n, E, 2]
    q_pair = sub.op("Concat", [column(phi_q, iteration), column(phi_q, second)], {"axis": -1})  # [B, H, n, 2]
    q_pair = sub.op("Unsqueeze", [q_pair, _i64(sub, [3])])
    contribution = sub.op("ReduceSum", [sub.op("Mul", [y, q_pair]), _i64(sub, [-1])], {"keepdims": 0})
    acc_out = sub.op("Add", [acc_in, contribution])
    cond_out = sub.op("Identity", [cond_in])
    for i, node in enumerate(sub.nodes):  # unique names in the loop's scope
        for j, out in enumerate(node.outputs):
            out.name = f"rpe_loop_{i}_{j}"
    loop_body = ir.Graph([iteration, cond_in, acc_in], [cond_out, acc_out], nodes=sub.nodes, name="rpe_pairs")
    acc = tape.op("Loop", [tape.op("Squeeze", [pairs, _i64(tape, [0])]), None, acc0], {"body": loop_body})
    return _emit_ratio(tape, acc)


def _emit_decay(tape, phi_q, phi_k, value_1, n, rel_bias, causal):
    """The decay form (``decay = 1``, causal, c[d] = c[0] + m d on d <= 0): E[i, j] =
    exp(-m (i - j)) for j <= i, evaluated in chunks of ``DECAY_CHUNK`` positions.

    Inside a chunk: (phi(q) phi(k)^T o D) [v | 1] with D[i', j'] = exp(-m (i' - j')), j' <= i'.
    Across chunks (query chunk a, key chunk a' < a): i - j = i' + (b - j') + b (a - a' - 1), so
    the chunk a' contributes P[a'] = (phi(k) o u)^T [v | 1] with u[j'] = exp(-m (b - j')), the
    states S = L P with L[a, a'] = exp(-m b (a - a' - 1)) (a' < a; an [A, A] matrix per head,
    A = ceil(n / b)), and the query reads (phi(q) o r) S[a] with r[i'] = exp(-m i'). Every
    factor is <= 1 (the diagonal's is 1), so nothing overflows; far chunks underflow to 0."""
    if not causal:
        raise ValueError("RPEAttention decay=1 is for causal attention only")
    b = DECAY_CHUNK
    index = tape.op("Squeeze", [n, _i64(tape, [0])])
    last = tape.op("Sub", [index, const(tape, 1, np.int64)])
    before = tape.op("Max", [tape.op("Sub", [index, const(tape, 2, np.int64)]), const(tape, 0, np.int64)])
    slope = tape.op("Sub", [tape.op("Gather", [rel_bias, last], {"axis": 1}),
                            tape.op("Gather", [rel_bias, before], {"axis": 1})])  # [H]
    positions = tape.op("Cast", [tape.op("Range", [const(tape, 0, np.int64), const(tape, b, np.int64),
                                                   const(tape, 1, np.int64)])], {"to": 1})  # [b]
    distance = tape.op("Sub", [tape.op("Unsqueeze", [positions, _i64(tape, [1])]),
                               tape.op("Unsqueeze", [positions, _i64(tape, [0])])])  # [b, b]: i' - j'

    def decay(x, rank):  # exp(-m x) for x >= 0 of ``rank`` dimensions -> [H, *x.shape]
        m = tape.op("Reshape", [slope, _i64(tape, [-1] + [1] * rank)])
        return tape.op("Exp", [tape.op("Neg", [tape.op("Mul", [m, x])])])

    inside = tape.op("Where", [tape.op("GreaterOrEqual", [distance, const(tape, 0.0)]),
                               decay(tape.op("Relu", [distance]), 2), const(tape, 0.0)])  # [H, b, b]
    query_decay = tape.op("Unsqueeze", [decay(positions, 1), _i64(tape, [-1])])  # [H, b, 1]: r
    key_decay = tape.op("Unsqueeze", [decay(tape.op("Sub", [const(tape, float(b)), positions]), 1), _i64(tape, [-1])])

    q, k, v = _emit_blocks(tape, [phi_q, phi_k, value_1], n, b)
    swap_last = [0, 1, 2, 4, 3]
    scores = tape.op("Mul", [tape.op("MatMul", [q, tape.op("Transpose", [k], {"perm": swap_last})]),
                             tape.op("Unsqueeze", [inside, _i64(tape, [0, 2])])])  # [B, H, A, b, b]
    acc = tape.op("MatMul", [scores, v])  # [B, H, A, b, E]
    states = tape.op("MatMul", [tape.op("Transpose", [tape.op("Mul", [k, tape.op("Unsqueeze", [
        key_decay, _i64(tape, [0, 2])])])], {"perm": swap_last}), v])  # [B, H, A, M, E]: P
    flat = _i64(tape, [0, 0, 0, -1])
    chunk_index = tape.op("Cast", [tape.op("Range", [const(tape, 0, np.int64), tape.op("Squeeze", [
        _chunk_count(tape, q), _i64(tape, [0])]), const(tape, 1, np.int64)])], {"to": 1})  # [A]
    gap = tape.op("Sub", [tape.op("Sub", [tape.op("Unsqueeze", [chunk_index, _i64(tape, [1])]),
                                          tape.op("Unsqueeze", [chunk_index, _i64(tape, [0])])]),
                          const(tape, 1.0)])  # [A, A]: a - a' - 1
    across = tape.op("Where", [tape.op("GreaterOrEqual", [gap, const(tape, 0.0)]),
                               decay(tape.op("Mul", [tape.op("Relu", [gap]), const(tape, float(b))]), 2),
                               const(tape, 0.0)])  # [H, A, A]: L
    carried = tape.op("MatMul", [tape.op("Unsqueeze", [across, _i64(tape, [0])]),
                                 tape.op("Reshape", [states, flat])])  # [B, H, A, M E]: S
    carried = tape.op("Reshape", [carried, tape.op("Shape", [states])])
    read = tape.op("Mul", [q, tape.op("Unsqueeze", [query_decay, _i64(tape, [0, 2])])])
    return _emit_chunked_ratio(tape, tape.op("Add", [acc, tape.op("MatMul", [read, carried])]), n)


def _emit_far_field(tape, phi_q, phi_k, value_1, n, rel_bias, causal, far_from):
    """The far-field form (``far_from = w``: c constant beyond offset w on each side), in chunks
    of b = :func:`band_chunk` (w) >= w positions.

    Keys within w of a query lie in its own chunk or a neighbour: each query chunk takes the
    three chunks around it with the true weights E[i, j] = exp(c[j - i] - peak) (an [b, 3b]
    block per chunk; the same Toeplitz values, gathered once). Keys further away, in chunks
    <= a - 2 and >= a + 2, all have the weight e_L = exp(c[-(n-1)] - peak), resp. e_R =
    exp(c[n-1] - peak): exclusive prefix and suffix sums of the chunk states phi(k)^T [v | 1].
    O(n b (M + D)) plus O(n M D)."""
    b = band_chunk(far_from)
    index = tape.op("Squeeze", [n, _i64(tape, [0])])
    seen = tape.op("Slice", [rel_bias, _i64(tape, [0]), n, _i64(tape, [1])]) if causal else rel_bias
    peak = tape.op("ReduceMax", [seen, _i64(tape, [-1])], {"keepdims": 1})  # [H, 1]
    # the [b, 3b] block of weights: key slot s of the neighbourhood, offset d = s - b - i'
    slots = tape.op("Range", [const(tape, 0, np.int64), const(tape, 3 * b, np.int64), const(tape, 1, np.int64)])
    rows = tape.op("Range", [const(tape, 0, np.int64), const(tape, b, np.int64), const(tape, 1, np.int64)])
    offset = tape.op("Sub", [tape.op("Sub", [tape.op("Unsqueeze", [slots, _i64(tape, [0])]), const(tape, b, np.int64)]),
                             tape.op("Unsqueeze", [rows, _i64(tape, [1])])])  # [b, 3b]
    last = tape.op("Sub", [tape.op("Add", [index, index]), const(tape, 2, np.int64)])  # 2n - 2
    position = tape.op("Min", [tape.op("Max", [tape.op("Add", [offset, tape.op("Sub", [
        index, const(tape, 1, np.int64)])]), const(tape, 0, np.int64)]), last])  # clamped: such keys are padding
    near = tape.op("Exp", [tape.op("Sub", [tape.op("Gather", [rel_bias, position], {"axis": 1}),
                                            tape.op("Unsqueeze", [peak, _i64(tape, [-1])])])])  # [H, b, 3b]
    if causal:
        near = tape.op("Where", [tape.op("Greater", [offset, const(tape, 0, np.int64)]), const(tape, 0.0), near])
    far_left = tape.op("Exp", [tape.op("Sub", [tape.op("Slice", [rel_bias, _i64(tape, [0]), _i64(tape, [1]),
                                                                 _i64(tape, [1])]), peak])])  # [H, 1]
    far_right = tape.op("Exp", [tape.op("Sub", [tape.op("Slice", [rel_bias, _i64(tape, [-1]), _i64(tape, [2 ** 62]),
                                                                  _i64(tape, [1])]), peak])])

    def neighbourhood(x):  # [B, H, A, b, X] -> [B, H, A, 3b, X]: chunks a - 1, a, a + 1 (zeros past the ends)
        padded = tape.op("Pad", [x, _i64(tape, [0, 0, 1, 0, 0, 0, 0, 1, 0, 0])])
        count = _chunk_count(tape, x)
        parts = [tape.op("Slice", [padded, _i64(tape, [s]), tape.op("Add", [count, _i64(tape, [s])]), _i64(tape, [2])])
                 for s in range(3)]
        return tape.op("Concat", parts, {"axis": 3})

    q, k, v = _emit_blocks(tape, [phi_q, phi_k, value_1], n, b)
    swap_last = [0, 1, 2, 4, 3]
    scores = tape.op("MatMul", [q, tape.op("Transpose", [neighbourhood(k)], {"perm": swap_last})])  # [B, H, A, b, 3b]
    scores = tape.op("Mul", [scores, tape.op("Unsqueeze", [near, _i64(tape, [0, 2])])])
    acc = tape.op("MatMul", [scores, neighbourhood(v)])  # [B, H, A, b, E]
    states = tape.op("MatMul", [tape.op("Transpose", [k], {"perm": swap_last}), v])  # [B, H, A, M, E]
    # sum over chunks <= a - 2: exclusive prefix sums moved one chunk on (zeros in front)
    before = tape.op("CumSum", [states, const(tape, 2, np.int64)], {"exclusive": 1})
    before = tape.op("Slice", [tape.op("Pad", [before, _i64(tape, [0, 0, 1, 0, 0, 0, 0, 0, 0, 0])]),
                               _i64(tape, [0]), _chunk_count(tape, states), _i64(tape, [2])])
    scale_left = tape.op("Reshape", [far_left, _i64(tape, [1, -1, 1, 1, 1])])
    far = tape.op("Mul", [before, scale_left])
    if not causal:
        after = tape.op("CumSum", [states, const(tape, 2, np.int64)], {"exclusive": 1, "reverse": 1})
        after = tape.op("Slice", [tape.op("Pad", [after, _i64(tape, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0])]),
                                  _i64(tape, [1]), tape.op("Add", [_chunk_count(tape, states), _i64(tape, [1])]),
                                  _i64(tape, [2])])
        far = tape.op("Add", [far, tape.op("Mul", [after, tape.op("Reshape", [far_right, _i64(tape, [1, -1, 1, 1, 1])])])])
    return _emit_chunked_ratio(tape, tape.op("Add", [acc, tape.op("MatMul", [q, far])]), n)


def _chunk_count(tape, x):
    """The chunk count A of [B, H, A, ...] as a [1] int64 tensor."""
    return tape.op("Shape", [x], {"start": 2, "end": 3})


def _emit_blocks(tape, xs, n, b: int):
    """Each [B, H, n, X] of ``xs`` as [B, H, A, b, X], zero-padded to A = ceil(n / b) chunks."""
    chunks = tape.op("Div", [tape.op("Add", [n, _i64(tape, [b - 1])]), _i64(tape, [b])])
    pad = tape.op("Sub", [tape.op("Mul", [chunks, _i64(tape, [b])]), n])
    pads = tape.op("Concat", [_i64(tape, [0] * 6), pad, _i64(tape, [0])], {"axis": 0})
    blocked = []
    for x in xs:
        shape = tape.op("Concat", [_i64(tape, [0, 0, -1, b]), tape.op("Shape", [x], {"start": -1})], {"axis": 0})
        blocked.append(tape.op("Reshape", [tape.op("Pad", [x, pads]), shape]))
    return blocked


def _emit_chunked_ratio(tape, acc, n):
    """:func:`_emit_ratio` of chunked accumulators [B, H, A, b, E] over the first n positions."""
    shape = tape.op("Concat", [_i64(tape, [0, 0, -1]), tape.op("Shape", [acc], {"start": -1})], {"axis": 0})
    return _emit_ratio(tape, tape.op("Slice", [tape.op("Reshape", [acc, shape]), _i64(tape, [0]), n, _i64(tape, [2])]))


# -- TVM helpers ---------------------------------------------------------------------------
def _shape(expr) -> list[int]:
    """Static shape of a Relax expression (``ty`` in TVM 0.27, ``struct_info`` before)."""
    info = expr.ty if hasattr(expr, "ty") else expr.struct_info
    return [int(d) for d in info.shape]


def _twiddles(length: int, dtype: str = "float32"):
    """exp(-2 pi i k / N) for k < N / 2, computed in float64, stored as ``dtype``."""
    angle = -2.0 * np.pi * np.arange(max(length // 2, 1)) / length
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def _lower_exact(bb, query, key, value, rel_bias, bias, scale, causal):
    """softmax(Q K^T scale + T + bias (+ causal)) V. The Toeplitz bias, mask and causal part are
    added inside the softmax's TE function (never materialized as [H, n, n] tensors of their
    own), and long inputs run in chunks of heads (``EXACT_CHUNK_BYTES`` of scores per chunk):
    at n = 8192, h = 12 the unchunked n x n intermediates need more than this machine's 23 GB."""
    from tvm import relax, te, topi

    op = relax.op
    batch, heads, n, _ = _shape(query)
    chunk = max(1, min(heads, EXACT_CHUNK_BYTES // (4 * batch * n * n)))
    if chunk < heads:
        parts = []
        for h0 in range(0, heads, chunk):
            h1 = min(heads, h0 + chunk)

            def rows(x, axis=1):
                return bb.emit(op.strided_slice(x, axes=[axis], begin=[h0], end=[h1]))

            parts.append(_lower_exact(bb, rows(query), rows(key), rows(value), rows(rel_bias, 0), bias, scale,
                                      causal))
        return bb.emit(op.concat(parts, axis=1))
    scaled = bb.emit(op.multiply(query, relax.const(np.float32(scale), "float32")))
    scores = bb.emit(op.matmul(scaled, bb.emit(op.permute_dims(key, [0, 1, 3, 2]))))

    def biased_softmax(s, c, *mask):
        def logit(b, h, i, j):
            value_ = s[b, h, i, j] + c[h, j - i + n - 1]
            if mask:
                value_ = value_ + mask[0][b % mask[0].shape[0], 0, 0, j]
            if causal:
                value_ = te.if_then_else(j > i, np.float32(-1e30), value_)
            return value_

        k = te.reduce_axis((0, n), "k")
        peak = te.compute((batch, heads, n), lambda b, h, i: te.max(logit(b, h, i, k), axis=k), name="rpe_max")
        e = topi.fast_exp(te.compute(s.shape, lambda b, h, i, j: logit(b, h, i, j) - peak[b, h, i],
                                     name="rpe_shift"))
        k2 = te.reduce_axis((0, n), "k2")
        total = te.compute((batch, heads, n), lambda b, h, i: te.sum(e[b, h, i, k2], axis=k2), name="rpe_sum")
        return te.compute(s.shape, lambda b, h, i, j: e[b, h, i, j] / total[b, h, i], name="rpe_probs")

    if bias is not None:
        bshape = _shape(bias)
        if len(bshape) != 4 or bshape[1] != 1 or bshape[2] != 1:
            # a general mask: added as a tensor (the FFT path refuses it anyway)
            probs = bb.emit_te(lambda s, c: biased_softmax(s, c), bb.emit(op.add(scores, bias)), rel_bias,
                               primfunc_name_hint="rpe_exact_softmax")
        else:
            probs = bb.emit_te(biased_softmax, scores, rel_bias, bias, primfunc_name_hint="rpe_exact_softmax")
    else:
        probs = bb.emit_te(biased_softmax, scores, rel_bias, primfunc_name_hint="rpe_exact_softmax")
    return bb.emit(op.matmul(probs, value))


def _lower_key_weights(bb, bias, n: int):
    """w_j of the key-padding ``bias`` as [B or 1, n] (ones without a mask)."""
    from tvm import relax, te

    if bias is None:
        return bb.emit(relax.const(np.ones((1, n), np.float32)))
    bshape = _shape(bias)
    if len(bshape) != 4 or bshape[1] != 1 or bshape[2] != 1:
        raise ValueError(f"RPEAttention takes only a key-padding bias [batch or 1, 1, 1, n], not {bshape}")

    def key_weight(b):
        j = te.reduce_axis((0, n), "j")
        kept = lambda r, jj: te.if_then_else(b[r, 0, 0, jj] <= np.float32(MASKED), np.float32(-3e38),  # noqa: E731
                                              b[r, 0, 0, jj])
        top = te.compute((bshape[0],), lambda r: te.max(kept(r, j), axis=j), name="rpe_key_top")
        return te.compute(
            (bshape[0], n),
            lambda r, jj: te.if_then_else(b[r, 0, 0, jj] <= np.float32(MASKED), np.float32(0.0),
                                          te.exp(te.min(b[r, 0, 0, jj] - top[r], np.float32(0.0)))),
            name="rpe_key_weight")

    return bb.emit_te(key_weight, bias, primfunc_name_hint="rpe_key_weight")


def _lower_features(bb, query, key, value, bias, weight, fbias, kind, scale):
    """(phi(q), phi(k) w, [v | 1 | 0 ...]) for the chunked forms; the value's width padded to
    a multiple of 16 so that every product vectorizes (65 columns left them scalar: 451 vs 95
    ms for the decay form at n = 8192)."""
    from tvm import relax

    op = relax.op
    root = relax.const(np.float32(math.sqrt(scale)), "float32")
    phi_q = fm.lower_tvm(bb, kind, bb.emit(op.multiply(query, root)), "query", weight, fbias)
    phi_k = fm.lower_tvm(bb, kind, bb.emit(op.multiply(key, root)), "key", weight, fbias)
    batch, heads, n, head_size = _shape(value)
    weights = _lower_key_weights(bb, bias, n)
    phi_k = bb.emit(op.multiply(phi_k, op.reshape(weights, [_shape(weights)[0], 1, n, 1])))
    width = -(-(head_size + 1) // 16) * 16
    extra = np.zeros((batch, heads, n, width - head_size), np.float32)
    extra[..., 0] = 1.0
    return phi_q, phi_k, bb.emit(op.concat([value, relax.const(extra)], axis=-1))


def _lower_blocks(bb, x, chunk: int):
    """[B, H, n, X] -> [B, H, A, chunk, X], zero-padded."""
    from tvm import relax

    batch, heads, n, width = _shape(x)
    chunks = -(-n // chunk)
    if chunks * chunk != n:
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, chunks * chunk - n, 0, 0]))
    return bb.emit(relax.op.reshape(x, [batch, heads, chunks, chunk, width]))


def _lower_ratio(bb, acc, n: int, head_size: int):
    """[B, H, A, b, E] accumulators -> numerator / max(normalizer, TINY) over the first n positions."""
    from tvm import relax

    op = relax.op
    batch, heads, chunks, b, width = _shape(acc)
    acc = bb.emit(op.reshape(acc, [batch, heads, chunks * b, width]))
    numerator = bb.emit(op.strided_slice(acc, axes=[2, 3], begin=[0, 0], end=[n, head_size]))
    denominator = bb.emit(op.strided_slice(acc, axes=[2, 3], begin=[0, head_size], end=[n, head_size + 1]))
    return bb.emit(op.divide(numerator, op.maximum(denominator, relax.const(np.float32(TINY), "float32"))))


def _lower_decay(bb, query, key, value, rel_bias, bias, weight, fbias, kind, scale, causal):
    """The decay form (``decay = 1``) in Relax: the same chunked computation as
    :func:`_emit_decay`, with the decay factors computed from ``rel_bias`` by small TE kernels."""
    from tvm import relax, te

    if not causal:
        raise ValueError("RPEAttention decay=1 is for causal attention only")
    op = relax.op
    phi_q, phi_k, value_1 = _lower_features(bb, query, key, value, bias, weight, fbias, kind, scale)
    batch, heads, n, head_size = _shape(value)
    features, width = _shape(phi_q)[-1], _shape(value_1)[-1]
    b = DECAY_CHUNK
    chunks = -(-n // b)

    def factors(c):
        """(inside [H, b, b], query decay [H, b, 1], key decay [H, b, 1], across [H, A, A])."""
        slope = te.compute((heads,), lambda h: c[h, n - 1] - c[h, max(n - 2, 0)], name="rpe_slope")
        inside = te.compute((heads, b, b), lambda h, i, j: te.if_then_else(
            i >= j, te.exp(-slope[h] * (i - j).astype("float32")), np.float32(0)), name="rpe_inside")
        query_decay = te.compute((heads, b, 1), lambda h, i, _: te.exp(-slope[h] * i.astype("float32")),
                                 name="rpe_query_decay")
        key_decay = te.compute((heads, b, 1), lambda h, j, _: te.exp(-slope[h] * (b - j).astype("float32")),
                               name="rpe_key_decay")
        across = te.compute((heads, chunks, chunks), lambda h, a, a2: te.if_then_else(
            a > a2, te.exp(-slope[h] * np.float32(b) * (a - a2 - 1).astype("float32")), np.float32(0)),
            name="rpe_across")
        return [inside, query_decay, key_decay, across]

    made = bb.emit_te(factors, rel_bias, primfunc_name_hint="rpe_decay_factors")
    inside, query_decay, key_decay, across = (bb.emit(relax.TupleGetItem(made, i)) for i in range(4))
    q, k, v = (_lower_blocks(bb, x, b) for x in (phi_q, phi_k, value_1))
    swap_last = [0, 1, 2, 4, 3]
    scores = bb.emit(op.multiply(op.matmul(q, op.permute_dims(k, swap_last)), op.reshape(inside, [1, heads, 1, b, b])))
    acc = bb.emit(op.matmul(scores, v))  # [B, H, A, b, E]
    keyed = bb.emit(op.multiply(k, op.reshape(key_decay, [1, heads, 1, b, 1])))
    states = bb.emit(op.matmul(op.permute_dims(keyed, swap_last), v))  # [B, H, A, M, E]
    carried = bb.emit(op.matmul(op.reshape(across, [1, heads, chunks, chunks]),
                                op.reshape(states, [batch, heads, chunks, features * width])))
    carried = bb.emit(op.reshape(carried, [batch, heads, chunks, features, width]))
    read = bb.emit(op.multiply(q, op.reshape(query_decay, [1, heads, 1, b, 1])))
    return _lower_ratio(bb, bb.emit(op.add(acc, op.matmul(read, carried))), n, head_size)


def _lower_far_field(bb, query, key, value, rel_bias, bias, weight, fbias, kind, scale, causal, far_from):
    """The far-field form (``far_from``) in Relax: the computation of :func:`_emit_far_field`,
    the neighbourhood weights and far-field factors from ``rel_bias`` by one TE kernel."""
    from tvm import relax, te

    op = relax.op
    phi_q, phi_k, value_1 = _lower_features(bb, query, key, value, bias, weight, fbias, kind, scale)
    batch, heads, n, head_size = _shape(value)
    b = band_chunk(far_from)
    chunks = -(-n // b)
    seen = n if causal else 2 * n - 1  # see bias_peak

    def factors(c):
        """(near [H, b, 3b], far-left [H], far-right [H]) weights."""
        j = te.reduce_axis((0, seen), "j")
        peak = te.compute((heads,), lambda h: te.max(c[h, j], axis=j), name="rpe_peak")

        def near(h, i, slot):
            offset = slot - b - i
            weight_ = te.exp(c[h, te.min(te.max(offset + n - 1, 0), 2 * n - 2)] - peak[h])
            return te.if_then_else(offset > 0, np.float32(0), weight_) if causal else weight_

        return [te.compute((heads, b, 3 * b), near, name="rpe_near"),
                te.compute((heads,), lambda h: te.exp(c[h, 0] - peak[h]), name="rpe_far_left"),
                te.compute((heads,), lambda h: te.exp(c[h, 2 * n - 2] - peak[h]), name="rpe_far_right")]

    made = bb.emit_te(factors, rel_bias, primfunc_name_hint="rpe_far_factors")
    near, far_left, far_right = (bb.emit(relax.TupleGetItem(made, i)) for i in range(3))
    q, k, v = (_lower_blocks(bb, x, b) for x in (phi_q, phi_k, value_1))

    def neighbourhood(x):  # [B, H, A, b, X] -> [B, H, A, 3b, X]: chunks a - 1, a, a + 1
        padded = bb.emit(op.nn.pad(x, [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]))
        parts = [bb.emit(op.strided_slice(padded, axes=[2], begin=[s], end=[s + chunks])) for s in range(3)]
        return bb.emit(op.concat(parts, axis=3))

    swap_last = [0, 1, 2, 4, 3]
    scores = bb.emit(op.matmul(q, op.permute_dims(neighbourhood(k), swap_last)))  # [B, H, A, b, 3b]
    scores = bb.emit(op.multiply(scores, op.reshape(near, [1, heads, 1, b, 3 * b])))
    acc = bb.emit(op.matmul(scores, neighbourhood(v)))  # [B, H, A, b, E]
    states = bb.emit(op.matmul(op.permute_dims(k, swap_last), v))  # [B, H, A, M, E]
    # chunks <= a - 2: exclusive prefix sums moved one chunk on
    before = bb.emit(op.cumsum(states, axis=2, exclusive=True))
    before = bb.emit(op.strided_slice(op.nn.pad(before, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]), axes=[2], begin=[0],
                                      end=[chunks]))
    far = bb.emit(op.multiply(before, op.reshape(far_left, [1, heads, 1, 1, 1])))
    if not causal:  # chunks >= a + 2: the same from the other end
        after = bb.emit(op.flip(op.cumsum(op.flip(states, axis=2), axis=2, exclusive=True), axis=2))
        after = bb.emit(op.strided_slice(op.nn.pad(after, [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), axes=[2], begin=[1],
                                         end=[chunks + 1]))
        far = bb.emit(op.add(far, op.multiply(after, op.reshape(far_right, [1, heads, 1, 1, 1]))))
    return _lower_ratio(bb, bb.emit(op.add(acc, op.matmul(q, far))), n, head_size)


def _lower_fft(bb, query, key, value, rel_bias, bias, weight, fbias, kind, scale, causal):
    from tvm import relax

    op = relax.op
    root = relax.const(np.float32(math.sqrt(scale)), "float32")
    phi_q = fm.lower_tvm(bb, kind, bb.emit(op.multiply(query, root)), "query", weight, fbias)
    phi_k = fm.lower_tvm(bb, kind, bb.emit(op.multiply(key, root)), "key", weight, fbias)
    batch, heads, n, head_size = _shape(value)
    features = _shape(phi_q)[-1]
    length = fft_length(n)
    weights = _lower_key_weights(bb, bias, n)
    wr, wi = _twiddles(length, FFT_DTYPE)
    twiddle_r, twiddle_i = relax.const(wr, FFT_DTYPE), relax.const(wi, FFT_DTYPE)
    spectrum_gv = bb.add_func(_spectrum_kernel(heads, n, length, bool(causal)), "rpe_kernel_spectrum")
    spectrum = bb.emit(relax.call_tir(spectrum_gv, [rel_bias, twiddle_r, twiddle_i],
                                      relax.TensorType((2, heads, length), FFT_DTYPE)))
    kernel = _attention_kernel(batch, _shape(weights)[0], heads, n, features, head_size, length)
    attention_gv = bb.add_func(kernel, "rpe_fft_attention")
    return bb.emit(relax.call_tir(attention_gv, [phi_q, phi_k, value, weights, spectrum, twiddle_r, twiddle_i],
                                  relax.TensorType((batch, heads, n, head_size), "float32")))


def _spectrum_kernel(heads: int, n: int, length: int, causal: bool):
    """TIR: rel_bias [H, 2n-1] -> FFT of the circulant's first column g, bit-reversed order,
    as [2 (re, im), H, N]; g = exp(c - max c) laid out as in :func:`_emit_kernel_spectrum`."""
    from tvm.script import tirx as T

    width = 2 * n - 1
    half_n = length // 2
    log_n = length.bit_length() - 1
    tail_start = length if causal else length - n + 1  # causal: no wrapped-around part

    dtype = FFT_DTYPE

    def exp_of(c, h, index, top):
        return T.Cast(dtype, T.exp(c[h, index] - top[h]))

    @T.prim_func(s_tir=True)
    def spectrum(c: T.Buffer((heads, width), "float32"), wr: T.Buffer((half_n,), dtype),
                 wi: T.Buffer((half_n,), dtype), out: T.Buffer((2, heads, length), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            top = T.alloc_buffer((heads,), "float32")
            for h in T.parallel(heads):
                top[h] = c[h, 0]
                for t in range(1, n if causal else width):  # see bias_peak
                    top[h] = T.max(top[h], c[h, t])
                for t in range(length):
                    out[1, h, t] = T.Cast(dtype, 0)
                    if t < n:
                        out[0, h, t] = exp_of(c, h, n - 1 - t, top)
                    elif t >= tail_start:
                        out[0, h, t] = exp_of(c, h, length + n - 1 - t, top)
                    else:
                        out[0, h, t] = T.Cast(dtype, 0)
                for s in range(log_n):
                    for p in range(half_n):
                        a = T.shift_left(T.shift_right(p, log_n - 1 - s), log_n - s) + T.bitwise_and(
                            p, T.shift_right(length, s + 1) - 1)
                        b = a + T.shift_right(length, s + 1)
                        tw = T.shift_left(T.bitwise_and(p, T.shift_right(length, s + 1) - 1), s)
                        ur = out[0, h, a]
                        ui = out[1, h, a]
                        dr = ur - out[0, h, b]
                        di = ui - out[1, h, b]
                        out[0, h, a] = ur + out[0, h, b]
                        out[1, h, a] = ui + out[1, h, b]
                        out[0, h, b] = dr * wr[tw] - di * wi[tw]
                        out[1, h, b] = dr * wi[tw] + di * wr[tw]

    return spectrum


def _attention_kernel(batch: int, weight_rows: int, heads: int, n: int, features: int, head_size: int,
                      length: int):
    """TIR: the FFT attention proper. Per (batch, head) task (parallel), the P = ceil(M / 2)
    (D + 1) complex columns (real part from feature m, imaginary part from feature m + P) go
    in blocks of cb = ``BLOCK_COLUMNS``: first the value blocks (block b: pair m = b % P, value
    columns (b // P) cb .. + cb, zero past D), then the normalizer blocks (lane c: pair
    (b - P ceil(D / cb)) cb + c). Per block: load (fused with the first DIF stage, whose lower
    half input is zero), DIF stages, product with the kernel spectrum, DIT stages (two per
    pass where the count allows), last DIT stage fused with the contraction against phi(q)
    into the accumulator [ceil(D / cb), n, cb] or the per-lane normalizer [n, cb].

    Every butterfly stage reads one slot of a two-slot scratch buffer and writes the other
    (out of place): each output is then a pure expression of loaded values, which TIR
    vectorizes over the block's columns (scalar temporaries in a vectorized loop are not
    per-lane in TVM 0.27 and give wrong results)."""
    from tvm.script import tirx as T

    pairs = (features + 1) // 2
    cb = BLOCK_COLUMNS
    value_blocks = -(-head_size // cb)  # blocks of value columns per feature pair
    value_total = pairs * value_blocks  # value blocks come first, pair-major within a value block
    norm_blocks = -(-pairs // cb)  # then the normalizer columns, one per pair
    blocks = value_total + norm_blocks
    half_n = length // 2
    log_n = length.bit_length() - 1
    tasks = batch * heads
    inverse_n = np.float32(1.0 / length)
    dif_local = max(1, log_n - LOCAL_LOG)  # first DIF stage done per sub-block
    local_log = log_n - dif_local  # sub-block size is 2 ** local_log <= N / 2
    local = 1 << local_log
    dtype = FFT_DTYPE

    def feature(phi, task, t, m):
        """phi[.., t, m], 0 for m >= M (the missing partner of an odd feature count)."""
        return T.if_then_else(m < features, phi[task // heads, task % heads, t, T.min(m, features - 1)],
                              T.float32(0))

    def key_weight(kw, task, t):
        """w_t of the key-padding mask, 0 past n (the transform's zero padding)."""
        return T.if_then_else(t < n, kw[task // heads % weight_rows, T.min(t, n - 1)], T.float32(0))

    def value_x(phi_k, kw, v, task, t, blk, c, second):
        """Value block ``blk``, lane c: phi_k[m or m + P] * w_t * v_t[e], m = blk % P, e = (blk // P) cb + c
        (0 past n and for padding lanes e >= D)."""
        b, h, tt = task // heads, task % heads, T.min(t, n - 1)
        e = (blk // pairs) * cb + c
        column = v[b, h, tt, e] if head_size % cb == 0 else T.if_then_else(
            e < head_size, v[b, h, tt, T.min(e, head_size - 1)], T.float32(0))
        m = blk % pairs + (pairs if second else 0)
        return T.Cast(dtype, feature(phi_k, task, tt, m) * key_weight(kw, task, t) * column)

    def norm_x(phi_k, kw, task, t, blk, c, second):
        """Normalizer block ``blk``, lane c = pair p: phi_k[p or p + P] * w_t (0 for padding pairs)."""
        pair = (blk - value_total) * cb + c
        m = T.if_then_else(pair < pairs, pair + (pairs if second else 0), features)
        return T.Cast(dtype, feature(phi_k, task, T.min(t, n - 1), m) * key_weight(kw, task, t))

    def query_scalar(phi_q, task, i, m):
        """phi_q[m] / N at query i (0 for a missing feature)."""
        return T.Cast(dtype, feature(phi_q, task, i, m) * inverse_n)

    def dif_a(p, s):  # first index of butterfly p in DIF stage s (half-size N >> (s + 1))
        return T.shift_left(T.shift_right(p, log_n - 1 - s), log_n - s) + T.bitwise_and(
            p, T.shift_right(length, s + 1) - 1)

    def dif_twiddle(p, s):
        return T.shift_left(T.bitwise_and(p, T.shift_right(length, s + 1) - 1), s)

    def dit_a(p, s):  # first index of butterfly p in DIT stage s (half-size 1 << s)
        return T.shift_left(T.shift_right(p, s), s + 1) + T.bitwise_and(p, T.shift_left(1, s) - 1)

    def dit_twiddle(p, s):
        return T.shift_left(T.bitwise_and(p, T.shift_left(1, s) - 1), log_n - 1 - s)

    def c_add(a, b):
        return (a[0] + b[0], a[1] + b[1])

    def c_sub(a, b):
        return (a[0] - b[0], a[1] - b[1])

    def c_twiddle(a, wr, wi, k):  # a * W^k, W = exp(-2 pi i / N)
        return (a[0] * wr[k] - a[1] * wi[k], a[0] * wi[k] + a[1] * wr[k])

    def c_conj_twiddle(a, wr, wi, k):  # a * conj(W^k)
        return (a[0] * wr[k] + a[1] * wi[k], a[1] * wr[k] - a[0] * wi[k])

    def points(xr, xi, task, slot, a, step, count, c):
        """The complex points a + r step (r < count) of a slot, lane c."""
        return tuple((xr[task, slot, a + r * step, c], xi[task, slot, a + r * step, c]) for r in range(count))

    def dif_pair(x, wr, wi, k):
        """One DIF butterfly: (x0 + x1, (x0 - x1) W^k)."""
        return (c_add(x[0], x[1]), c_twiddle(c_sub(x[0], x[1]), wr, wi, k))

    def dit_pair(x, wr, wi, k):
        """One inverse DIT butterfly: (x0 + x1 conj(W^k), x0 - x1 conj(W^k))."""
        t = c_conj_twiddle(x[1], wr, wi, k)
        return (c_add(x[0], t), c_sub(x[0], t))

    def dif_quad(x, wr, wi, s, j, q):
        """DIF stages s and s + 1 in one pass over memory, on the points at a, a + Q, a + 2Q,
        a + 3Q (Q = N >> (s + 2), j = a mod Q)."""
        u0, u2 = dif_pair((x[0], x[2]), wr, wi, T.shift_left(j, s))
        u1, u3 = dif_pair((x[1], x[3]), wr, wi, T.shift_left(j + q, s))
        y0, y1 = dif_pair((u0, u1), wr, wi, T.shift_left(j, s + 1))
        y2, y3 = dif_pair((u2, u3), wr, wi, T.shift_left(j, s + 1))
        return (y0, y1, y2, y3)

    def dit_quad(x, wr, wi, s, j, h):
        """Inverse DIT stages s and s + 1 in one pass, on the points at a, a + h, a + 2h, a + 3h
        (h = 1 << s, j = a mod h)."""
        u0, u1 = dit_pair((x[0], x[1]), wr, wi, T.shift_left(j, log_n - 1 - s))
        u2, u3 = dit_pair((x[2], x[3]), wr, wi, T.shift_left(j, log_n - 1 - s))
        y0, y2 = dit_pair((u0, u2), wr, wi, T.shift_left(j, log_n - 2 - s))
        y1, y3 = dit_pair((u1, u3), wr, wi, T.shift_left(j + h, log_n - 2 - s))
        return (y0, y1, y2, y3)

    def dif_base(p, s):  # first index of quad p in the fused DIF pass of stages s, s + 1
        return T.shift_left(T.shift_right(p, log_n - 2 - s), log_n - s) + T.bitwise_and(
            p, T.shift_right(length, s + 2) - 1)

    def dit_base(p, s):  # first index of quad p in the fused DIT pass of stages s, s + 1
        return T.shift_left(T.shift_right(p, s), s + 2) + T.bitwise_and(p, T.shift_left(1, s) - 1)

    # The slot (half of the out-of-place scratch) a group of stages starts from: a fused pass
    # and a single stage each flip it. Stage 0 (fused with the load) leaves the data in slot 0.
    def flips(stages):
        return stages // 2 + stages % 2

    dif_global = dif_local - 1  # DIF stages 1 .. dif_local - 1 over the whole array
    dit_global = log_n - 1 - local_log  # DIT stages local_log .. log_n - 2 over the whole array
    slot_dif_local = flips(dif_global) % 2  # start of the per-sub-block DIF stages
    after_dif = (slot_dif_local + flips(local_log)) % 2  # holds the spectrum
    after_product = 1 - after_dif
    slot_dit_global = (after_product + flips(local_log)) % 2
    last = (slot_dit_global + flips(dit_global)) % 2  # slot the last DIT stage reads

    @T.prim_func(s_tir=True)
    def attention(phi_q: T.Buffer((batch, heads, n, features), "float32"),
                  phi_k: T.Buffer((batch, heads, n, features), "float32"),
                  v: T.Buffer((batch, heads, n, head_size), "float32"),
                  kw: T.Buffer((weight_rows, n), "float32"),
                  g: T.Buffer((2, heads, length), dtype),
                  wr: T.Buffer((half_n,), dtype), wi: T.Buffer((half_n,), dtype),
                  out: T.Buffer((batch, heads, n, head_size), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            xr = T.alloc_buffer((tasks, 2, length, cb), dtype)
            xi = T.alloc_buffer((tasks, 2, length, cb), dtype)
            acc = T.alloc_buffer((tasks, value_blocks, n, cb), dtype)
            den = T.alloc_buffer((tasks, n, cb), dtype)
            for task in T.parallel(tasks):
                for i in range(n):
                    for c in T.vectorized(cb):
                        den[task, i, c] = T.Cast(dtype, 0)
                    for eb in range(value_blocks):
                        for c in T.vectorized(cb):
                            acc[task, eb, i, c] = T.Cast(dtype, 0)
                for blk in range(blocks):
                    # load x (zero past n) fused with the first DIF stage (x[t + N/2] = 0), slot 0
                    if blk < value_total:
                        for t in range(half_n):
                            for c in T.vectorized(cb):
                                xr[task, 0, t, c] = value_x(phi_k, kw, v, task, t, blk, c, False)
                                xi[task, 0, t, c] = value_x(phi_k, kw, v, task, t, blk, c, True)
                                xr[task, 0, t + half_n, c] = xr[task, 0, t, c] * wr[t] - xi[task, 0, t, c] * wi[t]
                                xi[task, 0, t + half_n, c] = xr[task, 0, t, c] * wi[t] + xi[task, 0, t, c] * wr[t]
                    else:
                        for t in range(half_n):
                            for c in T.vectorized(cb):
                                xr[task, 0, t, c] = norm_x(phi_k, kw, task, t, blk, c, False)
                                xi[task, 0, t, c] = norm_x(phi_k, kw, task, t, blk, c, True)
                                xr[task, 0, t + half_n, c] = xr[task, 0, t, c] * wr[t] - xi[task, 0, t, c] * wi[t]
                                xi[task, 0, t + half_n, c] = xr[task, 0, t, c] * wi[t] + xi[task, 0, t, c] * wr[t]
                    # DIF stages over the whole array, two per pass (the odd one alone)
                    for r in T.unroll(dif_global // 2):
                        for p in range(length // 4):
                            for c in T.vectorized(cb):
                                s = T.meta_var(1 + 2 * r)
                                a = T.meta_var(dif_base(p, s))
                                y = T.meta_var(dif_quad(points(xr, xi, task, (0 + r) % 2, a, T.shift_right(length, s + 2), 4, c), wr, wi, s, T.bitwise_and(p, T.shift_right(length, s + 2) - 1), T.shift_right(length, s + 2)))
                                xr[task, 1 - (0 + r) % 2, a, c] = y[0][0]
                                xi[task, 1 - (0 + r) % 2, a, c] = y[0][1]
                                xr[task, 1 - (0 + r) % 2, a + T.shift_right(length, s + 2), c] = y[1][0]
                                xi[task, 1 - (0 + r) % 2, a + T.shift_right(length, s + 2), c] = y[1][1]
                                xr[task, 1 - (0 + r) % 2, a + 2 * T.shift_right(length, s + 2), c] = y[2][0]
                                xi[task, 1 - (0 + r) % 2, a + 2 * T.shift_right(length, s + 2), c] = y[2][1]
                                xr[task, 1 - (0 + r) % 2, a + 3 * T.shift_right(length, s + 2), c] = y[3][0]
                                xi[task, 1 - (0 + r) % 2, a + 3 * T.shift_right(length, s + 2), c] = y[3][1]
                    for s in T.unroll(dif_local - dif_global % 2, dif_local):
                        for p in range(half_n):
                            for c in T.vectorized(cb):
                                a = T.meta_var(dif_a(p, s))
                                y = T.meta_var(dif_pair(points(xr, xi, task, (dif_global // 2) % 2, a, T.shift_right(length, s + 1), 2, c), wr, wi, dif_twiddle(p, s)))
                                xr[task, 1 - (dif_global // 2) % 2, a, c] = y[0][0]
                                xi[task, 1 - (dif_global // 2) % 2, a, c] = y[0][1]
                                xr[task, 1 - (dif_global // 2) % 2, a + T.shift_right(length, s + 1), c] = y[1][0]
                                xi[task, 1 - (dif_global // 2) % 2, a + T.shift_right(length, s + 1), c] = y[1][1]
                    # per sub-block of ``local`` points (in cache): the remaining DIF stages, the
                    # product with the kernel's spectrum (both bit-reversed), the first DIT stages
                    for q in range(length // local):
                        for r in T.unroll(local_log // 2):
                            for p in range(local // 4):
                                for c in T.vectorized(cb):
                                    s = T.meta_var(dif_local + 2 * r)
                                    a = T.meta_var(q * local + dif_base(p, s))
                                    y = T.meta_var(dif_quad(points(xr, xi, task, (slot_dif_local + r) % 2, a, T.shift_right(length, s + 2), 4, c), wr, wi, s, T.bitwise_and(p, T.shift_right(length, s + 2) - 1), T.shift_right(length, s + 2)))
                                    xr[task, 1 - (slot_dif_local + r) % 2, a, c] = y[0][0]
                                    xi[task, 1 - (slot_dif_local + r) % 2, a, c] = y[0][1]
                                    xr[task, 1 - (slot_dif_local + r) % 2, a + T.shift_right(length, s + 2), c] = y[1][0]
                                    xi[task, 1 - (slot_dif_local + r) % 2, a + T.shift_right(length, s + 2), c] = y[1][1]
                                    xr[task, 1 - (slot_dif_local + r) % 2, a + 2 * T.shift_right(length, s + 2), c] = y[2][0]
                                    xi[task, 1 - (slot_dif_local + r) % 2, a + 2 * T.shift_right(length, s + 2), c] = y[2][1]
                                    xr[task, 1 - (slot_dif_local + r) % 2, a + 3 * T.shift_right(length, s + 2), c] = y[3][0]
                                    xi[task, 1 - (slot_dif_local + r) % 2, a + 3 * T.shift_right(length, s + 2), c] = y[3][1]
                        for s in T.unroll(log_n - local_log % 2, log_n):
                            for p in range(local // 2):
                                for c in T.vectorized(cb):
                                    a = T.meta_var(q * local + dif_a(p, s))
                                    y = T.meta_var(dif_pair(points(xr, xi, task, (slot_dif_local + local_log // 2) % 2, a, T.shift_right(length, s + 1), 2, c), wr, wi, dif_twiddle(p, s)))
                                    xr[task, 1 - (slot_dif_local + local_log // 2) % 2, a, c] = y[0][0]
                                    xi[task, 1 - (slot_dif_local + local_log // 2) % 2, a, c] = y[0][1]
                                    xr[task, 1 - (slot_dif_local + local_log // 2) % 2, a + T.shift_right(length, s + 1), c] = y[1][0]
                                    xi[task, 1 - (slot_dif_local + local_log // 2) % 2, a + T.shift_right(length, s + 1), c] = y[1][1]
                        for f in range(local):
                            for c in T.vectorized(cb):
                                xr[task, after_product, q * local + f, c] = (
                                    xr[task, after_dif, q * local + f, c] * g[0, task % heads, q * local + f]
                                    - xi[task, after_dif, q * local + f, c] * g[1, task % heads, q * local + f])
                                xi[task, after_product, q * local + f, c] = (
                                    xr[task, after_dif, q * local + f, c] * g[1, task % heads, q * local + f]
                                    + xi[task, after_dif, q * local + f, c] * g[0, task % heads, q * local + f])
                        for r in T.unroll(local_log // 2):
                            for p in range(local // 4):
                                for c in T.vectorized(cb):
                                    s = T.meta_var(0 + 2 * r)
                                    a = T.meta_var(q * local + dit_base(p, s))
                                    y = T.meta_var(dit_quad(points(xr, xi, task, (after_product + r) % 2, a, T.shift_left(1, s), 4, c), wr, wi, s, T.bitwise_and(p, T.shift_left(1, s) - 1), T.shift_left(1, s)))
                                    xr[task, 1 - (after_product + r) % 2, a, c] = y[0][0]
                                    xi[task, 1 - (after_product + r) % 2, a, c] = y[0][1]
                                    xr[task, 1 - (after_product + r) % 2, a + T.shift_left(1, s), c] = y[1][0]
                                    xi[task, 1 - (after_product + r) % 2, a + T.shift_left(1, s), c] = y[1][1]
                                    xr[task, 1 - (after_product + r) % 2, a + 2 * T.shift_left(1, s), c] = y[2][0]
                                    xi[task, 1 - (after_product + r) % 2, a + 2 * T.shift_left(1, s), c] = y[2][1]
                                    xr[task, 1 - (after_product + r) % 2, a + 3 * T.shift_left(1, s), c] = y[3][0]
                                    xi[task, 1 - (after_product + r) % 2, a + 3 * T.shift_left(1, s), c] = y[3][1]
                        for s in T.unroll(local_log - local_log % 2, local_log):
                            for p in range(local // 2):
                                for c in T.vectorized(cb):
                                    a = T.meta_var(q * local + dit_a(p, s))
                                    y = T.meta_var(dit_pair(points(xr, xi, task, (after_product + local_log // 2) % 2, a, T.shift_left(1, s), 2, c), wr, wi, dit_twiddle(p, s)))
                                    xr[task, 1 - (after_product + local_log // 2) % 2, a, c] = y[0][0]
                                    xi[task, 1 - (after_product + local_log // 2) % 2, a, c] = y[0][1]
                                    xr[task, 1 - (after_product + local_log // 2) % 2, a + T.shift_left(1, s), c] = y[1][0]
                                    xi[task, 1 - (after_product + local_log // 2) % 2, a + T.shift_left(1, s), c] = y[1][1]
                    # the other DIT stages over the whole array, all but the last
                    for r in T.unroll(dit_global // 2):
                        for p in range(length // 4):
                            for c in T.vectorized(cb):
                                s = T.meta_var(local_log + 2 * r)
                                a = T.meta_var(dit_base(p, s))
                                y = T.meta_var(dit_quad(points(xr, xi, task, (slot_dit_global + r) % 2, a, T.shift_left(1, s), 4, c), wr, wi, s, T.bitwise_and(p, T.shift_left(1, s) - 1), T.shift_left(1, s)))
                                xr[task, 1 - (slot_dit_global + r) % 2, a, c] = y[0][0]
                                xi[task, 1 - (slot_dit_global + r) % 2, a, c] = y[0][1]
                                xr[task, 1 - (slot_dit_global + r) % 2, a + T.shift_left(1, s), c] = y[1][0]
                                xi[task, 1 - (slot_dit_global + r) % 2, a + T.shift_left(1, s), c] = y[1][1]
                                xr[task, 1 - (slot_dit_global + r) % 2, a + 2 * T.shift_left(1, s), c] = y[2][0]
                                xi[task, 1 - (slot_dit_global + r) % 2, a + 2 * T.shift_left(1, s), c] = y[2][1]
                                xr[task, 1 - (slot_dit_global + r) % 2, a + 3 * T.shift_left(1, s), c] = y[3][0]
                                xi[task, 1 - (slot_dit_global + r) % 2, a + 3 * T.shift_left(1, s), c] = y[3][1]
                    for s in T.unroll(log_n - 1 - dit_global % 2, log_n - 1):
                        for p in range(half_n):
                            for c in T.vectorized(cb):
                                a = T.meta_var(dit_a(p, s))
                                y = T.meta_var(dit_pair(points(xr, xi, task, (slot_dit_global + dit_global // 2) % 2, a, T.shift_left(1, s), 2, c), wr, wi, dit_twiddle(p, s)))
                                xr[task, 1 - (slot_dit_global + dit_global // 2) % 2, a, c] = y[0][0]
                                xi[task, 1 - (slot_dit_global + dit_global // 2) % 2, a, c] = y[0][1]
                                xr[task, 1 - (slot_dit_global + dit_global // 2) % 2, a + T.shift_left(1, s), c] = y[1][0]
                                xi[task, 1 - (slot_dit_global + dit_global // 2) % 2, a + T.shift_left(1, s), c] = y[1][1]
                    # last DIT stage (only outputs i < n <= N/2) and the contraction with phi(q):
                    # a value block adds into its value columns, a normalizer block into den (per lane)
                    if blk < value_total:
                        for i in range(n):
                            for c in T.vectorized(cb):
                                acc[task, blk // pairs, i, c] = acc[task, blk // pairs, i, c] + (
                                    query_scalar(phi_q, task, i, blk % pairs)
                                    * (xr[task, last, i, c] + (xr[task, last, i + half_n, c] * wr[i] + xi[task, last, i + half_n, c] * wi[i]))
                                    + query_scalar(phi_q, task, i, blk % pairs + pairs)
                                    * (xi[task, last, i, c] + (xi[task, last, i + half_n, c] * wr[i] - xr[task, last, i + half_n, c] * wi[i])))
                    else:
                        for i in range(n):
                            for c in T.vectorized(cb):
                                den[task, i, c] = den[task, i, c] + (
                                    query_scalar(phi_q, task, i, T.if_then_else(
                                        (blk - value_total) * cb + c < pairs, (blk - value_total) * cb + c, features))
                                    * (xr[task, last, i, c] + (xr[task, last, i + half_n, c] * wr[i] + xi[task, last, i + half_n, c] * wi[i]))
                                    + query_scalar(phi_q, task, i, T.if_then_else(
                                        (blk - value_total) * cb + c < pairs, (blk - value_total) * cb + c + pairs,
                                        features))
                                    * (xi[task, last, i, c] + (xi[task, last, i + half_n, c] * wr[i] - xr[task, last, i + half_n, c] * wi[i])))
                for i in range(n):
                    for c in range(1, cb):
                        den[task, i, 0] = den[task, i, 0] + den[task, i, c]
                    for d in range(head_size):
                        out[task // heads, task % heads, i, d] = T.Cast("float32", acc[task, d // cb, i, d % cb] / T.max(
                            den[task, i, 0], T.Cast(dtype, TINY)))

    return attention
