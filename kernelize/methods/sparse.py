"""Sparse attention methods: ``sparse:window``, ``sparse:block``, ``sparse:topk``.

Calibration picks the sparsity budget from attention-mass recall: the exact softmax rows are
computed on the captured Q, K (bias and causality respected), and each candidate of a grid
(window and sinks / block layout / k), cheapest first, is scored by the mean fraction of each
real (non-padding) query row's attention mass that its kept keys carry. The cheapest candidate
whose recall reaches ``recall`` (option, default 0.95) and whose kernel costs less than exact
attention at the captured length is chosen; otherwise ``fit`` returns the reason.

Options common to the three methods: ``recall`` (target, default 0.95), ``exact_below``
(default: the shortest sequence length at which the chosen kernel is cheaper than exact
attention, so shorter inputs run exact attention, which is then both exact and cheaper) and
the grid (``windows``/``sinks``, ``blocks``/``local_blocks``/``global_blocks``, ``ks``).
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Iterable

import numpy as np

from kernelize.methods.base import CapturedAttention, Fitted, Method, exact_attention_cost
from kernelize.ops.attention import attention_probabilities
from kernelize.ops.block_sparse_attention import MASKED_BIAS, block_sparse_allowed, block_sparse_cost
from kernelize.ops.sliding_window_attention import sliding_window_allowed, sliding_window_cost
from kernelize.ops.topk_attention import topk_cost

WINDOWS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SINKS = (0, 1, 4)
BLOCKS = (16, 32, 64, 128)
LOCAL_BLOCKS = (0, 1, 2, 3)
GLOBAL_BLOCKS = (0, 1, 2)
KS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def exact_probabilities(captured: CapturedAttention, sample: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax rows of one sample, float64 [H, S, Sk], and the [S] bool of its real query
    rows (a row is padding when its own key position is masked: the diagonal of the mask)."""
    q, k = captured.query[sample], captured.key[sample]
    heads, seq, seq_k = q.shape[0], q.shape[-2], k.shape[-2]
    real = np.ones(seq, bool)
    bias = None
    if captured.bias is not None:
        bias = captured.bias[sample if captured.bias.shape[0] == captured.query.shape[0] else 0]
        bias = np.broadcast_to(np.asarray(bias, np.float64), (heads, seq, seq_k))
        if seq == seq_k:
            real = np.diagonal(bias[0]) > MASKED_BIAS
    probs = attention_probabilities(q, k, bias, scale=captured.scale, causal=captured.causal, zero_empty=True)
    return probs, real


def shape_of(captured: CapturedAttention) -> dict[str, int]:
    n, h, s, d = captured.query.shape
    return {"batch": 1, "heads": h, "seq": s, "head_size": d}


def break_even(cost: Callable[[dict], float], shape: dict) -> int:
    """The shortest sequence length from which ``cost`` stays below exact attention."""
    length = shape["seq"]
    while length > 1 and cost({**shape, "seq": length - 1}) < exact_attention_cost({**shape, "seq": length - 1}):
        length -= 1
    return length


