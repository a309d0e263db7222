"""The metric engine: streamed sufficient statistics and exact per-layer scores.

Pure functions and one accumulator class over tensors; no I/O, no model. The metrics are
defined in docs/engine.md ("Metrics"); in short, for hidden states h_0 … h_L (each n × d over
the n probe tokens kept) and every consecutive pair X = h_i, Y = h_{i+1}:

    linearity        1 − min_A ‖X̃A − Ỹ‖²_F, X̃, Ỹ centred and Frobenius-normalised
                     = tr(C_yx C_xx⁺ C_xy) / tr(C_yy)               (C = centred Gram)
    linearity_nores  the same with Y replaced by D = Y − X
    cosine           mean over tokens of cos(x_t, y_t)
    norm_ratio       ‖Y − X‖_F / ‖X‖_F

and per hidden state i, from the eigenvalues λ of C_xx and the entries of h_i:

    anisotropy          λ_max / Σ λ
    effective_rank      exp(−Σ p_k log p_k), p_k = λ_k / Σ λ
    massive_activation  max |h| / median |h| over every entry (token × dimension); the
                        median from a histogram of log₂|h| (MASSIVE_BINS_PER_OCTAVE bins per
                        octave), within a relative MASSIVE_MEDIAN_RTOL of the exact one

Nothing of size n is kept. Per hidden state the accumulator keeps a pivot p (the mean of
the first batch), Σ(x − p) and Σ(x − p)(x − p)ᵀ; per pair, with D = Y − X formed token by
token in float64, Σ(d − q), Σ(x − p)(d − q)ᵀ and Σ‖d − q‖². Accumulating D directly is what
keeps ``linearity_nores`` exact when a block barely changes the stream (Y ≈ X): C_xy is then
recovered as C_xx + C_xd, a sum, never a difference of nearly equal terms. The pivots remove
the large means of massive-activation dimensions before anything is squared.

Precision: everything is accumulated, multiplied and solved in float64 by default. An
opt-in ``EngineConfig(gemm_precision="float32")`` runs the per-batch products in float32
(faster, notably on GPUs without fast float64) at a documented cost in accuracy.

Memory: (2·H − 1)·d² float64 numbers for H hidden states (H = L + 1), i.e.
``stats_bytes(H, d)``; independent of n. When that does not fit, ``plan_layer_groups``
splits the layers into groups that are accumulated in separate passes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import TooFewTokens
from .vocabulary import BASE_METRICS, LAYER_METRICS, MIN_TOKENS_PER_DIM, PAIR_METRICS, WARN_TOKENS_PER_DIM

#: Eigenvalues of the centred Gram matrix below RANK_RTOL · λ_max count as zero. Float64
#: round-off in an exactly rank-deficient Gram sits near 1e-16 · λ_max; real directions of
#: hidden states sit far above 1e-12 · λ_max.
RANK_RTOL = 1e-12
#: the median |h| of ``massive_activation`` is read from a histogram of log₂|h| with this
#: many bins per octave over [2^MASSIVE_LOG2_RANGE[0], 2^MASSIVE_LOG2_RANGE[1]) (values
#: outside fall in the end bins; exact zeros have a bin of their own). The median is taken as
#: the geometric middle of its bin: within MASSIVE_MEDIAN_RTOL of the exact median.
MASSIVE_BINS_PER_OCTAVE = 256
MASSIVE_LOG2_RANGE = (-32, 32)
MASSIVE_BINS = (MASSIVE_LOG2_RANGE[1] - MASSIVE_LOG2_RANGE[0]) * MASSIVE_BINS_PER_OCTAVE + 1  # + the zeros' bin
MASSIVE_MEDIAN_RTOL = 2 ** (1 / (2 * MASSIVE_BINS_PER_OCTAVE)) - 1  # 0.135 %


@dataclass(frozen=True)
class EngineConfig:
    rank_rtol: float = RANK_RTOL
    #: dtype of the per-batch Gram products. "float64" (default) is exact to the oracle.
    #: "float32" runs them in float32 on pivot-centred values (still accumulated and solved
    #: in float64): about 1.5x faster on a CPU and far faster on most GPUs, but float32
    #: rounding lifts near-null directions of X above the rank cut-off, so scores can move
    #: by ~1e-5 on ill-conditioned hidden states (measured in tests/test_engine.py).
    gemm_precision: str = "float64"
    #: refuse to score when n_tokens < min_tokens_per_dim · d (the fit would be trivial)
    min_tokens_per_dim: float = MIN_TOKENS_PER_DIM
    #: warn when n_tokens < warn_tokens_per_dim · d (chance level still high)
    warn_tokens_per_dim: float = WARN_TOKENS_PER_DIM


@dataclass
class PairScores:
    """Scores of the map from hidden state ``layer`` to hidden state ``layer + 1``."""

    layer: int
    linearity: float
    linearity_nores: float
    cosine: float
    norm_ratio: float
    #: True for the last pair when the last hidden state has the model's final norm applied
    final_norm: bool = False
    #: replaceability (optional analysis): held-out LM loss with block ``layer`` replaced by
    #: its fitted linear map, resp. dropped, minus the intact model's loss
    loss_delta_linear: float | None = None
    loss_delta_drop: float | None = None
    #: between checkpoints (optional): ‖W − W_prev‖_F / ‖W_prev‖_F of block ``layer``
    weight_update: float | None = None


@dataclass
class LayerScores:
    layer: int
    anisotropy: float
    effective_rank: float = float("nan")
    massive_activation: float = float("nan")
    #: the dimension of the largest |h| (of ``massive_activation``)
    massive_dim: int | None = None
    #: 1 − linear CKA against the same hidden state of an earlier checkpoint (None: not measured)
    drift_cka: float | None = None
    #: next-token cross-entropy of this hidden state through the final norm and the LM head
    #: (nats/token; None: not measured)
    logit_lens_loss: float | None = None


@dataclass
class Scores:
    n_tokens: int
    d: int
    chance: float
    pairs: list[PairScores]
    layers: list[LayerScores]
    warnings: list[str] = field(default_factory=list)

    def metric(self, name: str) -> list[float]:
        """One metric as a list indexed by layer (pairs are indexed by their first layer)."""
        if name in PAIR_METRICS:
            return [getattr(p, name) for p in self.pairs]
        if name in LAYER_METRICS:
            return [getattr(s, name) for s in self.layers]
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(BASE_METRICS)}")

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "d": self.d,
            "chance": self.chance,
            "warnings": list(self.warnings),
            "pairs": [vars(p).copy() for p in self.pairs],
            "layers": [vars(s).copy() for s in self.layers],
            #: per hidden state, the dimension of its largest |h| (massive_activation's)
            "massive_dims": [s.massive_dim for s in self.layers],
        }


@dataclass
class LinearMap:
    """The least-squares affine map of a block, fitted on the probe tokens (float64):
    y ≈ x + (x − x_mean) · A + d_mean, i.e. the residual D = Y − X regressed on X with an
    intercept (the minimum-norm solution when C_xx is rank deficient)."""

    layer: int
    a: torch.Tensor  # (d, d)
    x_mean: torch.Tensor  # (d,)
    d_mean: torch.Tensor  # (d,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(self.a.dtype)
        return (x64 + (x64 - self.x_mean) @ self.a + self.d_mean).to(x.dtype)


def stats_bytes(n_hidden: int, d: int) -> int:
    """Bytes of float64 statistics for ``n_hidden`` consecutive hidden states of width d."""
    return (2 * n_hidden - 1) * d * d * 8 + 8 * d * (2 * n_hidden + 2) + 8 * MASSIVE_BINS * n_hidden


def plan_layer_groups(n_hidden: int, d: int, budget_bytes: int | None) -> list[tuple[int, int]]:
    """Split hidden states 0 … n_hidden−1 into groups (first, last) that each fit the budget.

    Consecutive groups share one hidden state, so every pair belongs to exactly one group.
    A group holds at least two hidden states (one pair), whatever the budget.
    """
    if n_hidden < 2:
        raise ValueError("need at least two hidden states (one block) to score")
    if budget_bytes is None or stats_bytes(n_hidden, d) <= budget_bytes:
        return [(0, n_hidden - 1)]
    per_group = 2
    while per_group < n_hidden and stats_bytes(per_group + 1, d) <= budget_bytes:
        per_group += 1
    groups, first = [], 0
    while first < n_hidden - 1:
        last = min(first + per_group - 1, n_hidden - 1)
        groups.append((first, last))
        first = last
    return groups


class StreamingStats:
    """Accumulates the sufficient statistics of hidden states ``first … last``, batch by batch.

    Per batch, call ``add(i, h_i)`` for i = first, …, last in order, each h_i an (n_b, d)
    tensor over the same n_b kept tokens; the batch ends with h_last. ``scores()`` solves.
    """

    def __init__(
        self,
        d: int,
        first: int,
        last: int,
        *,
        device: torch.device | str = "cpu",
        gemm_precision: str = "float64",
        gram_blocks: int | None = None,
    ):
        if gemm_precision not in ("float32", "float64"):
            raise ValueError(f"gemm_precision must be float64 or float32, not {gemm_precision!r}")
        self.gemm_precision = gemm_precision
        if last <= first:
            raise ValueError("a group needs at least two hidden states")
        self.d, self.first, self.last = d, first, last
        # X̃ᵀX̃ is symmetric: only block rows of its upper triangle are multiplied (3 blocks
        # save a quarter of those flops); the lower triangle is filled in at solve time.
        b = gram_blocks or min(3, max(1, d // 128))
        edges = [round(i * d / b) for i in range(b + 1)]
        self._blocks = list(itertools.pairwise(edges))
        self.device, self.dtype = torch.device(device), torch.float64
        n_h = last - first + 1

        def zeros(*shape):
            return torch.zeros(*shape, device=self.device, dtype=self.dtype)

        self.n = 0
        # per hidden state (index j = i − first)
        self.pivot: list[torch.Tensor | None] = [None] * n_h
        self.sum_x = zeros(n_h, d)  # Σ (x − p)
        self.gram_x = [zeros(d, d) for _ in range(n_h)]  # Σ (x − p)(x − p)ᵀ
        self.sq_x = zeros(n_h)  # Σ ‖x‖²  (uncentred, for norm_ratio)
        self.abs_max = zeros(n_h)  # max |x| over every entry; abs_max_dim: the dimension it sits in
        self.abs_max_dim = torch.zeros(n_h, device=self.device, dtype=torch.int64)
        self.abs_hist = torch.zeros(n_h, MASSIVE_BINS, device=self.device, dtype=torch.int64)  # of log₂|x|
        # per pair (index j = i − first, pair i → i + 1)
        self.pivot_d: list[torch.Tensor | None] = [None] * (n_h - 1)
        self.sum_d = zeros(n_h - 1, d)  # Σ (d − q)
        self.cross_xd = [zeros(d, d) for _ in range(n_h - 1)]  # Σ (x − p)(d − q)ᵀ
        self.sq_dc = zeros(n_h - 1)  # Σ ‖d − q‖²
        self.cos_sum = zeros(n_h - 1)  # Σ cos(x_t, y_t)
        self._prev: torch.Tensor | None = None  # (n_b, d) float64: hidden state i − 1
        self._prev_c: torch.Tensor | None = None  # the same, minus its pivot, in GEMM dtype
        self._prev_norms: torch.Tensor | None = None
        self._next = first
        self._n_batch: int | None = None
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._slot = 0
        #: filled by ``scores(fit_maps=True)``: pair index (first layer) → its LinearMap
        self.maps: dict[int, LinearMap] = {}

    def add(self, layer: int, h: torch.Tensor) -> None:
        if layer != self._next:
            raise ValueError(f"hidden states must arrive in order: expected {self._next}, got {layer}")
        if h.ndim != 2 or h.shape[1] != self.d:
            raise ValueError(f"expected an (n, {self.d}) tensor, got {tuple(h.shape)}")
        if self._n_batch is None:
            self._n_batch = h.shape[0]
        elif h.shape[0] != self._n_batch:
            raise ValueError("every hidden state of a batch must cover the same tokens")
        j = layer - self.first
        n_b = h.shape[0]
        slot = self._slot = 1 - self._slot  # this layer's buffers; the other slot holds layer − 1
        x = self._buffer("x", slot, n_b)  # (n_b, d) float64
        x.copy_(h)
        if self.pivot[j] is None:
            self.pivot[j] = x.mean(0)
        xc = torch.sub(x, self.pivot[j], out=self._buffer("xc", slot, n_b))
        self.sum_x[j] += xc.sum(0)
        xg = xc.to(self._gemm_dtype)
        gram = self.gram_x[j]
        for s, e in self._blocks:
            if xg.dtype == gram.dtype:
                gram[s:e, s:].addmm_(xg[:, s:e].T, xg[:, s:])
            else:
                gram[s:e, s:] += xg[:, s:e].T @ xg[:, s:]
        self._abs_stats(j, x)
        norms = torch.linalg.vector_norm(x, dim=1)  # (n_b,) per-token norms, reused below
        self.sq_x[j] += torch.dot(norms, norms)
        if self._prev is not None:
            prev, prev_g, prev_norms = self._prev, self._prev_c, self._prev_norms
            k = j - 1
            if self.pivot_d[k] is None:
                self.pivot_d[k] = (x - prev).mean(0)
            dc = torch.sub(x, prev, out=self._buffer("dc", 0, n_b))  # D = Y − X formed in float64
            dc.sub_(self.pivot_d[k])  # D − q
            self.sum_d[k] += dc.sum(0)
            if xg.dtype == self.dtype:
                self.cross_xd[k].addmm_(prev_g.T, dc)
            else:
                self.cross_xd[k] += prev_g.T @ dc.to(xg.dtype)
            flat = dc.view(-1)
            self.sq_dc[k] += torch.dot(flat, flat)
            dots = torch.einsum("td,td->t", prev, x)
            tiny = torch.finfo(self.dtype).tiny
            self.cos_sum[k] += (dots / (prev_norms * norms).clamp_min(tiny)).sum()
        self._prev_norms = norms
        self._prev, self._prev_c = x, xg
        self._next = layer + 1
        if layer == self.last:
            self.end_batch()

    def fold(self, layer: int, h: torch.Tensor, prev: torch.Tensor | None = None) -> None:
        """Block-major feeding: fold hidden state ``layer`` of one batch, given ``prev``, the
        same tokens' hidden state ``layer − 1`` (folded earlier; None for ``first``).

        A streamed pass runs every batch through block i before any through block i + 1, so
        the batches of one hidden state arrive together instead of one batch's hidden states
        in a row (``add``). Each accumulator still sees the batches in the same order and the
        same float64 values, so the statistics are bitwise those of ``add``."""
        if not self.first <= layer <= self.last:
            raise ValueError(f"hidden state {layer} is outside this group ({self.first}…{self.last})")
        if (layer > self.first) != (prev is not None):
            raise ValueError("prev is the hidden state before ``layer``; give it for every layer after the first")
        j = layer - self.first
        self._prev = self._prev_c = self._prev_norms = None
        self._n_batch = None
        if prev is not None:
            if self.pivot[j - 1] is None:
                raise ValueError(f"hidden state {layer - 1} must be folded before {layer}")
            n_b = prev.shape[0]
            x = self._buffer("x", 0, n_b)
            x.copy_(prev)
            xc = torch.sub(x, self.pivot[j - 1], out=self._buffer("xc", 0, n_b))
            self._prev, self._prev_c = x, xc.to(self._gemm_dtype)
            self._prev_norms = torch.linalg.vector_norm(x, dim=1)
            self._n_batch = n_b
        self._slot = 0  # add() takes slot 1 for h; slot 0 holds prev
        self._next = layer
        self.add(layer, h)
        if layer < self.last:
            self._prev = self._prev_c = self._prev_norms = None
            self._n_batch = None

    def _abs_stats(self, j: int, x: torch.Tensor) -> None:
        """Fold a batch of hidden state j into its max |x| and its histogram of log₂|x|."""
        a = x.abs().view(-1)
        if a.numel() == 0:
            return
        top = torch.argmax(a)  # on the device: no synchronisation per batch
        better = a[top] > self.abs_max[j]
        self.abs_max[j] = torch.where(better, a[top], self.abs_max[j])
        self.abs_max_dim[j] = torch.where(better, top % self.d, self.abs_max_dim[j])
        lo, hi = MASSIVE_LOG2_RANGE
        bins = torch.log2(a).mul_(MASSIVE_BINS_PER_OCTAVE).floor_().clamp_(lo * MASSIVE_BINS_PER_OCTAVE,
                                                                            hi * MASSIVE_BINS_PER_OCTAVE - 1)
        index = (bins - lo * MASSIVE_BINS_PER_OCTAVE + 1).long()
        index[a == 0] = 0
        index.clamp_(0, MASSIVE_BINS - 1)  # (a NaN entry lands in the zeros' bin)
        self.abs_hist[j] += torch.bincount(index, minlength=MASSIVE_BINS)

    def _massive(self, j: int) -> float:
        """max |x| / median |x| of hidden state j (the lower median, as torch.median takes it)."""
        hist = self.abs_hist[j]
        total = int(hist.sum())
        if total == 0:
            return float("nan")
        rank = (total + 1) // 2  # the lower median is the rank-th smallest entry (1-based)
        b = int(torch.searchsorted(torch.cumsum(hist, 0), torch.tensor(rank, device=hist.device)))
        if b == 0:
            return float("nan")  # half the entries are exactly zero: the ratio is undefined
        lo = MASSIVE_LOG2_RANGE[0] * MASSIVE_BINS_PER_OCTAVE
        median = 2.0 ** ((lo + b - 1 + 0.5) / MASSIVE_BINS_PER_OCTAVE)
        return float(self.abs_max[j]) / median

    def _buffer(self, name: str, slot: int, n: int) -> torch.Tensor:
        """Work buffers reused from batch to batch (no allocator churn, flat peak memory)."""
        key = (name, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n:
            buf = self._buffers[key] = torch.empty(n, self.d, device=self.device, dtype=self.dtype)
        return buf[:n]

    @property
    def _gemm_dtype(self) -> torch.dtype:
        return torch.float32 if self.gemm_precision == "float32" else torch.float64

    def end_batch(self) -> None:
        if self._next not in (self.first, self.last + 1):
            raise ValueError(f"batch ended after hidden state {self._next - 1}, expected {self.last}")
        if self._n_batch is not None:
            self.n += self._n_batch
        self._prev = self._prev_c = self._prev_norms = None
        self._next = self.first
        self._n_batch = None

    def scores(
        self, config: EngineConfig = EngineConfig(), *, fit_maps: bool = False
    ) -> tuple[list[PairScores], list[LayerScores]]:
        """Solve every pair of the group in float64 (one eigendecomposition per hidden state).

        With ``fit_maps`` also keep each pair's least-squares affine map in ``self.maps``
        (d² float64 numbers per pair), for replacing a block by it.

        Consumes the statistics: each hidden state's matrices are freed as soon as its pair
        is solved, so the solve never needs more memory than the accumulation did.
        """
        n = self.n
        if n < 2:
            raise ValueError("no tokens were accumulated")
        self._buffers.clear()
        # tr(C_xx) of every hidden state, from the diagonals (complete in the stored triangle)
        traces = [
            float(torch.diagonal(g).sum() - self.sum_x[j].square().sum() / n) for j, g in enumerate(self.gram_x)
        ]
        layers: list[LayerScores] = []
        pairs: list[PairScores] = []
        for j in range(len(self.gram_x)):
            gram = self.gram_x[j]
            gram.triu_()
            gram += gram.triu(1).T  # the lower triangle, from the upper one
            s = self.sum_x[j]
            cxx = gram.sub_(torch.outer(s, s), alpha=1.0 / n)  # centred, in place
            lam, vec = torch.linalg.eigh(cxx)
            lam_max = float(lam[-1])
            anis = lam_max / traces[j] if traces[j] > 0 else float("nan")
            layers.append(LayerScores(layer=self.first + j, anisotropy=anis, effective_rank=_effective_rank(lam),
                                      massive_activation=self._massive(j), massive_dim=int(self.abs_max_dim[j])))
            if j < len(self.cross_xd):
                pairs.append(self._solve_pair(j, cxx, lam, vec, traces[j + 1], config, fit_maps))
                self.cross_xd[j] = None  # type: ignore[call-overload]
            self.gram_x[j] = None  # type: ignore[call-overload]
            del gram, cxx, lam, vec
        return pairs, layers

    def _solve_pair(self, k: int, cxx, lam, vec, tr_yy: float, config: EngineConfig, fit_maps: bool) -> PairScores:
        n = self.n
        cxd = self.cross_xd[k].sub_(torch.outer(self.sum_x[k], self.sum_d[k]), alpha=1.0 / n)
        cxy = cxx + cxd
        tr_dd = float(self.sq_dc[k] - self.sum_d[k].square().sum() / n)
        keep = lam > config.rank_rtol * max(float(lam[-1]), 0.0)
        if float(lam[-1]) <= 0:
            keep = torch.zeros_like(keep)
        vk, lk = vec[:, keep], lam[keep]
        lin = _explained(vk, lk, cxy, tr_yy)
        nores = _explained(vk, lk, cxd, tr_dd)
        if fit_maps:  # A = C_xx⁺ C_xd, intercept from the means
            a = vk @ ((vk.T @ cxd) / lk[:, None]) if lk.numel() else torch.zeros_like(cxd)
            self.maps[self.first + k] = LinearMap(
                self.first + k, a, self.pivot[k] + self.sum_x[k] / n, self.pivot_d[k] + self.sum_d[k] / n
            )
        sq_x = float(self.sq_x[k])
        # Σ‖d‖² = Σ‖d − q‖² + 2 qᵀΣ(d − q) + n‖q‖²  (all terms well conditioned)
        q = self.pivot_d[k]
        sq_d = float(self.sq_dc[k] + 2 * torch.dot(q, self.sum_d[k]) + n * torch.dot(q, q))
        return PairScores(
            layer=self.first + k,
            linearity=lin,
            linearity_nores=nores,
            cosine=float(self.cos_sum[k]) / n,
            norm_ratio=math.sqrt(max(sq_d, 0.0) / sq_x) if sq_x > 0 else float("nan"),
        )


def _effective_rank(lam: torch.Tensor) -> float:
    """exp of the entropy of the normalised spectrum (round-off's negative eigenvalues as 0)."""
    lam = lam.clamp_min(0)
    total = float(lam.sum())
    if not total > 0:
        return float("nan")
    p = lam[lam > 0] / total
    return math.exp(-float((p * p.log()).sum()))


def _explained(vk: torch.Tensor, lk: torch.Tensor, cxt: torch.Tensor, tr_tt: float) -> float:
    """tr(C_tx C_xx⁺ C_xt) / tr(C_tt): the share of the target's variance a linear map explains."""
    if not tr_tt > 0:
        return float("nan")  # the target does not vary: the score is undefined
    if lk.numel() == 0:
        return 0.0
    w = vk.T @ cxt  # (k, d_t)
    explained = float((w.square().sum(1) / lk).sum())
    return min(max(explained / tr_tt, 0.0), 1.0)


def check_token_count(n_tokens: int, d: int, config: EngineConfig = EngineConfig()) -> list[str]:
    """Refuse a probe too small for width d; return warnings when it is only small."""
    if n_tokens < config.min_tokens_per_dim * d:
        need = math.ceil(config.min_tokens_per_dim * d)
        raise TooFewTokens(
            f"only {n_tokens} probe tokens for hidden size d={d}: a linear fit of d dimensions "
            f"needs n_tokens >= {config.min_tokens_per_dim:g}*d = {need} to mean anything "
            f"(chance level d/(n-1) = {d / max(n_tokens - 1, 1):.3f}). Raise --max-tokens or "
            f"use a longer probe; {math.ceil(config.warn_tokens_per_dim * d)} tokens or more "
            "is recommended."
        )
    if n_tokens < config.warn_tokens_per_dim * d:
        return [
            f"n_tokens={n_tokens} is below {config.warn_tokens_per_dim:g}*d="
            f"{math.ceil(config.warn_tokens_per_dim * d)}: random data would already score "
            f"{d / (n_tokens - 1):.3f} (chance); read the linearity scores against that."
        ]
    return []


def score_hidden_states(
    hidden_states: Sequence[torch.Tensor],
    *,
    config: EngineConfig = EngineConfig(),
    final_norm: bool = False,
) -> Scores:
    """Score a list of hidden states (each (n, d), all in memory) with the streaming engine.

    A convenience for tests and small inputs: the statistics are accumulated in one batch.
    """
    if len(hidden_states) < 2:
        raise ValueError("need at least two hidden states")
    n, d = hidden_states[0].shape
    warnings = check_token_count(n, d, config)
    stats = StreamingStats(
        d, 0, len(hidden_states) - 1,
        device=hidden_states[0].device,
        gemm_precision=config.gemm_precision,
    )
    for i, h in enumerate(hidden_states):
        stats.add(i, h)
    pairs, layers = stats.scores(config)
    pairs[-1].final_norm = final_norm
    return Scores(n_tokens=n, d=d, chance=d / (n - 1), pairs=pairs, layers=layers, warnings=warnings)
