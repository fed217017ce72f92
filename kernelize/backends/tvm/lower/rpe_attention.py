"""TVM lowering of kernelize.RPEAttention (kernelize/ops/rpe_attention.py): the exact branch
(in chunks of heads so its n x n intermediates fit in memory), the decay and far-field forms
as Relax ops and small TE kernels, and the FFT form as the two hand-written TIR kernels of
``lower/rpe_fft.py``. The ops module's docstring describes the computation and its numerics.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, te, topi

from kernelize.backends.tvm.lower import feature_maps as fm
from kernelize.backends.tvm.lower.rpe_fft import FFT_DTYPE, attention_kernel, spectrum_kernel, twiddles
from kernelize.backends.tvm.registry import lowering
from kernelize.backends.tvm.te import length_dispatch, static_shape
from kernelize.ops.rpe_attention import DECAY_CHUNK, MASKED, TINY, band_chunk, fft_length

EXACT_CHUNK_BYTES = 1 << 30  # n x n scores per chunk of heads in the exact lowering


@lowering("RPEAttention")
def rpe_attention(bb, inputs, attrs):
    query, key, value, rel_bias, bias, weight, fbias = inputs
    scale, causal = float(attrs["scale"]), int(attrs.get("causal", 0))
    return length_dispatch(
        query, int(attrs.get("exact_below", 0)),
        lambda: _exact(bb, query, key, value, rel_bias, bias, scale, causal),
        lambda: _approximate(bb, inputs, attrs, scale, causal))


def _approximate(bb, inputs, attrs, scale, causal):
    """The kernelized computation: decay, far-field or FFT form (as in the ONNX body)."""
    query, key, value, rel_bias, bias, weight, fbias = inputs
    args = (bb, query, key, value, rel_bias, bias, weight, fbias, attrs["feature_map"], scale, causal)
    if int(attrs.get("decay", 0)):
        return _decay(*args)
    if int(attrs.get("far_from", 0)):
        return _far_field(*args, int(attrs["far_from"]))
    return _fft(*args)


def _exact(bb, query, key, value, rel_bias, bias, scale, causal):
    """softmax(Q K^T scale + T + bias (+ causal)) V. The Toeplitz bias, mask and causal part are
    added inside the softmax's TE function (never materialized as [H, n, n] tensors of their
    own), and long inputs run in chunks of heads (``EXACT_CHUNK_BYTES`` of scores per chunk):
    at n = 8192, h = 12 the unchunked n x n intermediates need more than this machine's 23 GB."""
    op = relax.op
    batch, heads, n, _ = static_shape(query)
    chunk = max(1, min(heads, EXACT_CHUNK_BYTES // (4 * batch * n * n)))
    if chunk < heads:
        parts = []
        for h0 in range(0, heads, chunk):
            h1 = min(heads, h0 + chunk)

            def rows(x, axis=1):
                return bb.emit(op.strided_slice(x, axes=[axis], begin=[h0], end=[h1]))

            parts.append(_exact(bb, rows(query), rows(key), rows(value), rows(rel_bias, 0), bias, scale, causal))
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
        bshape = static_shape(bias)
        if len(bshape) != 4 or bshape[1] != 1 or bshape[2] != 1:
            # a general mask: added as a tensor (the FFT path refuses it anyway)
            probs = bb.emit_te(lambda s, c: biased_softmax(s, c), bb.emit(op.add(scores, bias)), rel_bias,
                               primfunc_name_hint="rpe_exact_softmax")
        else:
            probs = bb.emit_te(biased_softmax, scores, rel_bias, bias, primfunc_name_hint="rpe_exact_softmax")
    else:
        probs = bb.emit_te(biased_softmax, scores, rel_bias, primfunc_name_hint="rpe_exact_softmax")
    return bb.emit(op.matmul(probs, value))


def _key_weights(bb, bias, n: int):
    """w_j of the key-padding ``bias`` as [B or 1, n] (ones without a mask)."""
    if bias is None:
        return bb.emit(relax.const(np.ones((1, n), np.float32)))
    bshape = static_shape(bias)
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


def _features(bb, query, key, value, bias, weight, fbias, kind, scale):
    """(phi(q), phi(k) w, [v | 1 | 0 ...]) for the chunked forms; the value's width padded to
    a multiple of 16 so that every product vectorizes (65 columns left them scalar: 451 vs 95
    ms for the decay form at n = 8192)."""
    op = relax.op
    root = relax.const(np.float32(math.sqrt(scale)), "float32")
    phi_q = fm.features(bb, kind, bb.emit(op.multiply(query, root)), "query", weight, fbias)
    phi_k = fm.features(bb, kind, bb.emit(op.multiply(key, root)), "key", weight, fbias)
    batch, heads, n, head_size = static_shape(value)
    weights = _key_weights(bb, bias, n)
    phi_k = bb.emit(op.multiply(phi_k, op.reshape(weights, [static_shape(weights)[0], 1, n, 1])))
    width = -(-(head_size + 1) // 16) * 16
    extra = np.zeros((batch, heads, n, width - head_size), np.float32)
    extra[..., 0] = 1.0
    return phi_q, phi_k, bb.emit(op.concat([value, relax.const(extra)], axis=-1))


def _blocks(bb, x, chunk: int):
    """[B, H, n, X] -> [B, H, A, chunk, X], zero-padded."""
    batch, heads, n, width = static_shape(x)
    chunks = -(-n // chunk)
    if chunks * chunk != n:
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, chunks * chunk - n, 0, 0]))
    return bb.emit(relax.op.reshape(x, [batch, heads, chunks, chunk, width]))


def _ratio(bb, acc, n: int, head_size: int):
    """[B, H, A, b, E] accumulators -> numerator / max(normalizer, TINY) over the first n positions."""
    op = relax.op
    batch, heads, chunks, b, width = static_shape(acc)
    acc = bb.emit(op.reshape(acc, [batch, heads, chunks * b, width]))
    numerator = bb.emit(op.strided_slice(acc, axes=[2, 3], begin=[0, 0], end=[n, head_size]))
    denominator = bb.emit(op.strided_slice(acc, axes=[2, 3], begin=[0, head_size], end=[n, head_size + 1]))
    return bb.emit(op.divide(numerator, op.maximum(denominator, relax.const(np.float32(TINY), "float32"))))


def _decay(bb, query, key, value, rel_bias, bias, weight, fbias, kind, scale, causal):
    """The decay form (``decay = 1``) in Relax: the same chunked computation as the ONNX body's
    ``_emit_decay``, with the decay factors computed from ``rel_bias`` by small TE kernels."""
    if not causal:
        raise ValueError("RPEAttention decay=1 is for causal attention only")
    op = relax.op
    phi_q, phi_k, value_1 = _features(bb, query, key, value, bias, weight, fbias, kind, scale)
    batch, heads, n, head_size = static_shape(value)
    features, width = static_shape(phi_q)[-1], static_shape(value_1)[-1]
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
    q, k, v = (_blocks(bb, x, b) for x in (phi_q, phi_k, value_1))
    swap_last = [0, 1, 2, 4, 3]
    scores = bb.emit(op.multiply(op.matmul(q, op.permute_dims(k, swap_last)), op.reshape(inside, [1, heads, 1, b, b])))
    acc = bb.emit(op.matmul(scores, v))  # [B, H, A, b, E]
    keyed = bb.emit(op.multiply(k, op.reshape(key_decay, [1, heads, 1, b, 1])))
    states = bb.emit(op.matmul(op.permute_dims(keyed, swap_last), v))  # [B, H, A, M, E]
    carried = bb.emit(op.matmul(op.reshape(across, [1, heads, chunks, chunks]),
                                op.reshape(states, [batch, heads, chunks, features * width])))
    carried = bb.emit(op.reshape(carried, [batch, heads, chunks, features, width]))
    read = bb.emit(op.multiply(q, op.reshape(query_decay, [1, heads, 1, b, 1])))
    return _ratio(bb, bb.emit(op.add(acc, op.matmul(read, carried))), n, head_size)


def _far_field(bb, query, key, value, rel_bias, bias, weight, fbias, kind, scale, causal, far_from):
    """The far-field form (``far_from``) in Relax: the computation of the ONNX body's
    ``_emit_far_field``, the neighbourhood weights and far-field factors from ``rel_bias`` by one
    TE kernel."""
    op = relax.op
    phi_q, phi_k, value_1 = _features(bb, query, key, value, bias, weight, fbias, kind, scale)
    batch, heads, n, head_size = static_shape(value)
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
    q, k, v = (_blocks(bb, x, b) for x in (phi_q, phi_k, value_1))

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
    return _ratio(bb, bb.emit(op.add(acc, op.matmul(q, far))), n, head_size)


def _fft(bb, query, key, value, rel_bias, bias, weight, fbias, kind, scale, causal):
    op = relax.op
    root = relax.const(np.float32(math.sqrt(scale)), "float32")
    phi_q = fm.features(bb, kind, bb.emit(op.multiply(query, root)), "query", weight, fbias)
    phi_k = fm.features(bb, kind, bb.emit(op.multiply(key, root)), "key", weight, fbias)
    batch, heads, n, head_size = static_shape(value)
    features = static_shape(phi_q)[-1]
    length = fft_length(n)
    weights = _key_weights(bb, bias, n)
    wr, wi = twiddles(length, FFT_DTYPE)
    twiddle_r, twiddle_i = relax.const(wr, FFT_DTYPE), relax.const(wi, FFT_DTYPE)
    spectrum_gv = bb.add_func(spectrum_kernel(heads, n, length, bool(causal)), "rpe_kernel_spectrum")
    spectrum = bb.emit(relax.call_tir(spectrum_gv, [rel_bias, twiddle_r, twiddle_i],
                                      relax.TensorType((2, heads, length), FFT_DTYPE)))
    kernel = attention_kernel(batch, static_shape(weights)[0], heads, n, features, head_size, length)
    attention_gv = bb.add_func(kernel, "rpe_fft_attention")
    return bb.emit(relax.call_tir(attention_gv, [phi_q, phi_k, value, weights, spectrum, twiddle_r, twiddle_i],
                                  relax.TensorType((batch, heads, n, head_size), "float32")))
