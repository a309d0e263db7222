"""The paper's consecutive-layer regulariser, as a training utility.

"Your Transformer is Secretly Linear" (arXiv 2405.12250, §5) adds to the language-model loss
a term that ties the hidden states of consecutive layers together:

    cosine:  λ · Σ_i mean_t (1 − cos(h_i[t], h_{i−1}[t]))
    mse:     λ · Σ_i mean_t ‖h_i[t] − h_{i−1}[t]‖²

over the hidden states h_0 … h_L of ``output_hidden_states=True`` (h_0 the embeddings) and
the real (unpadded) tokens t. By default the last pair is left out: in Hugging Face models
h_L has the final norm applied, so h_{L−1} → h_L is not a block (pass
``include_final_norm_pair=True`` to keep it).

From a plain loop::

    out = model(**batch, output_hidden_states=True)
    loss = out.loss + consecutive_layer_penalty(out.hidden_states, kind="cosine", lam=0.5,
                                                attention_mask=batch.get("attention_mask"))

From a ``transformers.Trainer``: use ``RegularizedTrainer(..., regularizer="cosine",
reg_lambda=0.5)`` in its place. With λ = 0 it trains exactly like ``Trainer``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

KINDS = ("cosine", "mse")


def consecutive_layer_penalty(
    hidden_states: Sequence[torch.Tensor],
    *,
    kind: str = "cosine",
    lam: float = 0.5,
    attention_mask: torch.Tensor | None = None,
    include_final_norm_pair: bool = False,
) -> torch.Tensor:
    """λ · Σ over consecutive pairs of the per-token penalty, averaged over real tokens."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    states = list(hidden_states)
    if not include_final_norm_pair:
        states = states[:-1]
    if len(states) < 2:
        raise ValueError("need at least two hidden states (one block) for the penalty")
    weight = None
    if attention_mask is not None:
        weight = attention_mask.to(states[0].dtype)
        weight = weight / weight.sum().clamp_min(1)
    total = states[0].new_zeros(())
    for prev, cur in itertools.pairwise(states):
        if kind == "cosine":
            per_token = 1 - torch.nn.functional.cosine_similarity(cur, prev, dim=-1, eps=1e-8)
        else:
            per_token = (cur - prev).square().sum(-1)
        total = total + (per_token.mean() if weight is None else (per_token * weight).sum())
    return lam * total


def _trainer_class():
    from transformers import Trainer

    class RegularizedTrainer(Trainer):
        """A ``transformers.Trainer`` whose loss adds ``consecutive_layer_penalty``.

        Extra arguments: ``regularizer`` ("cosine" | "mse") and ``reg_lambda`` (λ). The
        penalty's value is logged as ``reg_penalty`` (the mean over the logging interval).
        """

        def __init__(self, *args, regularizer: str = "cosine", reg_lambda: float = 0.5, **kwargs):
            if regularizer not in KINDS:
                raise ValueError(f"regularizer must be one of {', '.join(KINDS)}, not {regularizer!r}")
            if reg_lambda < 0:
                raise ValueError(f"reg_lambda must be >= 0, got {reg_lambda}")
            super().__init__(*args, **kwargs)
            self.regularizer, self.reg_lambda = regularizer, reg_lambda
            self._penalties: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.reg_lambda == 0:  # exactly the plain Trainer
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = super().compute_loss(model, {**inputs, "output_hidden_states": True},
                                                 return_outputs=True, num_items_in_batch=num_items_in_batch)
            penalty = consecutive_layer_penalty(outputs.hidden_states, kind=self.regularizer, lam=self.reg_lambda,
                                                attention_mask=inputs.get("attention_mask"))
            self._penalties.append(float(penalty.detach()))
            loss = loss + penalty
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if self._penalties and "loss" in logs:
                logs["reg_penalty"] = sum(self._penalties) / len(self._penalties)
                self._penalties = []
            super().log(logs, start_time)

    return RegularizedTrainer


def __getattr__(name: str):
    if name == "RegularizedTrainer":  # transformers is imported only when it is asked for
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
