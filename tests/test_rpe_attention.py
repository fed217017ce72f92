"""kernelize.RPEAttention: the FFT path (ONNX body with DFT, run by ONNX Runtime; TVM's TIR FFT
kernel) equals the direct O(n^2) kernelized-with-RPE computation (``reference``) within 1e-5
relative, over causal / non-causal, lengths that are no power of two, batch > 1, ALiBi and
T5-style biases, a key-padding mask, fitted (hedgehog) features and ``exact_below``; and stays
accurate where exp(bias) spans hundreds of orders of magnitude (ALiBi at long lengths).

One-node models are built as in ``tests/test_ops.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernelize import ops
from kernelize.ops import feature_maps as fm
from kernelize.ops import rpe_attention as rpe
from test_ops import assert_close, build, rng_for, run

OP = ops.get("RPEAttention")
HEADS, HEAD_SIZE = 3, 8


# -- relative-position biases ------------------------------------------------------------------
def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi's geometric slopes 2^(-8 k / heads), k = 1..heads (Press et al. 2022)."""
    return 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)


def alibi(n: int, heads: int = HEADS, slopes=None) -> np.ndarray:
    """c[h, j - i + n - 1] = -slope_h |j - i| ([H, 2n - 1])."""
    slopes = alibi_slopes(heads) if slopes is None else np.asarray(slopes)
    offsets = np.arange(-(n - 1), n)
    return (-slopes[:, None] * np.abs(offsets)[None, :]).astype(np.float32)


