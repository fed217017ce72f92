"""Multiplication-free projections: calibration of ``ShiftAddLinear`` and ``LUTLinear``.

Both methods turn one projection site ``y = x @ W + b`` (``CapturedProjection``: calibration
activations ``x [tokens, in]``, constant ``W [in, out]``, ``b`` or None) into an operator call:

* ``projection:shiftadd`` (DeepShift / ShiftAddViT): every weight becomes ``scale_c`` times 1
  or 2 (``terms``) signed powers of two, the nearest value the operator's code can hold to
  ``W / scale`` (one term: ``+-2^-s``, ``s = 0..7``; two terms, 7 bits:
  ``+-2^-s1 (1 +- 2^-d)``, ``s1 = 0..7``, ``d = 1..4``; see ``kernelize.ops.shift_add_linear``).
  The starting ``scale`` per channel is the one of ``max|W_c| * {1/2 .. 1}`` (17 steps) whose
  rounded weights are nearest ``W_c`` (the grid of representable values is uneven, so the
  largest weight need not sit on 1). The activations' fixed-point format (``frac_bits``) is
  the finest at which the largest calibration activation fits ``act_bits``. Then ``scale``
  and ``bias`` are refit per channel by least squares on the calibration outputs through the
  exact integer path, which also absorbs the mean error of the kernels' floor shifts; codes,
  scale and bias are refit twice. An all-zero weight column gets scale 0.
* ``projection:lut`` (MADDNESS / LUT-NN): the input is split into subspaces of ``subspace``
  features; ``prototypes`` (K) per subspace by k-means on the calibration activations (seeded,
  k-means++ start; stored in float16, the tables fitted to those rounded values); the tables
  start as ``prototype . W_c`` and are refit by (ridge) least squares so that the sum of the
  looked-up rows matches ``x @ W`` on the calibration tokens; then quantized to int8 per output channel (one scale per channel, one offset per subspace
  and channel, summed with the bias into ``offset``), and ``offset`` refit by the mean
  calibration residual.

``info`` carries weight_bytes (the operator's constant inputs) and dense_weight_bytes (fp32
W and b), and the relative error on the calibration tokens.
"""

from __future__ import annotations

import numpy as np

from kernelize.errors import UsageError
from kernelize.methods.base import CapturedProjection, Fitted, Method
from kernelize.ops import lut_linear, shift_add_linear

MAX_FIT_TOKENS = 4096  # calibration tokens used by a fit (seeded subsample beyond that)


def _fit_tokens(x: np.ndarray, seed: int = 0) -> np.ndarray:
    if x.shape[0] <= MAX_FIT_TOKENS:
        return x
    pick = np.random.default_rng(seed).choice(x.shape[0], MAX_FIT_TOKENS, replace=False)
    return x[np.sort(pick)]


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """||approx - exact|| / ||exact|| (Frobenius)."""
    return float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))


def _dense_bytes(captured: CapturedProjection) -> int:
    in_features, out = captured.weight.shape
    return 4 * in_features * out + (4 * out if captured.bias is not None else 0)


# -- shift-add ------------------------------------------------------------------------------
SCALE_STEPS = np.linspace(0.5, 1.0, 17)  # starting scales tried, as fractions of max|W_c|


