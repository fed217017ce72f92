"""The two hand-written TIR kernels of RPEAttention's FFT form (used by
``lower/rpe_attention.py``; registers no operator): the kernel's spectrum per head, then per
(batch, head) task in parallel, blocks of ``BLOCK_COLUMNS`` complex columns through a radix-2
FFT: decimation in frequency forward, so the spectrum comes out bit-reversed, pointwise
product with the kernel's spectrum in the same order, decimation in time back, so no
permutation pass is needed; two radix-2 stages per pass over memory; columns innermost and
vectorized; stages on sub-FFTs of 2 ** ``LOCAL_LOG`` points run sub-block by sub-block, in
cache. A block holds either value columns of one feature pair (contiguous in v, contracted
into contiguous accumulator lanes) or the normalizer columns of up to ``BLOCK_COLUMNS`` pairs.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from kernelize.ops.rpe_attention import TINY

BLOCK_COLUMNS = 8  # complex columns per FFT block (two AVX2 vectors of float64)
FFT_DTYPE = "float64"  # of the transforms (see kernelize/ops/rpe_attention.py's docstring: precision)
LOCAL_LOG = 8  # stages on sub-FFTs of 2 ** LOCAL_LOG points run sub-block by sub-block (in cache)


def twiddles(length: int, dtype: str = "float32"):
    """exp(-2 pi i k / N) for k < N / 2, computed in float64, stored as ``dtype``."""
    angle = -2.0 * np.pi * np.arange(max(length // 2, 1)) / length
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def spectrum_kernel(heads: int, n: int, length: int, causal: bool):
    """TIR: rel_bias [H, 2n-1] -> FFT of the circulant's first column g, bit-reversed order,
    as [2 (re, im), H, N]; g = exp(c - max c) laid out as in the ONNX body's
    ``_emit_kernel_spectrum`` (kernelize/ops/rpe_attention.py)."""
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


def attention_kernel(batch: int, weight_rows: int, heads: int, n: int, features: int, head_size: int,
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
