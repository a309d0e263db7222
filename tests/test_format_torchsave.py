"""torch.save files read from their pickle and zip directory (workers/formats/torchsave.py): a
nanoGPT-style ``ckpt.pt`` (the keys its train.py saves, a compiled model's ``_orig_mod.``
prefixes, AdamW state) read for the model's tensors only; the oracle is ``torch.load``."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from layertrack.workers.errors import FormatUnsupported, MalformedWeights, PickleRefused
from layertrack.workers.formats import torchsave


def _nanogpt_like(path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "wte": torch.nn.Embedding(384, 64), "h0": torch.nn.Linear(64, 192), "ln_f": torch.nn.LayerNorm(64),
        "lm_head": torch.nn.Linear(64, 384, bias=False)})
    model["lm_head"].weight = model["wte"].weight  # tied, as nanoGPT ties them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model["h0"](model["wte"](torch.tensor([[1, 2, 3]]))).sum().backward()
    opt.step()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.bf16_view"] = torch.randn(8, 6).to(torch.bfloat16)[2:, 1:]  # a strided view of a bigger storage
    state["_orig_mod.transposed"] = torch.randn(5, 7).t()
    ckpt = {"model": state, "optimizer": opt.state_dict(), "iter_num": 250, "best_val_loss": torch.tensor(2.5),
            "model_args": {"n_layer": 1, "n_head": 4, "n_embd": 64, "block_size": 128, "bias": True,
                           "vocab_size": 384, "dropout": 0.0},
            "config": {"learning_rate": 6e-4, "dataset": "openwebtext"}}
    torch.save(ckpt, path)
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("nanogpt") / "ckpt.pt"
    return path, _nanogpt_like(path)


def test_the_index_and_plain_values_come_without_reading_a_tensor(ckpt):
    path, saved = ckpt
    read_at, size = torchsave.local_reader(path)
    counted: list[int] = []
    index = torchsave.read_index(lambda o, n: counted.append(n) or read_at(o, n), size, "ckpt.pt")
    model = index.under("model._orig_mod.")
    assert set(model) == {k.removeprefix("_orig_mod.") for k in saved["model"]}
    for name, t in model.items():
        assert t.shape == tuple(saved["model"][f"_orig_mod.{name}"].shape), name
    assert model["wte.weight"].storage == model["lm_head.weight"].storage  # tied: one storage
    assert model["bf16_view"].dtype == "bfloat16"
    assert index.value("model_args") == saved["model_args"] and index.value("iter_num") == 250
    assert index.value("config.dataset") == "openwebtext"
    assert sum(counted) < 0.05 * size  # the pickle and the zip directory, not the storages


def test_model_tensors_read_by_byte_range_equal_torch_load_and_skip_the_optimizer(ckpt):
    path, _ = ckpt
    oracle = torch.load(path, weights_only=True)
    read_at, size = torchsave.local_reader(path)
    index = torchsave.read_index(read_at, size, "ckpt.pt")
    counted: list[int] = []

    def counting(offset: int, length: int) -> bytes:
        counted.append(length)
        return read_at(offset, length)

    model = index.under("model.")
    for name, t in model.items():
        got = torchsave.read_tensor(t, counting)
        assert got.dtype == oracle["model"][name].dtype and torch.equal(got, oracle["model"][name]), name
        assert got.is_contiguous()
    model_bytes = sum(t.nbytes for t in model.values())
    assert sum(counted) <= 1.1 * model_bytes + 4 * 8 * 6 * 2  # the bf16 view's storage rows it skips over
    optimizer_bytes = sum(t.nbytes for t in index.under("optimizer.").values())
    assert optimizer_bytes > model_bytes  # AdamW: two moments per parameter, which were not read


def test_a_pickle_that_would_run_a_command_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "hook": Evil()}, path)
    read_at, size = torchsave.local_reader(path)
    with pytest.raises(PickleRefused, match="system"):
        torchsave.read_index(read_at, size, "ckpt.pt")
    assert not marker.exists()


def test_legacy_truncated_and_missing_storages_say_what_is_wrong(tmp_path, ckpt):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatUnsupported, match="zip format"):
        torchsave.read_index(*torchsave.local_reader(legacy), "legacy.pt")
    path, _ = ckpt
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MalformedWeights, match="truncated or corrupt"):
        torchsave.read_index(*torchsave.local_reader(cut), "cut.pt")
    gone = tmp_path / "gone.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(gone, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/0"):
                dst.writestr(item, src.read(item))
    with pytest.raises(MalformedWeights, match=r"storage 0 .* is missing"):
        torchsave.read_index(*torchsave.local_reader(gone), "gone.pt")