def representable(terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted values, signs [n, terms], shifts [n, terms]) of every value the operator's code
    for ``terms`` holds (one code per value)."""
    sign = np.array([1, -1])
    if terms == 1:
        signs = np.repeat(sign, 8)[:, None]
        shifts = np.tile(np.arange(8), 2)[:, None]
    else:  # term 1: sign, s1 = 0..7; term 2: same or opposite sign, s2 = s1 + 1..4
        s1, d, first, relative = (a.reshape(-1) for a in np.meshgrid(
            np.arange(shift_add_linear.MAX_SHIFT + 1), np.arange(1, shift_add_linear.MAX_DELTA + 1),
            sign, sign, indexing="ij"))
        signs, shifts = np.stack([first, first * relative], 1), np.stack([s1, s1 + d], 1)
    values = np.sum(signs * 2.0 ** -shifts, axis=1)
    values, pick = np.unique(values, return_index=True)
    return values, signs[pick], shifts[pick]


def _nearest_index(normalized: np.ndarray, values: np.ndarray) -> np.ndarray:
    right = np.clip(np.searchsorted(values, normalized), 1, len(values) - 1)
    left = right - 1
    return np.where(np.abs(normalized - values[left]) <= np.abs(values[right] - normalized), left, right)


def _nearest_codes(normalized: np.ndarray, terms: int) -> np.ndarray:
    """uint8 codes of the representable value nearest each entry of ``normalized [in, out]``."""
    values, signs, shifts = representable(terms)
    pick = _nearest_index(normalized, values)  # [in, out]
    return shift_add_linear.pack_codes(np.moveaxis(signs[pick], -1, 1), np.moveaxis(shifts[pick], -1, 1))


def _start_scale(weight: np.ndarray, terms: int) -> np.ndarray:
    """Per channel, the scale among ``SCALE_STEPS * max|W_c|`` with the least squared
    rounding error of the weights (1 for an all-zero column)."""
    values, _, _ = representable(terms)
    peak = np.max(np.abs(weight), axis=0)
    peak[peak == 0] = 1.0
    best_error, best = np.full(weight.shape[1], np.inf), peak.copy()
    for step in SCALE_STEPS:
        scale = peak * step
        error = np.sum((values[_nearest_index(weight / scale, values)] * scale - weight) ** 2, axis=0)
        better = error < best_error
        best_error[better], best[better] = error[better], scale[better]
    return best


class ShiftAddMethod(Method):
    name = "projection:shiftadd"
    kind = "projection"

    def fit(self, captured: CapturedProjection, *, terms: int = 2, act_bits: int = 16, **options):
        if terms not in (1, 2):
            raise UsageError(f"projection:shiftadd terms must be 1 or 2, not {terms}")
        x = _fit_tokens(np.asarray(captured.x, np.float32))
        weight = np.asarray(captured.weight, np.float64)
        in_features, out = weight.shape
        if 2.0 ** (act_bits - 1) * terms * in_features >= 2.0**31:
            return f"{in_features} input features overflow the int32 accumulator at act_bits={act_bits}"
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak == 0.0:
            return "calibration activations are all zero"
        frac_bits = int(np.clip(np.floor(np.log2((2.0 ** (act_bits - 1) - 1) / peak)), -16, 30))
        target = x.astype(np.float64) @ weight
        xq = shift_add_linear.quantize_activations(x, frac_bits, act_bits)
        scale = _start_scale(weight, terms)
        bias = np.zeros(out)
        for _ in range(2):
            codes = _nearest_codes(weight / scale, terms)
            z = shift_add_linear.accumulate(xq, codes, terms) * 2.0**-frac_bits  # [N, out]
            scale, bias = _least_squares_affine(z, target, scale)
        zero = ~np.any(weight, axis=0)  # (two terms cannot hold 0: switch such channels off)
        scale, bias = np.where(zero, 0.0, scale), np.where(zero, 0.0, bias)
        if captured.bias is not None:
            bias = bias + captured.bias
        scale, bias = scale.astype(np.float32), bias.astype(np.float32)
        attrs = {"terms": terms, "frac_bits": frac_bits, "act_bits": act_bits}
        fitted = Fitted(self.name, "ShiftAddLinear", attrs, [codes, scale, bias])
        exact = target + (captured.bias if captured.bias is not None else 0.0)
        fitted.info = {
            "terms": terms, "frac_bits": frac_bits,
            "weight_bytes": int(codes.nbytes + scale.nbytes + bias.nbytes),
            "dense_weight_bytes": _dense_bytes(captured),
            "calibration_rel_error": relative_error(fitted.reference(x), exact),
        }
        return fitted

    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        """One shift-add per weight term and token (counted like one multiply-add), plus the
        per-output dequantization."""
        tokens, in_features, out = shape["tokens"], shape["in_features"], shape["out_features"]
        return float(tokens * out * (in_features * fitted.attrs["terms"] + 1))


def _least_squares_affine(z: np.ndarray, target: np.ndarray, fallback_scale: np.ndarray):
    """Per column: (a, d) minimizing ||a z + d - target||; a = fallback where z is constant."""
    z_mean, t_mean = z.mean(axis=0), target.mean(axis=0)
    zc = z - z_mean
    var = np.sum(zc * zc, axis=0)
    cov = np.sum(zc * (target - t_mean), axis=0)
    ok = var > 1e-12 * np.maximum(np.sum(z * z, axis=0), 1e-300)
    scale = np.where(ok, cov / np.where(ok, var, 1.0), fallback_scale)
    scale = np.where(np.abs(scale) > 0, scale, fallback_scale)
    return scale, t_mean - scale * z_mean


# -- LUT ------------------------------------------------------------------------------------
def min_lut_tokens(prototypes: int) -> int:
    """Calibration tokens a LUT fit needs: 4 per prototype on average."""
    return 4 * prototypes


def kmeans(points: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means on every subspace at once: ``points [C, N, V]`` -> centroids ``[C, K, V]``
    (k-means++ start; an empty cluster takes the point farthest from its centroid)."""
    c, n, v = points.shape
    sub = np.arange(c)
    centroids = np.empty((c, k, v))
    centroids[:, 0] = points[sub, rng.integers(0, n, c)]
    nearest = np.sum((points - centroids[:, :1]) ** 2, axis=-1)  # [C, N]
    for j in range(1, k):
        weights = nearest / np.maximum(nearest.sum(axis=1, keepdims=True), 1e-300)
        cumulative = np.cumsum(weights, axis=1)
        pick = np.array([np.searchsorted(cumulative[s], rng.random() * cumulative[s, -1]) for s in range(c)])
        centroids[:, j] = points[sub, np.minimum(pick, n - 1)]
        nearest = np.minimum(nearest, np.sum((points - centroids[:, j:j + 1]) ** 2, axis=-1))
    for _ in range(iterations):
        distance = (np.sum(centroids**2, -1)[:, None, :]
                    - 2.0 * np.einsum("cnv,ckv->cnk", points, centroids))  # + |x|^2, same argmin
        assign = np.argmin(distance, axis=-1)  # [C, N]
        onehot = np.zeros((c, n, k))
        onehot[sub[:, None], np.arange(n)[None], assign] = 1.0
        counts = onehot.sum(axis=1)  # [C, K]
        sums = np.einsum("cnk,cnv->ckv", onehot, points)
        updated = sums / np.maximum(counts, 1)[..., None]
        empty = counts == 0
        if np.any(empty):
            far = np.argmax(np.min(distance, axis=-1), axis=1)  # per subspace
            updated[empty] = points[sub, far][np.nonzero(empty)[0]]
        if np.allclose(updated, centroids):
            centroids = updated
            break
        centroids = updated
    return centroids


