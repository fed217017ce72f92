"""FFT-RPE methods: kernelized attention with the site's Toeplitz relative-position bias
(``kernelize.RPEAttention``), one per feature map: ``rpe:elu``, ``rpe:relu``, ``rpe:favor``,
``rpe:hedgehog``.

They apply where the site's bias was proven Toeplitz (:mod:`kernelize.patterns.positional`):
``captured.rel_bias`` ([H, 2S - 1]) is the bias vector and ``captured.bias`` the remaining mask
(key padding, broadcastable to [N, 1, 1, S], or a causal mask that ``captured.causal``
describes). Feature parameters are those of the linear-attention methods: FAVOR+ random
projections, or hedgehog trained on the captured queries and keys (the relative bias is a
factor exp(c) outside the feature map, so the map is fitted to exp(q.k) as there).

A causal site whose bias the pattern proved linear in the offset (ALiBi) gets ``decay = 1``:
the backends then evaluate it as a chunked decay instead of by FFT (see the operator). A site
whose bias the pattern found constant beyond some offset w on each side (T5's clamped buckets)
gets ``far_from = w``: a band of exact Toeplitz weights plus a constant far field, no FFT.

``info["output_error"]``: relative (Frobenius) error of the fitted operator against exact
softmax attention with the same bias, on up to 4 captured samples.
"""

from __future__ import annotations

import math

import numpy as np

from kernelize.methods import linear
from kernelize.methods.base import CapturedAttention, Fitted, Method, exact_attention_cost, register
from kernelize.ops import attention, feature_maps
from kernelize.ops.rpe_attention import DECAY_CHUNK, MASKED, band_chunk, fft_length, toeplitz

ERROR_SAMPLES = 4
# the site inputs RPEAttention reads before its weights: the Toeplitz vector and the mask beside it
READS = ("query", "key", "value", "rel_bias", "mask")


def key_padding(captured: CapturedAttention) -> np.ndarray | None | str:
    """The captured mask as the operator's key-padding bias [N or 1, 1, 1, S]; a causal
    [.., S, S] mask is reduced to its last row (which sees every key); anything else that
    varies over queries is refused (a string)."""
    bias = captured.bias
    if bias is None:
        return None
    bias = np.asarray(bias, np.float32)
    s = captured.key.shape[-2]
    if bias.ndim != 4 or bias.shape[-1] != s:
        return f"mask of shape {list(bias.shape)} is not [batch, heads, seq, seq] broadcastable"
    if bias.shape[1] != 1:
        return "mask differs between heads"
    if bias.shape[2] == 1:
        return bias
    rows = bias.shape[2]
    below = np.tril(np.ones((rows, s), bool))
    last = bias[:, :, -1:, :]
    rows_agree = np.all(np.where(below, bias == last, True))  # on and below the diagonal
    above_masked = np.all(np.where(below, True, bias <= MASKED))
    if captured.causal and rows_agree and above_masked:
        return last
    if np.all(bias == last):
        return last
    return "mask varies over queries beyond a causal mask (not key padding)"


