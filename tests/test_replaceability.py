"""Linear replaceability (the paper's pruning experiment): a block that is exactly affine is
replaced by its fitted map at no cost, a block that does nothing is dropped at no cost, and a
block that matters costs loss when dropped."""

from __future__ import annotations

import pytest
import torch
from layertrack.workers.probe import default_probe, tokenize_probe
from layertrack.workers.scoring import (
    ScoreConfig,
    find_blocks,
    holdout_tokens,
    lm_loss,
    replaceability,
    score_checkpoint,
    score_model,
)
from layertrack.workers.streaming import BlockRunner
from tiny_models import tiny_lm


class AffineBlock(torch.nn.Module):
    """Stands in for a decoder block: h ↦ h·W + b, exactly affine."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(d, generator=g))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.w + self.b


def measure(lm, tokenizer, **kw):
    tokens = tokenize_probe(default_probe(), tokenizer, max_tokens=2048, seq_len=64)
    maps = {}
    scores, _ = score_model(lm.base_model, tokens, maps=maps)
    held, warnings = holdout_tokens(default_probe(), tokenizer, used=tokens, n_tokens=1024, seed=0)
    assert warnings == [] and held.n_tokens == 1024
    # the held-out sequences are not the scored ones
    assert not set(map(tuple, held.input_ids)) & set(map(tuple, tokens.input_ids))
    runner = BlockRunner(lm, find_blocks(lm), torch.device("cpu"))
    base, deltas = replaceability(runner, maps, held, final_norm=scores.pairs[-1].final_norm, **kw)
    return base, deltas, scores


def test_an_affine_block_is_replaced_exactly_and_a_block_doing_nothing_is_dropped_for_free(tokenizer):
    lm = tiny_lm(tokenizer).eval()
    d = lm.config.hidden_size
    lm.model.layers[1] = AffineBlock(d, seed=1)
    blk = lm.model.layers[0]  # block 0 adds nothing to the residual stream
    with torch.no_grad():
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()
    base, deltas, scores = measure(lm, tokenizer)
    assert base > 1.0
    lin0, drop0 = deltas[0]
    assert drop0 == 0.0 and abs(lin0) < 1e-6  # nothing to remove, nothing to fit
    lin1, drop1 = deltas[1]
    assert abs(lin1) < 1e-4  # the fitted map is the block
    assert abs(drop1) > 100 * max(abs(lin1), 1e-6)  # while dropping it does change the model
    assert scores.pairs[1].linearity == pytest.approx(1.0, abs=1e-6)
    assert deltas[2][0] is None and deltas[2][1] is not None  # the pair into the final norm: drop only


def test_a_trained_block_that_matters_costs_loss_when_dropped(tokenizer, tmp_path):
    """300 steps on probe sequences that are neither scored nor held out (those come first)."""
    lm = tiny_lm(tokenizer)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    every = tokenize_probe(default_probe(), tokenizer, max_tokens=None, seq_len=64)
    train = torch.tensor(every.input_ids[100:])
    g = torch.Generator().manual_seed(0)
    for _step in range(300):
        batch = train[torch.randint(0, train.shape[0], (16,), generator=g)]
        lm(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.eval()
    lm.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    result = score_checkpoint(str(tmp_path / "trained"), config=ScoreConfig(
        max_tokens=2048, seq_len=64, replaceability=True, holdout_tokens=1024))
    pairs = result.scores.pairs
    assert result.holdout["n_tokens"] == 1024
    assert result.holdout["intact_loss"] == pytest.approx(
        lm_loss(lm, holdout_tokens(default_probe(), tokenizer, used=tokenize_probe(
            default_probe(), tokenizer, max_tokens=2048, seq_len=64), n_tokens=1024, seed=0)[0]), rel=1e-5)
    assert pairs[0].loss_delta_drop > 0.05, [(p.loss_delta_linear, p.loss_delta_drop) for p in pairs]
    # a linear stand-in keeps more of the block than nothing at all
    assert pairs[0].loss_delta_linear < pairs[0].loss_delta_drop
    assert pairs[-1].final_norm and pairs[-1].loss_delta_linear is None and pairs[-1].loss_delta_drop is not None
    assert result.to_dict()["pairs"][0]["loss_delta_drop"] == pairs[0].loss_delta_drop


def test_score_cli_prints_the_replaceability_columns(checkpoints):
    import subprocess

    from services import layertrack_exe

    out = subprocess.run([layertrack_exe(), "score", str(checkpoints("llama")), "--max-tokens", "1024",
                          "--seq-len", "64", "--replaceability", "--holdout-tokens", "256", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Δloss_lin" in out.stdout and "Δloss_drop" in out.stdout
    assert "held-out LM loss (nats/token, 256 tokens" in out.stdout
