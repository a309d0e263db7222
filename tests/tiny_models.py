"""Tiny causal LMs of several families, built from transformers configs and saved as
safetensors checkpoint directories. Nothing is downloaded: the tokenizer is a small
byte-level BPE trained here on the built-in probe text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from layertrack.workers.probe import default_probe
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 384
HIDDEN = 32
LAYERS = 3


def config_for(family: str, *, hidden: int = HIDDEN, layers: int = LAYERS, vocab: int = VOCAB):
    heads = 4
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab,
            max_position_embeddings=512,
        )
    if family == "mistral":
        return MistralConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab,
            max_position_embeddings=512, sliding_window=None,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab,
            max_position_embeddings=512,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=512)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=512,
        )
    if family == "opt":
        return OPTConfig(
            hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=512,
            word_embed_proj_dim=hidden,
        )
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt")


def train_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the first 40 probe documents (the demo's recipe)."""
    from layertrack.service.demo import train_tokenizer as train

    return train(list(default_probe().documents[:40]), vocab)


def build_checkpoint(
    directory: Path,
    family: str,
    tokenizer: PreTrainedTokenizerFast | None,
    *,
    seed: int = 0,
    safe: bool = True,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """A random-init model of ``family`` saved as a checkpoint directory."""
    torch.manual_seed(seed)
    cfg = config_for(family, **overrides)
    if tokenizer is not None:
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if not safe:  # transformers 5 always writes safetensors: make a pickle checkpoint by hand
        for f in directory.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def tiny_lm(tokenizer, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = config_for("llama")
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def lm_examples(tokenizer, n: int = 64, seq_len: int = 32) -> list[dict[str, torch.Tensor]]:
    from layertrack.workers.probe import default_probe

    ids = tokenizer(" ".join(default_probe().documents[:20]))["input_ids"]
    out = []
    for i in range(n):
        chunk = torch.tensor(ids[i * seq_len:(i + 1) * seq_len])
        out.append({"input_ids": chunk, "labels": chunk.clone()})
    return out
