"""A training checkpoint written by litgpt 0.5.13's own ``litgpt pretrain``: a tiny Llama-like litgpt
``Config`` (RMSNorm, LLaMAMLP, grouped-query attention with 4 query heads in 2 groups, full RoPE,
no biases, vocabulary 384 padded by litgpt to 512, untied head) trained three optimizer steps on CPU
by litgpt's own pretrain script (its CLI, its Fabric setup, its ``torch.compile``, GPT-NeoX init,
AdamW, warmup/cosine learning rate, gradient clipping and chunked cross-entropy), fed by the data
module below (random token rows), saving at every step as pretrain does:
``OUT/step-00000003/lit_model.pth`` (``fabric.save`` of pretrain's state: ``model``, ``optimizer``,
``train_dataloader``, ``iter_num``, ``step_count``), ``model_config.yaml`` (litgpt's ``save_config``)
and ``hyperparameters.yaml`` beside it; steps 1 and 2 and ``final/`` likewise.

The data module is the one thing of ours on litgpt's path: litgpt's own pretraining data modules
(TinyLlama, TextFiles, ...) read litdata's optimized shards, which this test does not build; like
theirs, its loader has ``state_dict`` (litdata's ``StreamingDataLoader`` has), so Fabric saves the
loader's state and not the loader.

It also writes ``OUT/oracle_forward.safetensors``: ``tokens`` (int64 [2, 32], seeded) and ``logits``
(float32 [2, 32, 512]) from litgpt's own ``GPT`` built from ``step-00000003/model_config.yaml``
(``Config.from_file``) and loaded with the checkpoint's model state, in eval mode.

And two untrained variants (litgpt's ``GPT`` with its own initialisation, the norms' weights moved off
one so that they count), each ``OUT/NAME/`` (``lit_model.pth`` + ``model_config.yaml`` by litgpt's
``save_config``) beside ``OUT/NAME.forward.safetensors`` (the same oracle):

``pythia``  a GPT-NeoX/Pythia-style Config (parallel residual, LayerNorm, GptNeoxMLP, biases,
            rotary_percentage 0.25, rope_condense_ratio 2), its state dict saved at the top level
            of the file, as ``litgpt convert_to_litgpt`` saves it;
``llama3``  a Llama Config with one query group (multi-query), head_size 48 (not n_embd / n_head),
            biases on the fused qkv alone (``attn_bias``), Llama-3 ``rope_adjustments`` and the
            head tied to the embedding as pretrain's ``train.tie_embeddings`` ties it, saved by
            ``fabric.save`` as ``{"model": model}`` (finetune_full's final save).

litgpt is not a dependency of the project: tests/framework_fixtures.py installs it into a private
directory and runs this with that directory on PYTHONPATH.

    python tests/writers/litgpt_llama.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset

VOCAB, SEQ, BATCH, STEPS = 384, 32, 2, 3
TOKENS_SEED = 1234
#: the litgpt Config, as ``--model_config`` takes it
MODEL_CONFIG = {
    "name": "tiny-llama-gqa", "block_size": 128, "n_layer": 2, "n_embd": 128, "n_head": 4, "n_query_groups": 2,
    "vocab_size": VOCAB, "padding_multiple": 512, "norm_class_name": "RMSNorm", "norm_eps": 1e-5,
    "mlp_class_name": "LLaMAMLP", "intermediate_size": 352, "parallel_residual": False, "bias": False,
    "rotary_percentage": 1.0, "rope_base": 500000,
}


class RandomRows(Dataset):
    """``rows`` rows of ``max_seq_length + 1`` random token ids (pretrain cuts inputs and targets from them)."""

    def __init__(self, rows: int, length: int, seed: int) -> None:
        self.data = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class StatefulLoader(DataLoader):
    """A DataLoader with ``state_dict`` (as litdata's StreamingDataLoader has, which pretrain's own data
    modules return): what Fabric saves as ``train_dataloader``."""

    def state_dict(self) -> dict:
        return {"num_samples_yielded": 0, "current_epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


class RandomTokens(DataModule):
    """A litgpt DataModule of random token rows."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.batch_size, self.max_seq_length = 1, SEQ

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None) -> None:
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length or SEQ

    def train_dataloader(self) -> DataLoader:
        rows = RandomRows(64, self.max_seq_length + 1, self.seed)
        return StatefulLoader(rows, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomRows(4, self.max_seq_length + 1, self.seed + 1), batch_size=self.batch_size)


