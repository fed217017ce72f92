"""Integer projections: calibration of ``Int8Linear`` (``projection:int8``).

One projection site ``y = x @ W + b`` becomes 7-bit symmetric per-channel weights times
uint8 activations (see :mod:`kernelize.ops.int8_linear` for the arithmetic and why 7 bits).
The fit, on the calibration tokens of the site:

1. **Smoothing** (SmoothQuant, Xiao et al. 2023): per input channel ``k``,
   ``s_k = max|x_k|^a / max|W_k|^(1-a)``; the operator multiplies ``x`` by ``1 / s`` and the
   weight rows are multiplied by ``s``, which leaves ``x @ W`` unchanged but moves outlier
   channels' range from the per-tensor activation scale into the per-channel weight scales.
   ``a`` is chosen among ``alphas`` (``None`` = no smoothing) by the error on the fitting
   tokens.
2. **Weights** rounded to 7 bits per output channel, by GPTQ (:func:`gptq`: each input
   row's rounding error compensated on the rows after it, on the calibration inputs; plain
   rounding with ``gptq=False``).
3. **Activations**: ``dynamic`` takes each call's range (as ``DynamicQuantizeLinear``); the
   fit simulates it per call (``rows_per_call`` consecutive rows: one calibration sample).
   ``static`` fixes scale and zero point from the calibration range (needs at least
   ``MIN_STATIC_TOKENS`` tokens).
4. **Closed-form corrections**: per output channel the scale and bias are refit by least
   squares so that ``acc * scale_x * weight_scale + bias`` matches ``x @ W + b`` (the mean
   of the rounding error goes into the bias).

``info`` carries the chosen ``alpha``, weight_bytes (int8 weights + scales + bias + input
scale) and dense_weight_bytes (fp32 W and b), and the relative error on the fitting tokens.
"""

from __future__ import annotations

import numpy as np

from kernelize import ops
from kernelize.errors import UsageError
from kernelize.methods.base import CapturedProjection, Fitted, Method, register
from kernelize.methods.projection import _least_squares_affine, relative_error
from kernelize.ops import int8_linear

ALPHAS = (None, 0.5, 0.65, 0.8)  # smoothing strengths tried (None: no smoothing)
MIN_STATIC_TOKENS = 256  # calibration tokens the static activation range is taken from