def exact_output(captured: CapturedAttention, rel_bias: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """softmax(Q K^T scale + T + padding [+ causal]) V in float64 (the shared reference; padding
    floored and the causal mask added at -1e9)."""
    s = captured.query.shape[-2]
    return attention.exact_attention(captured.query, captured.key, captured.value, padding, scale=captured.scale,
                                     causal=captured.causal, position=toeplitz(np.asarray(rel_bias, np.float64), s),
                                     bias_floor=-1e9, causal_bias=-1e9)


def decay_form(captured: CapturedAttention, rel_bias: np.ndarray) -> bool:
    """Whether the operator may evaluate the bias as a decay (``RPEAttention`` ``decay = 1``):
    causal, proven linear in the offset by the pattern (ALiBi), and not growing with distance."""
    if not (captured.causal and captured.rel_linear):
        return False
    n = captured.query.shape[-2]
    return bool(np.all(rel_bias[:, n - 1] >= rel_bias[:, max(n - 2, 0)]))


class RPEMethod(Method):
    """One RPE method: a name, its feature map and how the map's parameters are fitted (those
    of the linear-attention methods); the instances are made from :data:`RPE_METHODS`."""

    kind = "attention"
    reads = READS

    def __init__(self, name: str, feature_map: str, parameters=linear.no_parameters):
        self.name, self.feature_map, self.parameters = name, feature_map, parameters

    def fit(self, captured, features: int | None = None, seed: int = 0, steps: int | None = None,
            exact_below: int = 0, **options):
        if not isinstance(captured, CapturedAttention):
            return f"{self.name} applies to attention sites"
        rel_bias = getattr(captured, "rel_bias", None)
        if rel_bias is None:
            return "the site has no Toeplitz relative-position bias (see kernelize.patterns.positional)"
        s = captured.query.shape[-2]
        if captured.key.shape[-2] != s:
            return "a Toeplitz bias needs equal query and key lengths"
        rel_bias = np.asarray(rel_bias, np.float32)
        heads = captured.query.shape[1]
        if rel_bias.ndim != 2 or rel_bias.shape[-1] != 2 * s - 1 or rel_bias.shape[0] not in (1, heads):
            return f"rel_bias has shape {list(rel_bias.shape)}, expected [{heads}, {2 * s - 1}]"
        if rel_bias.shape[0] == 1:
            rel_bias = np.repeat(rel_bias, heads, axis=0)
        padding = key_padding(captured)
        if isinstance(padding, str):
            return padding
        info: dict = {"fft_length": fft_length(s)}
        plain = CapturedAttention(captured.query, captured.key, captured.value, padding, captured.scale,
                                  captured.causal)
        weight, fbias = self.parameters(plain, features, int(seed), steps, info)
        head_size = captured.query.shape[-1]
        attrs = {"feature_map": self.feature_map, "causal": int(bool(captured.causal)),
                 "scale": float(captured.scale), "exact_below": int(exact_below),
                 "decay": int(decay_form(captured, rel_bias))}
        attrs["far_from"] = 0 if attrs["decay"] else int(captured.rel_far_from)
        fitted = Fitted(self.name, "RPEAttention", attrs, [weight, fbias],
                        {"features": feature_maps.feature_count(self.feature_map, head_size, weight), **info},
                        reads=self.reads)
        sample = slice(0, ERROR_SAMPLES)
        part = plain.take(sample)
        approx = fitted.reference(part.query, part.key, part.value, rel_bias, part.bias).astype(np.float64)
        exact = exact_output(part, rel_bias, part.bias)
        fitted.info["output_error"] = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))
        fitted.info["rel_bias"] = "site"  # the operator's rel_bias input is the site's own value
        return fitted

    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        """Multiply-adds at ``shape``: feature projections, then per (batch, head) ceil(M/2) (D+1)
        complex columns, each a forward and an inverse radix-2 FFT of length N (N/2 log2 N
        butterflies of about 5 real multiply-adds), the spectrum product (4) and the contraction
        with phi(q) (2 per position); plus the kernel's own FFT per head."""
        b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_size"]
        if s < fitted.attrs.get("exact_below", 0):
            return exact_attention_cost(shape)
        weight = fitted.inputs[0] if fitted.inputs else None
        kind = fitted.attrs["feature_map"]
        m = feature_maps.feature_count(kind, d, weight)
        projection = 2.0 * b * h * s * d * int(np.shape(weight)[-1]) if kind in ("favor", "hedgehog") else 0.0
        if fitted.attrs.get("decay"):  # chunks of b: inside (M + D + 1) b per position, states, carry
            b_ = DECAY_CHUNK
            chunks = math.ceil(s / b_)
            decay = s * b_ * (m + d + 1) + 2 * s * m * (d + 1) + chunks * chunks * m * (d + 1)
            return projection + b * h * decay
        if fitted.attrs.get("far_from"):  # [b, 3b] neighbourhoods, chunk states and their sums
            b_ = band_chunk(fitted.attrs["far_from"])
            return projection + b * h * (3 * s * b_ * (m + d + 1) + 3 * s * m * (d + 1))
        n_fft = fft_length(s)
        columns = math.ceil(m / 2) * (d + 1)
        per_column = 2 * (n_fft / 2) * math.log2(n_fft) * 5 + 4 * n_fft + 2 * s
        kernel = h * (n_fft / 2) * math.log2(n_fft) * 5
        return projection + b * h * columns * per_column + kernel


# name -> (feature map, parameters); FAVOR+ defaults to head size features here (the FFT cost
# grows with M), hedgehog is trained as for ``linear:hedgehog``
RPE_METHODS = {
    "rpe:elu": ("elu", linear.no_parameters),
    "rpe:relu": ("relu", linear.no_parameters),
    "rpe:favor": ("favor", linear.favor_parameters(1)),
    "rpe:hedgehog": ("hedgehog", linear.hedgehog_parameters),
}
for _name, (_map, _parameters) in RPE_METHODS.items():
    register(RPEMethod(_name, _map, _parameters))