class _SparseGrid(Method):
    """Grid search over one operator's sparsity attributes, by cost, for attention-mass recall.

    Each concrete method names itself (which registers it) and provides ``candidates``,
    ``allowed`` and ``kernel_cost``."""

    name: ClassVar[str]
    kind = "attention"
    op: ClassVar[str]

    @abc.abstractmethod
    def candidates(self, seq: int, options: dict) -> Iterable[dict]:
        """The grid: attribute dicts (without scale/causal/exact_below)."""

    @abc.abstractmethod
    def allowed(self, attrs: dict, seq: int) -> np.ndarray | None:
        """[S, S] bool of the keys ``attrs`` keeps (None: not a fixed pattern)."""

    @abc.abstractmethod
    def kernel_cost(self, attrs: dict, shape: dict) -> float:
        """Multiply-adds of the operator's kernel at ``shape``."""

    def prepare(self, probs: np.ndarray) -> np.ndarray:
        """Per-sample form of the exact probabilities that :meth:`kept_mass` reads."""
        return probs

    def kept_mass(self, prepared: np.ndarray, attrs: dict) -> np.ndarray:
        """[H, S]: the attention mass of each row on the keys ``attrs`` keeps."""
        return np.sum(prepared * self.allowed(attrs, prepared.shape[-2]), axis=-1)

    def recalls(self, captured: CapturedAttention, grid: list[dict]) -> np.ndarray:
        """Mean kept mass over samples, heads and real query rows, for each candidate (the
        exact probabilities are computed once per sample)."""
        totals, count = np.zeros(len(grid)), 0
        for n in range(captured.query.shape[0]):
            probs, real = exact_probabilities(captured, n)
            prepared = self.prepare(probs)
            for c, attrs in enumerate(grid):
                totals[c] += float(np.sum(self.kept_mass(prepared, attrs)[:, real]))
            count += probs.shape[0] * int(np.sum(real))
        return totals / max(count, 1)

    def fit(self, captured, **options) -> Fitted | str:
        if captured.rel_bias is not None:
            return f"{self.name}: the site has a relative-position bias, which the sparse kernels do not take"
        if captured.query.shape[2] != captured.key.shape[2]:
            return f"{self.name}: sparse attention needs self-attention (query and key lengths differ)"
        target = float(options.get("recall", 0.95))
        shape = shape_of(captured)
        causal = int(bool(captured.causal))
        dense = exact_attention_cost(shape)
        grid = [dict(a, causal=causal) for a in self.candidates(shape["seq"], options)]
        grid = [a for a in grid if self.kernel_cost(a, shape) < dense]
        if not grid:
            return f"{self.name}: no candidate is cheaper than exact attention at sequence length {shape['seq']}"
        grid.sort(key=lambda a: self.kernel_cost(a, shape))
        recalls = self.recalls(captured, grid)
        reached = np.flatnonzero(recalls >= target)
        if not reached.size:
            best = int(np.argmax(recalls))
            settings = {k: v for k, v in grid[best].items() if k != "causal"}
            return (f"{self.name}: no candidate cheaper than exact attention at sequence length {shape['seq']} "
                    f"keeps {target:.0%} of the attention mass (best {settings}: recall {recalls[best]:.3f})")
        attrs, best_recall = grid[reached[0]], float(recalls[reached[0]])  # the cheapest that reaches it
        exact_below = options.get("exact_below")
        if exact_below is None:
            exact_below = break_even(lambda s: self.kernel_cost(attrs, s), shape)
        info = {**{k: v for k, v in attrs.items() if k != "causal"}, "recall": round(best_recall, 4),
                "recall_target": target, "cost_vs_exact": round(self.kernel_cost(attrs, shape) / dense, 4),
                "calibration_seq": shape["seq"]}
        return Fitted(method=self.name, op=self.op,
                      attrs={"scale": float(captured.scale), "exact_below": int(exact_below), **attrs},
                      inputs=[], info=info)

    def cost(self, fitted: Fitted, shape: dict[str, int]) -> float:
        if shape["seq"] < fitted.attrs.get("exact_below", 0):
            return exact_attention_cost(shape)
        return self.kernel_cost(fitted.attrs, shape)


class SlidingWindow(_SparseGrid):
    """``SlidingWindowAttention``: the smallest window (with 0, 1 or 4 sinks) that keeps the
    target attention mass."""

    name = "sparse:window"
    op = "SlidingWindowAttention"

    def candidates(self, seq, options):
        for window in options.get("windows", WINDOWS):
            if window < seq:
                for sinks in options.get("sinks", SINKS):
                    yield {"window": int(window), "sinks": int(sinks)}

    def allowed(self, attrs, seq):
        return sliding_window_allowed(seq, attrs["window"], attrs["sinks"], bool(attrs["causal"]))

    def kernel_cost(self, attrs, shape):
        return sliding_window_cost(attrs, shape)


class BlockSparse(_SparseGrid):
    """``BlockSparseAttention``: the cheapest (block, local_blocks, global_blocks) layout that
    keeps the target attention mass."""

    name = "sparse:block"
    op = "BlockSparseAttention"

    def candidates(self, seq, options):
        for block in options.get("blocks", BLOCKS):
            if block >= seq:
                continue
            for local in options.get("local_blocks", LOCAL_BLOCKS):
                for glob in options.get("global_blocks", GLOBAL_BLOCKS):
                    yield {"block": int(block), "local_blocks": int(local), "global_blocks": int(glob)}

    def allowed(self, attrs, seq):
        return block_sparse_allowed(seq, attrs["block"], attrs["local_blocks"], attrs["global_blocks"],
                                    bool(attrs["causal"]))

    def kernel_cost(self, attrs, shape):
        return block_sparse_cost(attrs, shape)


class TopK(_SparseGrid):
    """``TopKAttention``: the smallest k whose top-k keys keep the target attention mass."""

    name = "sparse:topk"
    op = "TopKAttention"

    def candidates(self, seq, options):
        for k in options.get("ks", KS):
            if k < seq:
                yield {"top_k": int(k)}

    def allowed(self, attrs, seq):
        return None  # the kept keys depend on the scores: see prepare and kept_mass

    def prepare(self, probs):
        """Each row's mass on its k best keys, for every k: cumulative sums of the sorted rows."""
        return np.cumsum(-np.sort(-probs, axis=-1), axis=-1)

    def kept_mass(self, prepared, attrs):
        return prepared[..., min(attrs["top_k"], prepared.shape[-1]) - 1]

    def kernel_cost(self, attrs, shape):
        return topk_cost(attrs, shape)