def gptq(weight: np.ndarray, x: np.ndarray, damp: float = 0.01, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """7-bit per-channel weights rounded one input row at a time, each row's rounding error
    pushed onto the rows not yet rounded so that ``x @ W`` changes least on the calibration
    inputs (GPTQ, Frantar et al. 2022: the inverse Hessian ``(x^T x + damp)^-1`` by its
    Cholesky factor, lazy updates in blocks of ``block`` rows). The per-channel scales are
    those of plain rounding. Returns (int8 ``[in, out]``, float32 scale ``[out]``)."""
    w = np.array(weight, np.float64)  # [in, out]: row i is input feature i
    _, scale = int8_linear.quantize_weight(w)
    scale = scale.astype(np.float64)
    x = np.asarray(x, np.float64)
    hessian = x.T @ x
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[dead] = 0.0
    hessian[np.diag_indices_from(hessian)] += damp * np.mean(np.diag(hessian))
    inverse = np.linalg.cholesky(np.linalg.inv(hessian)).T  # upper triangular
    q = np.empty_like(w)
    n = w.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        errors = np.empty((stop - start, w.shape[1]))
        for i in range(start, stop):
            q[i] = np.clip(np.round(w[i] / scale), -int8_linear.WEIGHT_MAX, int8_linear.WEIGHT_MAX)
            error = (w[i] - q[i] * scale) / inverse[i, i]
            w[i + 1:stop] -= np.outer(inverse[i, i + 1:stop], error)
            errors[i - start] = error
        w[stop:] -= inverse[start:stop, stop:].T @ errors
    return q.astype(np.int8), scale.astype(np.float32)


class Int8Method(Method):
    """``Int8Linear`` with the activations quantized as ``activation`` says unless the options
    name another; the instances are made from :data:`INT8_METHODS`."""

    kind = "projection"

    def __init__(self, name: str, activation: str):
        self.name, self.activation = name, activation

    def fit(self, captured: CapturedProjection, *, activation: str | None = None, alphas=ALPHAS, gptq: bool = True,
            **options):
        activation = self.activation if activation is None else activation
        if activation not in int8_linear.ACTIVATIONS:
            raise UsageError(f"projection:int8 activation must be one of {', '.join(int8_linear.ACTIVATIONS)}, "
                             f"not {activation!r}")
        x = np.asarray(captured.x, np.float32)
        if activation == "static" and len(x) < MIN_STATIC_TOKENS:
            raise UsageError(f"calibration has {len(x)} tokens at a projection, static int8 ranges need at least "
                             f"{MIN_STATIC_TOKENS}; pass more --calib samples or use dynamic activations")
        if not x.size:
            return "no calibration tokens at this site"
        weight = np.asarray(captured.weight, np.float64)
        exact = captured.exact()
        calls = captured.calls()
        best = None
        for alpha in alphas:
            fitted = self._fit_one(x, weight, exact, calls, activation, alpha, gptq)
            error = relative_error(self._evaluate(fitted, x, calls), exact)
            if best is None or error < best[0]:
                best = (error, fitted)
        error, fitted = best
        in_features, out = weight.shape
        fitted.info.update(
            weight_bytes=int(sum(a.nbytes for a in fitted.inputs if a is not None)),
            dense_weight_bytes=4 * in_features * out + (4 * out if captured.bias is not None else 0),
            calibration_rel_error=error)
        return fitted

    def _fit_one(self, x, weight, exact, calls, activation, alpha, use_gptq) -> Fitted:
        input_scale = None
        if alpha is not None:
            x_peak = np.max(np.abs(x), axis=0).astype(np.float64)
            w_peak = np.max(np.abs(weight), axis=1)
            smooth = np.where((x_peak > 0) & (w_peak > 0),
                              np.maximum(x_peak, 1e-5) ** alpha / np.maximum(w_peak, 1e-5) ** (1 - alpha), 1.0)
            input_scale = (1.0 / smooth).astype(np.float32)
            weight = weight * (1.0 / input_scale.astype(np.float64))[:, None]  # exactly what x loses
        xs = x * input_scale if input_scale is not None else x
        q, weight_scale = gptq(weight, xs) if use_gptq else int8_linear.quantize_weight(weight)
        attrs = {"activation": activation}
        op = ops.get("Int8Linear")
        if activation == "static":
            _, scale, zero = int8_linear.quantize_dynamic(xs)  # the calibration range, once
            attrs.update(act_scale=float(scale), act_zero_point=int(zero))
        z = np.empty((len(x), q.shape[1]))
        for part in calls:  # acc * activation scale, per call as the backends quantize
            xq, scale, zero = op.quantize(x[part], input_scale, **attrs)
            z[part] = int8_linear.accumulate(xq, zero, q) * np.float64(scale)
        scale, bias = _least_squares_affine(z, exact, weight_scale.astype(np.float64))
        inputs = [q, scale.astype(np.float32), bias.astype(np.float32), input_scale]
        return Fitted(self.name, "Int8Linear", attrs, inputs, {"activation": activation, "alpha": alpha})

    @staticmethod
    def _evaluate(fitted: Fitted, x: np.ndarray, calls) -> np.ndarray:
        return np.concatenate([fitted.reference(x[part]) for part in calls]).astype(np.float64)

    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        """Multiply-adds counted at a quarter (four int8 products per 32-bit lane), plus
        quantizing the input and the per-output epilogue."""
        tokens, in_features, out = shape["tokens"], shape["in_features"], shape["out_features"]
        return float(tokens * (in_features * out / 4 + 2 * in_features + out))


# name -> activation quantization. ``static``: one quantization pass less per call and, on
# MiniLM, a smaller error; refused (the site keeps the other candidates) where calibration has
# fewer than ``MIN_STATIC_TOKENS`` tokens.
INT8_METHODS = {"projection:int8": "dynamic", "projection:int8-static": "static"}
for _name, _activation in INT8_METHODS.items():
    register(Int8Method(_name, _activation))
