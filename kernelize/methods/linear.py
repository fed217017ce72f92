"""Linear (kernelized) attention methods: one per feature map of ``kernelize.LinearAttention``.

``linear:elu``, ``linear:relu`` and ``linear:cosformer`` have no parameters; ``linear:favor``
draws FAVOR+ orthogonal random projections (option ``features`` = M, ``seed``);
``linear:hedgehog`` trains its per-head map on the captured queries and keys (Zhang et al.
2024): ``W [H, D, M/2]`` and ``b [H, 1, M/2]`` start at the identity and zero and are fitted
with Adam (options ``features``, ``seed``, ``steps``) to minimise the cross-entropy between
the exact softmax attention rows and the normalized linear-attention rows
``phi(q) phi(k)^T / sum``, with the site's key mask and causality applied to both.

Every fit reports ``info["output_error"]``: the relative error (Frobenius norm) of the
fitted operator's output against exact softmax attention on (up to 4 of) the captured
samples.
"""

from __future__ import annotations

import math

import numpy as np

from kernelize.methods.base import CapturedAttention, Fitted, Method, exact_attention_cost, register
from kernelize.ops import attention, feature_maps
from kernelize.ops.linear_attention import CHUNK, EPSILON, key_keep

CAUSAL_BIAS = -1e9
HEDGEHOG_STEPS = 300
HEDGEHOG_QUERY_ROWS = 64  # query rows per Adam step (a fresh random subset each step) ...
HEDGEHOG_SAMPLES = 4  # ... of this many samples
HEDGEHOG_LEARNING_RATE = 0.02
ERROR_SAMPLES = 4


def exact_attention(captured: CapturedAttention) -> np.ndarray:
    """softmax(Q K^T scale + bias [+ causal mask]) V in float64 (the shared reference), the bias
    floored and the causal mask added at ``CAUSAL_BIAS`` (a row whose keys are all masked
    stays finite)."""
    return attention.exact_attention(captured.query, captured.key, captured.value, captured.bias,
                                     scale=captured.scale, causal=captured.causal, bias_floor=CAUSAL_BIAS,
                                     causal_bias=CAUSAL_BIAS)


def relative_error(fitted: Fitted, captured: CapturedAttention) -> float:
    """||Y_fitted - Y_exact||_F / ||Y_exact||_F on ``captured``."""
    exact = exact_attention(captured)
    approx = fitted.reference(captured.query, captured.key, captured.value, captured.bias).astype(np.float64)
    return float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-30))


# -- feature parameters, shared with the RPE methods -----------------------------------------
# ``parameters(captured, features, seed, steps, info) -> (feature_weight, feature_bias)``
def no_parameters(captured, features, seed, steps, info):
    """Parameter-free maps (elu, relu, cosformer): (None, None)."""
    return None, None


def favor_parameters(per_head: int):
    """Performer FAVOR+: ``features`` (default ``per_head`` x head size) orthogonal random
    features per head, drawn once with ``seed``."""
    def parameters(captured, features, seed, steps, info):
        heads, head_size = captured.query.shape[1], captured.query.shape[-1]
        count = int(features) if features else per_head * head_size
        info["seed"] = seed
        return feature_maps.favor_weight(head_size, count, heads, seed), None

    return parameters


def hedgehog_parameters(captured, features, seed, steps, info):
    """Hedgehog: a per-head softmax feature map trained on the captured queries and keys
    (``features`` = M, default 2 x head size, so W starts as the identity; ``steps`` Adam steps,
    default ``HEDGEHOG_STEPS``)."""
    return train_hedgehog(captured, int(features) if features else None, seed,
                          HEDGEHOG_STEPS if steps is None else int(steps), info)