def t5_bucket(relative: np.ndarray, bidirectional: bool = True, buckets: int = 32, max_distance: int = 128):
    """T5's relative-position bucket of j - i (Raffel et al. 2020): exact buckets for small
    distances, logarithmic ones up to max_distance, clamped beyond."""
    result = np.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        result += (relative > 0) * buckets
        distance = np.abs(relative)
    else:
        distance = -np.minimum(relative, 0)
    exact = buckets // 2
    large = exact + (np.log(np.maximum(distance, 1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).astype(np.int64)
    large = np.minimum(large, buckets - 1)
    return result + np.where(distance < exact, distance, large)


def t5_bias(n: int, rng, heads: int = HEADS, bidirectional: bool = True) -> np.ndarray:
    table = rng.standard_normal((32, heads))  # learned-table scale: values within about +-3
    buckets = t5_bucket(np.arange(-(n - 1), n), bidirectional)
    return table[buckets].T.astype(np.float32)  # [H, 2n - 1]


def padding(batch: int, n: int) -> np.ndarray:
    mask = np.zeros((batch, 1, 1, n), np.float32)
    mask[-1, ..., n - n // 3:] = -1e9
    return mask


def case(batch: int, n: int, source: str = "alibi", causal: int = 0, mask: bool = False,
         feature_map: str = "elu", exact_below: int = 0, head_size: int = HEAD_SIZE):
    rng = rng_for("rpe", batch, n, source, causal, mask, feature_map, exact_below, head_size)
    q, k, v = (rng.standard_normal((batch, HEADS, n, head_size)).astype(np.float32) for _ in range(3))
    rel = alibi(n) if source == "alibi" else t5_bias(n, rng, bidirectional=not causal)
    weight = bias = None
    if feature_map == "hedgehog":
        weight = (rng.standard_normal((HEADS, head_size, 4)) * 0.5).astype(np.float32)
        bias = (rng.standard_normal((HEADS, 1, 4)) * 0.1).astype(np.float32)
    elif feature_map == "favor":
        weight = fm.favor_weight(head_size, 6, HEADS)
    args = [("query", q), ("key", k), ("value", v), ("rel_bias", rel),
            ("bias", padding(batch, n) if mask else None), ("feature_weight", weight), ("feature_bias", bias)]
    attrs = {"feature_map": feature_map, "causal": causal, "scale": head_size ** -0.5, "exact_below": exact_below}
    consts = {"feature_weight", "feature_bias"}
    return args, attrs, consts


def expected(args, attrs):
    return OP.reference(*[a for _, a in args], **attrs)


def run_onnx(args, attrs, consts):
    model, feeds, _ = build(OP, args, attrs, consts)
    return run(model, feeds)[0]


def run_tvm(args, attrs, consts=()):
    """(output, the built module's kernels -> schedule rule) of the one-node model on TVM CPU."""
    pytest.importorskip("tvm")
    from kernelize.backends import tvm as tvm_backend

    model, feeds, _ = build(OP, args, attrs, set(consts))
    built = tvm_backend.build(model, "cpu")
    return built.run(feeds)[0], built.schedules


# -- the reference itself ------------------------------------------------------------------------
def direct(q, k, v, rel, mask, causal, feature_map, weight=None, fbias=None, scale=None):
    """The defining formula, one query row at a time (independent of the vectorized reference)."""
    batch, heads, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros(v.shape)
    for b in range(batch):
        for h in range(heads):
            phi_q = fm.reference(feature_map, q[b, h] * math.sqrt(scale), "query", weight, fbias)
            phi_k = fm.reference(feature_map, k[b:b + 1, h:h + 1] * math.sqrt(scale), "key", weight, fbias)[0, 0]
            for i in range(n):
                js = np.arange(i + 1 if causal else n)
                logits = rel[h, js - i + n - 1].astype(np.float64)
                if mask is not None:
                    keep = mask[b if mask.shape[0] > 1 else 0, 0, 0, js] > -1e4
                    js, logits = js[keep], logits[keep]
                w = np.exp(logits - logits.max()) * (phi_k[js] @ phi_q[i])
                out[b, h, i] = w @ v[b, h, js] / w.sum()
    return out


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("source", ["alibi", "t5"])
def test_reference_is_the_defining_formula(causal, source):
    args, attrs, _ = case(2, 11, source, causal, mask=True)
    q, k, v, rel, mask = (a for _, a in args[:5])
    assert_close(expected(args, attrs), direct(q, k, v, rel, mask, causal, "elu"), what="reference")


def test_exact_below_is_softmax_attention_with_the_full_bias():
    args, attrs, _ = case(2, 9, "t5", causal=1, mask=True, exact_below=16)
    q, k, v, rel, mask = (a for _, a in args[:5])
    full = rpe.toeplitz(rel, 9)[None] + mask + np.triu(np.full((9, 9), -1e9), 1)
    softmax = ops.get("Attention").reference(q, k, v, full.astype(np.float32), scale=attrs["scale"])
    assert_close(expected(args, attrs), softmax, what="exact branch")


def test_only_key_padding_masks_are_taken():
    args, attrs, _ = case(1, 5)
    values = [a for _, a in args]
    values[4] = np.zeros((1, 1, 5, 5), np.float32)
    with pytest.raises(ValueError, match="key-padding"):
        OP.reference(*values, **attrs)


def test_fft_length_embeds_the_toeplitz_matrix():
    assert [rpe.fft_length(n) for n in (1, 2, 3, 5, 8, 9, 1000, 1024)] == [2, 4, 8, 16, 16, 32, 2048, 2048]


# -- ONNX body (DFT) ---------------------------------------------------------------------------
ONNX_CASES = [
    dict(batch=1, n=7),
    dict(batch=2, n=13, causal=1),
    dict(batch=2, n=13, mask=True),
    dict(batch=3, n=37, source="t5"),
    dict(batch=2, n=37, source="t5", causal=1, mask=True),
    dict(batch=2, n=16, feature_map="hedgehog", mask=True),
    dict(batch=1, n=21, feature_map="favor", causal=1),
    dict(batch=2, n=19, feature_map="relu", source="t5"),
    dict(batch=2, n=11, head_size=7, feature_map="elu"),  # odd feature count: one zero-padded pair
]


@pytest.mark.parametrize("kw", ONNX_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_onnx_body_matches_direct_computation(kw):
    args, attrs, consts = case(**kw)
    assert_close(run_onnx(args, attrs, consts), expected(args, attrs), what="ONNX body")


@pytest.mark.parametrize("n", [5, 12])
def test_onnx_exact_below_dispatch(n):
    args, attrs, consts = case(2, n, "t5", causal=1, mask=True, exact_below=8)
    actual = run_onnx(args, attrs, consts)
    assert_close(actual, expected(args, attrs), what=f"exact_below dispatch at n={n}")
    # below the threshold the exact branch ran: it differs from the kernelized one
    kernelized = OP.reference(*[a for _, a in args], **{**attrs, "exact_below": 0})
    assert (np.max(np.abs(actual - kernelized)) > 1e-3) == (n < 8)


def test_long_alibi_is_stable():
    """n = 1024 with slopes up to 0.5: exp(bias) spans exp(-511) ... 1 (far below float32's
    range); max subtraction keeps every factor in [0, 1]."""
    n = 1024
    rng = rng_for("long")
    q, k, v = (rng.standard_normal((1, 2, n, HEAD_SIZE)).astype(np.float32) for _ in range(3))
    rel = alibi(n, 2, slopes=[0.5, 1 / 256])
    for causal in (0, 1):
        args = [("query", q), ("key", k), ("value", v), ("rel_bias", rel)]
        attrs = {"feature_map": "elu", "causal": causal, "scale": HEAD_SIZE ** -0.5, "exact_below": 0}
        actual = run_onnx(args, attrs, set())
        assert np.all(np.isfinite(actual))
        assert_close(actual, expected(args, attrs), what=f"long ALiBi causal={causal}")


def increasing_alibi(n: int, slopes) -> np.ndarray:
    """MPT's and BLOOM's ALiBi as the pattern rebuilds it: c[d] = m d, peaking at d = n - 1, an
    offset a causal attention never sees."""
    return (np.asarray(slopes)[:, None] * np.arange(-(n - 1), n)[None, :]).astype(np.float32)


@pytest.mark.parametrize("decay", [0, 1])
def test_long_causal_alibi_peaking_at_a_masked_offset(decay):
    """c = m d at n = 1536, slope 0.5: subtracting the maximum of all of c would leave
    exp(-767) on every causal entry (zero in float64: the output was 0); the peak is taken
    over d <= 0. Checked against the row-by-row formula, and equal to the symmetric form."""
    n, slopes = 1536, [0.5, 1 / 256]
    rng = rng_for("increasing", decay)
    q, k, v = (rng.standard_normal((1, 2, n, HEAD_SIZE)).astype(np.float32) for _ in range(3))
    args = [("query", q), ("key", k), ("value", v), ("rel_bias", increasing_alibi(n, slopes))]
    attrs = {"feature_map": "elu", "causal": 1, "scale": HEAD_SIZE ** -0.5, "exact_below": 0, "decay": decay}
    want = expected(args, attrs)
    rows = slice(0, n, 97)
    assert_close(want[:, :, rows], direct(q, k, v, args[3][1], None, 1, "elu")[:, :, rows], what="reference")
    symmetric = OP.reference(q, k, v, alibi(n, 2, slopes=slopes), **{**attrs, "decay": 0})
    assert_close(want, symmetric, what="c = m d against c = -m |d| (causal)")
    assert_close(run_onnx(args, attrs, set()), want, what=f"ONNX body decay={decay}")


# -- the decay form (decay = 1) --------------------------------------------------------
DECAY_CASES = [
    dict(batch=1, n=1),
    dict(batch=1, n=7),  # shorter than one chunk
    dict(batch=2, n=64, mask=True),  # exactly one chunk
    dict(batch=2, n=150, feature_map="favor"),  # three chunks, the last one padded
    dict(batch=2, n=130, feature_map="hedgehog", mask=True),
    dict(batch=3, n=200, feature_map="relu", head_size=7),
]


@pytest.mark.parametrize("kw", DECAY_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_onnx_decay_form_matches_direct_computation(kw):
    args, attrs, consts = case(**kw, causal=1)
    attrs["decay"] = 1
    assert_close(run_onnx(args, attrs, consts), expected(args, attrs), what="ONNX decay form")


def test_decay_form_refuses_what_is_not_causal_alibi():
    args, attrs, _ = case(1, 9, "t5", causal=1)
    with pytest.raises(ValueError, match="ALiBi"):
        OP.reference(*[a for _, a in args], **{**attrs, "decay": 1})
    args, attrs, _ = case(1, 9, causal=0)
    with pytest.raises(ValueError, match="causal"):
        OP.reference(*[a for _, a in args], **{**attrs, "decay": 1})


# -- the far-field form (far_from = w) --------------------------------------------------------------
def t5_far_from(bidirectional: bool) -> int:
    """Where t5_bucket stops changing, found on a long range of offsets (independently of the
    pattern's own evaluation)."""
    d = np.arange(1, 1 << 14)
    w = 1
    for side in (d, -d):
        buckets = t5_bucket(side, bidirectional)
        changes = np.flatnonzero(buckets != buckets[-1])
        w = max(w, int(changes[-1]) + 2 if changes.size else 1)
    return w


FAR_CASES = [
    dict(batch=1, n=40),  # shorter than w: every key is in the band
    dict(batch=1, n=300),
    dict(batch=2, n=301, causal=1, mask=True),
    dict(batch=2, n=250, feature_map="favor"),
    dict(batch=2, n=500, mask=True, feature_map="hedgehog"),
]


def far_case(**kw):
    args, attrs, consts = case(source="t5", **kw)
    attrs["far_from"] = t5_far_from(bidirectional=not kw.get("causal"))
    return args, attrs, consts


@pytest.mark.parametrize("kw", FAR_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_onnx_far_field_form_matches_direct_computation(kw):
    args, attrs, consts = far_case(**kw)
    if not kw.get("causal"):
        assert attrs["far_from"] == 91  # T5's 32 buckets (16 a side), max_distance 128
    assert_close(run_onnx(args, attrs, consts), expected(args, attrs), what="ONNX far-field form")


def test_far_field_form_refuses_a_bias_that_keeps_changing():
    args, attrs, _ = case(1, 40)  # ALiBi: never constant
    with pytest.raises(ValueError, match="constant beyond"):
        OP.reference(*[a for _, a in args], **{**attrs, "far_from": 10})


@pytest.mark.parametrize("kw", FAR_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_tvm_far_field_form_matches_direct_computation(kw):
    args, attrs, consts = far_case(**kw)
    output, kernels = run_tvm(args, attrs, consts)
    assert_close(output, expected(args, attrs), what="TVM far-field form")
    assert "rpe_far_factors" in kernels and "rpe_fft_attention" not in kernels


# -- TVM (TIR FFT kernel) ------------------------------------------------------------------------
TVM_CASES = [
    dict(batch=2, n=13, mask=True),
    dict(batch=2, n=37, source="t5", causal=1, mask=True),
    dict(batch=1, n=16, feature_map="hedgehog", head_size=7),
    dict(batch=2, n=9, source="t5", causal=1, exact_below=12),
    dict(batch=2, n=21, head_size=16, mask=True),  # E = 17 >= 16 columns: the vectorized contraction
    # FAVOR+ key features span orders of magnitude (one stabilizer per head): in float32 the
    # transforms lost 2e-3 here; the kernel transforms in float64
    dict(batch=1, n=100, head_size=64, feature_map="favor"),
    # 10 feature pairs: two normalizer blocks (the second part padding); D = 20 is no multiple
    # of the block width (padded value lanes)
    dict(batch=2, n=33, head_size=20, feature_map="elu", causal=1, mask=True),
]


@pytest.mark.parametrize("kw", TVM_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_tvm_matches_direct_computation(kw):
    args, attrs, consts = case(**kw)
    output, kernels = run_tvm(args, attrs, consts)
    assert_close(output, expected(args, attrs), what="TVM")
    if not kw.get("exact_below"):
        assert "rpe_fft_attention" in kernels  # the hand-written kernel, not an exact fallback


def test_tvm_long_alibi_is_stable():
    n = 1000
    rng = rng_for("tvm-long")
    q, k, v = (rng.standard_normal((1, 2, n, HEAD_SIZE)).astype(np.float32) for _ in range(3))
    args = [("query", q), ("key", k), ("value", v), ("rel_bias", alibi(n, 2, slopes=[0.5, 1 / 256]))]
    attrs = {"feature_map": "elu", "causal": 1, "scale": HEAD_SIZE ** -0.5, "exact_below": 0}
    assert_close(run_tvm(args, attrs)[0], expected(args, attrs), what="TVM long ALiBi")
    # MPT's form c = m d (peak at a masked offset), by FFT and as a decay
    args[3] = ("rel_bias", increasing_alibi(n, [0.5, 1 / 256]))
    for decay in (0, 1):
        attrs["decay"] = decay
        assert_close(run_tvm(args, attrs)[0], expected(args, attrs), what=f"TVM c = m d, decay={decay}")


@pytest.mark.parametrize("kw", DECAY_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_tvm_decay_form_matches_direct_computation(kw):
    args, attrs, consts = case(**kw, causal=1)
    attrs["decay"] = 1
    output, kernels = run_tvm(args, attrs, consts)
    assert_close(output, expected(args, attrs), what="TVM decay form")
    assert "rpe_decay_factors" in kernels and "rpe_fft_attention" not in kernels