def pretrain(out: Path) -> None:
    """``litgpt pretrain`` with the arguments a user gives it on the command line."""
    from litgpt.__main__ import main

    args = ["litgpt", "pretrain", "tiny-llama-gqa", "--out_dir", str(out), "--precision", "32-true",
            "--devices", "1", "--logger_name", "csv", "--seed", "0", "--optimizer", "AdamW",
            "--data", f"{__name__ if __name__ != '__main__' else 'litgpt_llama'}.RandomTokens",
            "--train.save_interval", "1", "--train.log_interval", "1",
            "--train.global_batch_size", str(BATCH), "--train.micro_batch_size", str(BATCH),
            "--train.max_tokens", str(STEPS * BATCH * SEQ), "--train.max_seq_length", str(SEQ),
            "--train.lr_warmup_steps", "1", "--train.max_norm", "1.0", "--train.min_lr", "1e-4",
            "--eval.interval", "1000", "--eval.max_iters", "1", "--eval.initial_validation", "false",
            "--eval.final_validation", "false"]
    for key, value in MODEL_CONFIG.items():
        args += [f"--model_config.{key}", str(value)]
    argv, sys.argv = sys.argv, args
    try:
        main()
    finally:
        sys.argv = argv


VARIANTS = {
    "pythia": {
        "name": "tiny-pythia", "block_size": 128, "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": VOCAB,
        "padding_multiple": 128, "norm_class_name": "LayerNorm", "mlp_class_name": "GptNeoxMLP",
        "intermediate_size": 512, "parallel_residual": True, "bias": True, "rotary_percentage": 0.25,
        "rope_condense_ratio": 2,
    },
    "llama3": {
        "name": "tiny-llama3-mqa", "block_size": 64, "n_layer": 2, "n_embd": 128, "n_head": 4, "n_query_groups": 1,
        "head_size": 48, "vocab_size": VOCAB, "padding_multiple": 64, "norm_class_name": "RMSNorm",
        "mlp_class_name": "LLaMAMLP", "intermediate_size": 256, "parallel_residual": False, "bias": False,
        "attn_bias": True, "rotary_percentage": 1.0, "rope_base": 10000,
        "rope_adjustments": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_seq_len": 16},
    },
}


def forward_oracle(checkpoint: Path, file: Path) -> None:
    """``tokens`` and the logits of litgpt's own GPT built and loaded from ``checkpoint``, in eval mode."""
    from litgpt import GPT, Config
    from safetensors.torch import save_file

    model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    saved = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    state = saved.get("model", saved)  # as litgpt's convert_lit_checkpoint reads either layout
    if model.config.name == VARIANTS["llama3"]["name"]:
        model.transformer.wte.weight = model.lm_head.weight  # tied as it was trained
    model.load_state_dict(state, strict=True)
    model.eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(TOKENS_SEED))
    with torch.no_grad():
        logits = model(tokens).float()
    assert torch.isfinite(logits).all()
    save_file({"tokens": tokens, "logits": logits.contiguous()}, str(file))


def write_variants(out: Path) -> None:
    import lightning as L
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    for seed, (name, fields) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        model = GPT(Config(**fields))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or "ln_f" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        directory = out / name
        directory.mkdir(parents=True)
        if name == "pythia":  # convert_to_litgpt: the state dict at the top level
            torch.save(model.state_dict(), directory / "lit_model.pth")
        else:  # finetune_full's final save, with pretrain's tie_embeddings
            model.transformer.wte.weight = model.lm_head.weight
            fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
            fabric.save(directory / "lit_model.pth", {"model": fabric.setup(model)})
        save_config(model.config, directory)
        forward_oracle(directory, out / f"{name}.forward.safetensors")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # the data module by its import path, for litgpt's CLI
    out = Path(sys.argv[1])
    pretrain(out)
    forward_oracle(out / f"step-{STEPS:08d}", out / "oracle_forward.safetensors")
    write_variants(out)
