"""Plain float64 reference for the metric engine, written straight from the definitions in
docs/engine.md ("Metrics").

All hidden states in memory, one least-squares solve per pair. Slow and memory-hungry on
purpose: it is the oracle the streaming engine is tested against, not a code path jobs use.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .engine import MASSIVE_MEDIAN_RTOL, RANK_RTOL
from .vocabulary import LAYER_METRICS, PAIR_METRICS


def _centred_normalised(m: torch.Tensor) -> torch.Tensor:
    m = m.to(torch.float64).cpu()
    mc = m - m.mean(0, keepdim=True)
    return mc / torch.linalg.matrix_norm(mc)


def linearity(x: torch.Tensor, y: torch.Tensor, *, rank_rtol: float = RANK_RTOL) -> float:
    """1 − min_A ‖X̃A − Ỹ‖²_F with X̃, Ỹ centred and divided by their Frobenius norms.

    Least squares through the SVD of X̃ with singular values below √rank_rtol · σ_max
    dropped (the same cut-off as the engine's on the eigenvalues of X̃ᵀX̃).
    """
    xn, yn = _centred_normalised(x), _centred_normalised(y)
    u, s, vh = torch.linalg.svd(xn, full_matrices=False)
    keep = s > (rank_rtol**0.5) * s[0]
    a = vh[keep].T @ ((u[:, keep].T @ yn) / s[keep, None])  # pinv(X̃) Ỹ
    residual = xn @ a - yn
    return float(1.0 - residual.square().sum())


def linearity_lstsq(x: torch.Tensor, y: torch.Tensor, *, rank_rtol: float = RANK_RTOL) -> float:
    """The same score through LAPACK's gelsd (a second, independent solver)."""
    xn, yn = _centred_normalised(x), _centred_normalised(y)
    a = torch.linalg.lstsq(xn, yn, rcond=rank_rtol**0.5, driver="gelsd").solution
    return float(1.0 - (xn @ a - yn).square().sum())


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(torch.float64).cpu(), y.to(torch.float64).cpu()
    return float(torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-300).mean())


def norm_ratio(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(torch.float64).cpu(), y.to(torch.float64).cpu()
    return float(torch.linalg.matrix_norm(y - x) / torch.linalg.matrix_norm(x))


def anisotropy(x: torch.Tensor) -> float:
    x = x.to(torch.float64).cpu()
    xc = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(xc)
    return float(s[0] ** 2 / s.square().sum())


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of the centred hidden states."""
    x = x.to(torch.float64).cpu()
    lam = torch.linalg.svdvals(x - x.mean(0, keepdim=True)).square()
    p = lam[lam > 0] / lam.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def massive_activation(x: torch.Tensor) -> float:
    """max |h| / median |h| over every entry, the median exact (torch's lower median)."""
    a = x.to(torch.float64).cpu().abs().flatten()
    return float(a.max() / a.median())


def drift_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − linear CKA of two (n, d) hidden states over the same tokens, from the centred
    matrices themselves: ‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)."""
    x, y = x.to(torch.float64).cpu(), y.to(torch.float64).cpu()
    xc, yc = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    cka = torch.linalg.matrix_norm(xc.T @ yc) ** 2 / (torch.linalg.matrix_norm(xc.T @ xc)
                                                      * torch.linalg.matrix_norm(yc.T @ yc))
    return float(1 - cka)


def logit_lens_loss(lm: torch.nn.Module, final_norm: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, score_mask: torch.Tensor) -> list[float]:
    """The logit lens from its definition: the model's hidden states (``output_hidden_states``,
    all kept), each h_i for i < L through ``final_norm`` then the LM head (h_L has the final norm
    already: the head alone), and the mean cross-entropy of the next token, in float64, over
    the scored positions t whose token t + 1 is in the sequence."""
    with torch.no_grad():
        out = lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        head = lm.get_output_embeddings()
        hs = out.hidden_states
        scored = score_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
        target = input_ids[:, 1:][scored]
        losses = []
        for i, h in enumerate(hs):
            logits = head(h if i == len(hs) - 1 else final_norm(h)).to(torch.float64)
            losses.append(float(torch.nn.functional.cross_entropy(logits[:, :-1][scored], target)))
    return losses


#: the metrics the engine computes from a sketch rather than exactly, and the relative error
#: the sketch allows against this oracle
SKETCH_RTOL = {"massive_activation": MASSIVE_MEDIAN_RTOL}


def agrees(metric: str, got: float, want: float, abs_tol: float) -> bool:
    """Whether an engine value matches the oracle's: within ``abs_tol``, or, for a sketched
    metric, within its documented relative error."""
    return abs(got - want) <= abs_tol + SKETCH_RTOL.get(metric, 0.0) * abs(want)


def score_pairs(hidden_states: Sequence[torch.Tensor], *, rank_rtol: float = RANK_RTOL) -> dict:
    """Every metric for every pair / hidden state, as {metric: [value per layer]}, keyed by the
    vocabulary's metric names (a name the oracle does not define fails with a KeyError)."""
    hs = [h.to(torch.float64).cpu() for h in hidden_states]
    per_pair = [
        {
            "linearity": linearity(x, y, rank_rtol=rank_rtol),
            "linearity_nores": linearity(x, y - x, rank_rtol=rank_rtol),
            "cosine": cosine(x, y),
            "norm_ratio": norm_ratio(x, y),
        }
        for x, y in itertools.pairwise(hs)
    ]
    per_layer = [{"anisotropy": anisotropy(h), "effective_rank": effective_rank(h),
                  "massive_activation": massive_activation(h)} for h in hs]
    out = {name: [p[name] for p in per_pair] for name in PAIR_METRICS}
    out.update({name: [s[name] for s in per_layer] for name in LAYER_METRICS})
    return out
