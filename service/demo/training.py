"""The demo's model and training: the plan (sizes and steps), the log-spaced steps whose
checkpoints are posted, a small Llama, and one training phase with the Hugging Face
Trainer. torch and transformers are imported when a function needs them: the plans are
plain data (the CLI reads their defaults for its help)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Plan:
    hidden: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    n_saves: int
    vocab: int
    lr: float
    score_config: dict[str, Any]
    holdout_tokens: int


PLANS = {
    # 5.7 min on a 2-core CPU, everything included (docs/REPRODUCTION.md)
    "default": Plan(hidden=128, layers=8, heads=4, seq_len=128, batch=8, pretrain_steps=1000, finetune_steps=250,
                    n_saves=10, vocab=2048, lr=3e-3, score_config={"max_tokens": 8192, "seq_len": 128},
                    holdout_tokens=4096),
    # a smoke test: seconds. 5 blocks: 4 besides the one into the final norm, enough for the
    # Spearman correlations between linearity and replaceability to be numbers
    "short": Plan(hidden=32, layers=5, heads=4, seq_len=64, batch=4, pretrain_steps=8, finetune_steps=4,
                  n_saves=4, vocab=512, lr=3e-3, score_config={"max_tokens": 600, "seq_len": 64}, holdout_tokens=256),
}


def make_plan(*, short: bool = False, pretrain_steps: int | None = None, finetune_steps: int | None = None,
              hidden: int | None = None, layers: int | None = None) -> Plan:
    """The default (or short) plan with the given sizes; ValueError for an impossible one."""
    plan = dataclasses.replace(PLANS["short" if short else "default"])
    plan.score_config = dict(plan.score_config)
    if hidden:
        if hidden % plan.heads:
            raise ValueError(f"--hidden must be a multiple of {plan.heads} (the number of heads), not {hidden}")
        plan.hidden = hidden
    plan.pretrain_steps = pretrain_steps or plan.pretrain_steps
    plan.finetune_steps = finetune_steps or plan.finetune_steps
    plan.layers = layers or plan.layers
    return plan


def log_spaced(total: int, n: int) -> list[int]:
    """About ``n`` steps from 1 to ``total``, evenly spaced in log(step); always ends at total."""
    if total <= n:
        return list(range(1, total + 1))
    return sorted({max(1, round(math.exp(i * math.log(total) / (n - 1)))) for i in range(n)} | {total})


def build_model(plan: Plan, tokenizer):
    """A randomly initialised Llama of the plan's width and depth (untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=plan.hidden, intermediate_size=4 * plan.hidden, num_hidden_layers=plan.layers,
                      num_attention_heads=plan.heads, num_key_value_heads=plan.heads, vocab_size=len(tokenizer),
                      max_position_embeddings=max(256, plan.seq_len), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train_phase(*, model, tokenizer, data, out_dir: Path, steps: int, plan: Plan, save_at: list[int],
                callback, regularizer: str | None, lam: float, seed: int):
    """Train ``steps`` steps (AdamW, cosine schedule, 5 % warm-up), saving a checkpoint
    (``out_dir/checkpoint-STEP``) at each step of ``save_at``; ``callback`` (the layertrack
    Trainer callback) posts them. With ``regularizer``, the consecutive-layer penalty λ·Σ."""
    from layertrack.integrations.regularizer import RegularizedTrainer
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in save_at:
                control.should_save = True

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=plan.batch, learning_rate=plan.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no", save_only_model=True, report_to="none", use_cpu=True, seed=seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = RegularizedTrainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, processing_class=tokenizer,
        callbacks=[SaveAt(), callback], regularizer=regularizer or "cosine", reg_lambda=lam if regularizer else 0.0,
    )
    trainer.train()
    return trainer
