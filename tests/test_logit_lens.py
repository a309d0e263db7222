"""logit_lens_loss (``ScoreConfig.logit_lens``, ``--logit-lens``): each hidden state decoded
through the model's own final norm and LM head, the next token's cross-entropy averaged over
the scored positions, against the oracle (workers/reference.logit_lens_loss: the model's
hidden states all kept, the norm and the head applied by hand, float64)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from layertrack.workers import checkpoint as ckpt
from layertrack.workers import reference
from layertrack.workers.scoring import ScoreConfig, prepare, score_checkpoint
from services import layertrack_exe
from tiny_models import build_checkpoint

FINAL_NORM = {"llama": lambda lm: lm.model.norm, "gpt2": lambda lm: lm.transformer.ln_f}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_loss_matches_the_oracle(tmp_path, tokenizer, family):
    path = build_checkpoint(tmp_path / "m", family, tokenizer, seed=5)
    config = ScoreConfig(max_tokens=600, seq_len=64, batch_size=3, logit_lens=True, dtype="float32")
    result = score_checkpoint(str(path), config=config)
    got = [s.logit_lens_loss for s in result.scores.layers]
    tokens = prepare(str(path), config=config).tokens
    lm = ckpt.load_model(ckpt.inspect_checkpoint(path), dtype=torch.float32, with_lm_head=True)
    want = reference.logit_lens_loss(lm, FINAL_NORM[family](lm), torch.tensor(tokens.input_ids),
                                     torch.tensor(tokens.attention_mask), torch.tensor(tokens.score_mask))
    assert len(got) == len(result.scores.layers) == len(want)
    assert got == pytest.approx(want, rel=1e-5)
    assert all(math.isfinite(v) and v > 0 for v in got)
    assert result.timings["logit_lens_s"] >= 0
    # not asked for: not measured
    plain = score_checkpoint(str(path), config=ScoreConfig(max_tokens=600, seq_len=64, dtype="float32"))
    assert all(s.logit_lens_loss is None for s in plain.scores.layers)


def test_a_streamed_model_leaves_it_absent_with_the_reason(tmp_path, tokenizer):
    path = build_checkpoint(tmp_path / "m", "llama", tokenizer, seed=5)
    config = ScoreConfig(max_tokens=600, seq_len=64, logit_lens=True, execution="streamed")
    result = score_checkpoint(str(path), config=config)
    assert all(s.logit_lens_loss is None for s in result.scores.layers)
    assert any("logit_lens_loss is measured on resident models" in w for w in result.scores.warnings)


def test_layertrack_score_logit_lens_prints_the_column(tmp_path, tokenizer):
    path = build_checkpoint(tmp_path / "m", "llama", tokenizer, seed=5)
    args = [layertrack_exe(), "score", str(path), "--max-tokens", "600", "--seq-len", "64", "--quiet", "--logit-lens"]
    table = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "lens_loss" in table.stdout and "logit lens" in table.stdout
    out = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300).stdout)
    assert all(s["logit_lens_loss"] > 0 for s in out["layers"])