class LinearMethod(Method):
    """One linear attention method: a name, its feature map and how the map's parameters are
    fitted; the instances are made from :data:`LINEAR_METHODS`."""

    kind = "attention"

    def __init__(self, name: str, feature_map: str, parameters=no_parameters):
        self.name, self.feature_map, self.parameters = name, feature_map, parameters

    def fit(self, captured, features: int | None = None, seed: int = 0, steps: int | None = None,
            exact_below: int = 0, **options):
        if not isinstance(captured, CapturedAttention):
            return f"{self.name} applies to attention sites"
        if captured.causal and captured.query.shape[-2] != captured.key.shape[-2]:
            return "causal linear attention needs equal query and key lengths"
        info: dict = {}
        weight, bias = self.parameters(captured, features, int(seed), steps, info)
        head_size = captured.query.shape[-1]
        count = 2 * head_size if self.feature_map == "cosformer" else feature_maps.feature_count(
            self.feature_map, head_size, weight)
        attrs = {"feature_map": self.feature_map, "causal": int(bool(captured.causal)),
                 "scale": float(captured.scale), "exact_below": int(exact_below)}
        fitted = Fitted(self.name, "LinearAttention", attrs, [weight, bias], {"features": count, **info})
        fitted.info["output_error"] = relative_error(fitted, captured.take(slice(0, ERROR_SAMPLES)))
        return fitted

    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        """Multiply-adds: feature projections (favor, hedgehog), then the non-causal
        ``phi(K)^T [V 1]`` and ``phi(Q) state``, or the causal chunks (``L x L`` inside each
        chunk, per-chunk states and their use)."""
        b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_size"]
        if s < fitted.attrs.get("exact_below", 0):
            return exact_attention_cost(shape)
        weight = fitted.inputs[0] if fitted.inputs else None
        kind = fitted.attrs["feature_map"]
        m = 2 * d if kind == "cosformer" else feature_maps.feature_count(kind, d, weight)
        projection = 0.0
        if kind in ("favor", "hedgehog"):
            projection = 2.0 * b * h * s * d * int(np.shape(weight)[-1])
        width = d + 1  # [V 1]
        if not fitted.attrs.get("causal"):
            return projection + 2.0 * b * h * s * m * width
        chunk = min(CHUNK, s)
        padded = -(-s // chunk) * chunk
        inside = b * h * padded * chunk * (m + width)
        states = 2.0 * b * h * padded * m * width
        return projection + inside + states


# name -> (feature map, parameters); FAVOR+ defaults to 4 x head size features here
LINEAR_METHODS = {
    "linear:elu": ("elu", no_parameters),
    "linear:relu": ("relu", no_parameters),
    "linear:cosformer": ("cosformer", no_parameters),
    "linear:favor": ("favor", favor_parameters(4)),
    "linear:hedgehog": ("hedgehog", hedgehog_parameters),
}
for _name, (_map, _parameters) in LINEAR_METHODS.items():
    register(LinearMethod(_name, _map, _parameters))


def train_hedgehog(captured: CapturedAttention, features: int | None, seed: int, steps: int,
                   info: dict) -> tuple[np.ndarray, np.ndarray]:
    """See :func:`_train_hedgehog`; runs torch on one thread (these tensors are small: on a
    busy 2-core machine two spinning threads made each step about 6 times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_hedgehog(captured, features, seed, steps, info)
    finally:
        torch.set_num_threads(threads)


def _train_hedgehog(captured: CapturedAttention, features: int | None, seed: int, steps: int,
                    info: dict) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``W [H, D, M/2]``, ``b [H, 1, M/2]`` (float32) on the captured queries and keys.

    Each Adam step takes random query rows of a few random samples (all keys), so a site at
    N=16, H=12, S=256 trains in seconds. Deterministic for a given ``seed``.
    """
    import torch

    n, heads, seq, head_size = captured.query.shape
    half = (features or 2 * head_size) // 2
    if half < 1:
        raise ValueError("hedgehog needs at least 2 features")
    root = math.sqrt(captured.scale)
    q = torch.from_numpy(np.asarray(captured.query, np.float32) * np.float32(root))
    k = torch.from_numpy(np.asarray(captured.key, np.float32) * np.float32(root))
    keep = mask = None
    if captured.bias is not None:
        keep = torch.from_numpy(np.swapaxes(key_keep(captured.bias), -1, -2).astype(np.float32))  # [., ., 1, Sk]
        mask = torch.from_numpy(np.maximum(np.asarray(captured.bias, np.float32), CAUSAL_BIAS))
    causal = torch.tril(torch.ones(seq, captured.key.shape[-2])) if captured.causal else None

    def target_rows(samples, rows):
        """Exact softmax attention rows (the teacher) of the given samples and query rows."""
        scores = q[samples][:, :, rows] @ k[samples].transpose(-1, -2)
        if mask is not None:
            m = mask[samples] if mask.shape[0] > 1 else mask
            scores = scores + (m[:, :, rows] if m.shape[2] > 1 else m)
        if causal is not None:
            scores = scores + (1.0 - causal[rows]) * CAUSAL_BIAS
        return torch.softmax(scores, -1)

    generator = torch.Generator().manual_seed(seed)
    weight = torch.eye(head_size, half).repeat(heads, 1, 1)
    if half > head_size:  # extra columns: small random directions
        weight[:, :, head_size:] = 0.1 * torch.randn(heads, head_size, half - head_size, generator=generator)
    weight.requires_grad_(True)
    bias = torch.zeros(heads, 1, half, requires_grad=True)

    def features_of(x):
        z = x @ weight + bias
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)

    def loss_on(samples, rows):
        """Mean cross-entropy -sum_j p_ij log p^_ij over the given samples and query rows."""
        phi_q = features_of(q[samples][:, :, rows])
        phi_k = features_of(k[samples])
        scores = phi_q @ phi_k.transpose(-1, -2)
        if keep is not None:
            scores = scores * (keep[samples] if keep.shape[0] > 1 else keep)
        if causal is not None:
            scores = scores * causal[rows]
        log_probs = torch.log(scores.clamp_min(1e-30)) - torch.log(scores.sum(-1, keepdim=True) + EPSILON)
        with torch.no_grad():
            p = target_rows(samples, rows)
        return -(p * log_probs).sum(-1).mean()  # log_probs is finite: masked entries add 0

    shown = (torch.arange(min(n, ERROR_SAMPLES)), torch.arange(seq))  # the samples the losses in info are on
    with torch.no_grad():
        info["loss_identity"] = float(loss_on(*shown))
    optimizer = torch.optim.Adam([weight, bias], lr=HEDGEHOG_LEARNING_RATE)
    for _ in range(steps):
        samples = torch.randperm(n, generator=generator)[:HEDGEHOG_SAMPLES]
        rows = torch.randperm(seq, generator=generator)[:HEDGEHOG_QUERY_ROWS]
        optimizer.zero_grad()
        loss = loss_on(samples, rows)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        info["loss"] = float(loss_on(*shown))
        p = target_rows(*shown)
        info["target_entropy"] = float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())
    info["steps"] = steps
    return weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32)
