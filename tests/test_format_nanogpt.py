"""nanoGPT's ckpt.pt read as a transformers GPT-2 (workers/formats/nanogpt.py, mapping.py):
the checkpoints are written by nanoGPT's own model (tests/writers/nanogpt_model.py, its
model.py unchanged) with the keys its train.py saves, after AdamW steps of its own
configure_optimizers; the mapped model's forward equals nanoGPT's."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from layertrack.workers.errors import ArchitectureMissing, MappingIncomplete
from layertrack.workers.formats import mapping, nanogpt, torchsave
from writers import nanogpt_model  # nanoGPT's own model.py


def write_ckpt(path: Path, *, bias: bool, compiled: bool, seed: int = 0) -> nanogpt_model.GPT:
    """nanoGPT trained three steps and saved as its train.py saves (``raw_model.state_dict()``;
    a compiled model's keys carry ``_orig_mod.``)."""
    torch.manual_seed(seed)
    model_args = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=bias, vocab_size=384, dropout=0.0)
    model = nanogpt_model.GPT(nanogpt_model.GPTConfig(**model_args))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    for _ in range(3):
        x = torch.randint(0, 384, (4, 32))
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    raw_model = model
    if compiled:  # compiling wraps the model (its state dict's keys gain _orig_mod.); nothing runs compiled
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, on importing its compiler
            raw_model = torch.compile(model)
    torch.save({"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "model_args": model_args,
                "iter_num": 3, "best_val_loss": torch.tensor(5.9), "config": {"learning_rate": 1e-3}}, path)
    return model.eval()


@pytest.fixture(scope="module", params=[(True, False), (False, True)], ids=["bias", "no-bias-compiled"])
def written(request, tmp_path_factory):
    bias, compiled = request.param
    path = tmp_path_factory.mktemp("nanogpt") / "ckpt.pt"
    return path, write_ckpt(path, bias=bias, compiled=compiled)


def mapped_gpt2(path: Path, counted: list[int] | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    read_at, size = torchsave.local_reader(path)
    index = torchsave.read_index(read_at, size, str(path))
    assert nanogpt.is_nanogpt(index)
    config = nanogpt.architecture(index, str(path))
    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    targets = nanogpt.targets(index, config)
    mapping.check(targets, model.state_dict(), nanogpt.model_tensors(index), ignored=nanogpt.ignored(index))

    def read(name: str) -> torch.Tensor:
        t = index.tensors[nanogpt.source_name(name, index)]
        if counted is not None:
            counted.append(t.span)
        return torchsave.read_tensor(t, read_at)

    model.load_state_dict(mapping.materialize(targets, read), strict=True)
    return model.eval(), index


def test_the_mapped_gpt2_computes_what_nanogpt_computes(written):
    path, ours = written
    model, _ = mapped_gpt2(path)
    x = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(7))
    blocks: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: blocks.append(out)) for b in ours.transformer.h]
    with torch.no_grad():
        logits, _ = ours(x, torch.zeros_like(x))  # with targets, nanoGPT returns every position's logits
        hf = model(x, output_hidden_states=True)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(hf.logits, logits, rtol=0, atol=1e-5)
    for i, out in enumerate(blocks[:-1]):  # transformers' last hidden state is after ln_f
        torch.testing.assert_close(hf.hidden_states[i + 1], out, rtol=0, atol=1e-5)
    torch.testing.assert_close(hf.hidden_states[-1], ours.transformer.ln_f(blocks[-1]), rtol=0, atol=1e-5)


def test_the_model_is_read_without_the_optimizer_state(written):
    path, _ = written
    counted: list[int] = []
    _, index = mapped_gpt2(path, counted)
    model_bytes = sum({t.storage: t.nbytes for t in index.under("model.").values()}.values())
    assert path.stat().st_size > 2.5 * model_bytes  # AdamW's moments
    assert sum(counted) <= 1.1 * model_bytes


def test_tensors_left_unused_or_parameters_left_unfilled_fail_with_both_lists(tmp_path):
    path = tmp_path / "ckpt.pt"
    write_ckpt(path, bias=True, compiled=False)
    saved = torch.load(path, weights_only=True)
    saved["model"]["transformer.h.0.attn.rotary.inv_freq"] = torch.ones(8)  # a tensor GPT-2 has no place for
    saved["model_args"]["n_layer"] = 3  # an architecture with a block the checkpoint lacks
    torch.save(saved, path)
    with pytest.raises(MappingIncomplete) as e:
        mapped_gpt2(path)
    message = e.value.message
    assert e.value.code == "mapping_incomplete"
    assert "checkpoint tensors nothing uses: transformer.h.0.attn.rotary.inv_freq" in message
    assert "transformer.h.2.attn.c_attn.weight" in message and "--model-config" in message


def test_a_ckpt_without_model_args_names_the_option_that_gives_the_architecture(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"transformer.wte.weight": torch.zeros(4, 2)}, "model_args": {"n_layer": "two"}}, path)
    index = torchsave.read_index(*torchsave.local_reader(path), str(path))
    with pytest.raises(ArchitectureMissing, match="--model-config") as e:
        nanogpt.architecture(index, str(path))
    assert e.value.code == "architecture_missing"
