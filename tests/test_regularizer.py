"""The consecutive-layer regulariser: its value by hand, gradients, and λ = 0 changing nothing."""

from __future__ import annotations

import math

import pytest
import torch
from layertrack.integrations.regularizer import consecutive_layer_penalty

H0 = [[1.0, 0.0], [0.0, 1.0]]
H1 = [[1.0, 1.0], [0.0, 2.0]]
H2 = [[0.0, 1.0], [1.0, 1.0]]
H3 = [[5.0, -3.0], [2.0, 7.0]]  # "after the final norm": left out by default


def states():
    return [torch.tensor([h]) for h in (H0, H1, H2, H3)]  # (batch 1, 2 tokens, d 2)


def by_hand(kind: str, tokens: list[int], pairs=((H0, H1), (H1, H2))) -> float:
    total = 0.0
    for prev, cur in pairs:
        per = []
        for t in tokens:
            a, b = prev[t], cur[t]
            if kind == "cosine":
                dot = sum(x * y for x, y in zip(a, b, strict=True))
                per.append(1 - dot / (math.hypot(*a) * math.hypot(*b)))
            else:
                per.append(sum((y - x) ** 2 for x, y in zip(a, b, strict=True)))
        total += sum(per) / len(per)
    return total


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_value_matches_a_hand_computation(kind):
    got = consecutive_layer_penalty(states(), kind=kind, lam=0.5)
    assert float(got) == pytest.approx(0.5 * by_hand(kind, [0, 1]), rel=1e-6)
    # with padding: only the real tokens count
    masked = consecutive_layer_penalty(states(), kind=kind, lam=0.5, attention_mask=torch.tensor([[1, 0]]))
    assert float(masked) == pytest.approx(0.5 * by_hand(kind, [0]), rel=1e-6)
    # the final-norm pair, when asked for
    everything = consecutive_layer_penalty(states(), kind=kind, lam=1.0, include_final_norm_pair=True)
    want = by_hand(kind, [0, 1], pairs=((H0, H1), (H1, H2), (H2, H3)))
    assert float(everything) == pytest.approx(want, rel=1e-6)
    assert by_hand("cosine", [0, 1]) == pytest.approx(1.5 - 1.5 / math.sqrt(2))  # the numbers themselves


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind must be one of cosine, mse"):
        consecutive_layer_penalty(states(), kind="l1")
    with pytest.raises(ValueError, match="at least two hidden states"):
        consecutive_layer_penalty(states()[:2])


def tiny_llama(seed=0):
    from tiny_models import config_for
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config_for("llama"))


def test_gradients_flow_into_every_block():
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, output_hidden_states=True)
    penalty = consecutive_layer_penalty(out.hidden_states, kind="cosine", lam=0.5)
    penalty.backward()
    # blocks 0 and 1 feed the pairs counted (block 2 only feeds the final-norm pair)
    for i in (0, 1):
        layer = model.model.layers[i]
        for w in (layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight):
            assert w.grad is not None and float(w.grad.abs().sum()) > 0
    assert float(model.model.embed_tokens.weight.grad.abs().sum()) > 0


def _train(tokenizer, tmp_path, trainer_cls, **extra):
    from tiny_models import lm_examples
    from transformers import TrainingArguments, default_data_collator

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                             logging_steps=1)
    trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=lm_examples(tokenizer, n=16),
                          data_collator=default_data_collator, **extra)
    trainer.train()
    return trainer


def test_lambda_zero_trains_exactly_like_the_plain_trainer_and_lambda_positive_does_not(tokenizer, tmp_path):
    from layertrack.integrations.regularizer import RegularizedTrainer
    from transformers import Trainer

    plain = _train(tokenizer, tmp_path / "plain", Trainer).model.state_dict()
    zero = _train(tokenizer, tmp_path / "zero", RegularizedTrainer, reg_lambda=0.0).model.state_dict()
    assert plain.keys() == zero.keys()
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    reg = _train(tokenizer, tmp_path / "reg", RegularizedTrainer, regularizer="mse", reg_lambda=0.5)
    assert not all(torch.equal(plain[k], v) for k, v in reg.model.state_dict().items())
    logged = [h["reg_penalty"] for h in reg.state.log_history if "reg_penalty" in h]
    assert len(logged) == 4 and all(v > 0 for v in logged)
