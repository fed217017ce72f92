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
(``DFT`` op in double, a ``Loop`` over feature pairs so memory stays O(B H D N)); the TVM
lowering (``kernelize/backends/tvm/lower/rpe_attention.py``) is two hand-written TIR kernels
(the kernel's spectrum per head; then per (batch, head) task a radix-2 FFT over blocks of
complex columns, see ``lower/rpe_fft.py``), and runs the exact branch in chunks of heads so
its n x n intermediates fit in memory.
``decay = 1`` (set by the RPE methods where the pattern proved the bias is ALiBi and the
attention causal: ``c[d] = c[0] + m d`` on d <= 0, m >= 0; ``reference`` checks it) makes both
backends evaluate E[i, j] = exp(-m (i - j)) as a chunked decay instead of by FFT
(:func:`_emit_decay` and its TVM twin: MatMuls over chunks of ``DECAY_CHUNK``
positions): the same operator with the same features, computed another way, O(n) up to a
small [A, A] carry. It is what makes ALiBi fast on ONNX Runtime, whose DFT kernel runs at
15-50 ns per point whatever the length (its FFT path is slower than exact attention at every
measured length). ``far_from = w`` (set where the pattern found the bias constant beyond
offset w on each side: T5's clamped buckets; ``reference`` checks it) takes another exact
route: chunks of b >= w positions, each query chunk with its three neighbouring key chunks at
the true Toeplitz weights, and the keys further away at the two constant far-field weights
through prefix and suffix sums of the chunk states (:func:`_emit_far_field` and its TVM
twin), O(n b). Any other Toeplitz bias takes the FFT.
Self-attention only (as many keys as queries): a Toeplitz bias is square.
``exact_below``: below that many query positions the exact softmax attention with the full
bias (Toeplitz + mask + causal) runs instead.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from kernelize.ops import feature_maps as fm
from kernelize.ops.attention import exact_attention
from kernelize.ops.base import Operator, const, emit_length_dispatch

MASKED = -1e4  # a key-padding bias at or below this drops the key
TINY = 1e-30  # floor of the normalizer
DECAY_CHUNK = 64  # positions per chunk of the decay form (ONNX body, ``decay = 1``)


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
        if n < exact_below:
            return exact_attention(q, k, v, bias, scale=scale, causal=bool(causal),
                                   position=toeplitz(c, n)).astype(np.float32)
        tri = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
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