class LUTMethod(Method):
    name = "projection:lut"
    kind = "projection"

    def fit(self, captured: CapturedProjection, *, subspace: int = 16, prototypes: int = 16,
            iterations: int = 25, ridge: float = 100.0, seed: int = 0, **options):
        x_all = np.asarray(captured.x, np.float32)
        tokens = x_all.shape[0]
        need = min_lut_tokens(prototypes)
        if tokens < need:
            raise UsageError(f"calibration has {tokens} tokens, LUT needs at least {need} for "
                             f"K={prototypes} prototypes; pass more --calib samples")
        weight = np.asarray(captured.weight, np.float64)
        in_features, out = weight.shape
        if in_features % subspace:
            return f"{in_features} input features do not split into subspaces of {subspace}"
        c, k, v = in_features // subspace, prototypes, subspace
        x = _fit_tokens(x_all, seed).astype(np.float64)
        n = x.shape[0]
        rng = np.random.default_rng(seed)
        centroids = kmeans(np.ascontiguousarray(x.reshape(n, c, v).transpose(1, 0, 2)), k, iterations, rng)
        protos = centroids.astype(np.float16)  # stored in half precision; used as these values
        codes = lut_linear.encode(x.astype(np.float32), protos)  # [N, C], as the operator encodes
        start = np.einsum("ckv,cvo->cko", protos.astype(np.float64), weight.reshape(c, v, out))
        target = x @ weight
        tables = _refit_tables(codes, target, start, ridge).reshape(c, k, out)
        quantized, scale, offset = _quantize_tables(tables)
        if captured.bias is not None:
            offset = offset + captured.bias
        exact = target + (captured.bias if captured.bias is not None else 0.0)
        approx = lut_linear.accumulate(codes, quantized) * scale + offset
        offset = offset + np.mean(exact - approx, axis=0)  # rounding of the tables, on average
        scale, offset = scale.astype(np.float32), offset.astype(np.float32)
        fitted = Fitted(self.name, "LUTLinear", {}, [protos, quantized, scale, offset])
        fitted.info = {
            "subspaces": c, "prototypes": k, "subspace": v,
            "weight_bytes": int(protos.nbytes + quantized.nbytes + scale.nbytes + offset.nbytes),
            "dense_weight_bytes": _dense_bytes(captured),
            "calibration_rel_error": relative_error(fitted.reference(x.astype(np.float32)), exact),
        }
        return fitted

    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        """Encoding (one multiply-add per feature and prototype) plus one add per subspace and
        output (the table lookups), per token."""
        protos, tables = fitted.inputs[0], fitted.inputs[1]
        c, k, _ = protos.shape
        tokens, in_features, out = shape["tokens"], shape["in_features"], shape["out_features"]
        return float(tokens * (in_features * k + c * out + out))


def _refit_tables(codes: np.ndarray, target: np.ndarray, start: np.ndarray, ridge: float) -> np.ndarray:
    """Tables ``[C*K, out]`` minimizing ``||G T - target||^2 + ridge ||T - start||^2`` where
    ``G [N, C*K]`` is the one-hot code matrix (one 1 per subspace)."""
    from scipy import sparse

    c, k, out = start.shape
    n = codes.shape[0]
    columns = (np.arange(c) * k)[None, :] + codes  # [N, C]
    onehot = sparse.csr_matrix((np.ones(n * c), columns.reshape(-1), np.arange(0, n * c + 1, c)),
                               shape=(n, c * k))
    gram = (onehot.T @ onehot).toarray()
    rhs = np.asarray(onehot.T @ target)
    gram[np.diag_indices_from(gram)] += ridge
    rhs += ridge * start.reshape(c * k, out)
    return np.linalg.solve(gram, rhs)


def _quantize_tables(tables: np.ndarray):
    """int8 tables with one scale per output channel and one offset per (subspace, channel):
    ``real = scale_j * (q + 128) + low_cj``; returns (q, scale, offset = sum_c low + 128 C scale)."""
    c = tables.shape[0]
    low = tables.min(axis=1)  # [C, out]
    span = (tables.max(axis=1) - low).max(axis=0)  # [out]
    scale = np.where(span > 0, span / 255.0, 1.0)
    q = np.clip(np.round((tables - low[:, None, :]) / scale) - 128, -128, 127).astype(np.int8)
    offset = low.sum(axis=0) + 128.0 * c * scale
    return q, scale, offset
