"""torch.distributed.checkpoint directories read from their ``.metadata`` (workers/formats/dcp.py):
the fixture is written by torch's own FSDP2 and DCP on 2 gloo ranks (tests/writers/dcp_fsdp2.py),
with AdamW state beside the model; the oracle is the full state dict FSDP2 itself gathers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from layertrack.workers.errors import CheckpointUnreadable, MalformedWeights, PickleRefused
from layertrack.workers.formats import dcp
from safetensors.torch import load_file


@pytest.fixture(scope="session")
def oracle(fsdp2) -> dict[str, torch.Tensor]:
    return load_file(fsdp2 / "oracle.safetensors")


def test_the_index_comes_from_metadata_alone_and_lists_the_sharded_model_beside_the_optimizer(fsdp2, oracle):
    index = dcp.read_metadata(fsdp2 / "step-3")
    model = index.under("model.")
    assert set(model) == set(oracle)
    for name, t in model.items():
        assert t.shape == tuple(oracle[name].shape) and t.dtype == "float32", name
        assert len(t.chunks) == 2 and {c.file for c in t.chunks} == {"__0_0.distcp", "__1_0.distcp"}, name
        assert sorted(c.offsets[0] for c in t.chunks) == [0, t.shape[0] // 2], name  # Shard(0)
    optimizer = index.under("optimizer.state.")
    assert {k.rsplit(".", 1)[1] for k in optimizer} == {"exp_avg", "exp_avg_sq", "step"}
    assert "train_state.step" in index.others


def test_every_model_tensor_is_assembled_from_its_chunks_exactly(fsdp2, oracle):
    directory = fsdp2 / "step-3"
    index = dcp.read_metadata(directory)
    read = dcp.read_tensors(index.under("model.").values(), dcp.local_ranges(directory))
    assert set(read) == {f"model.{k}" for k in oracle}
    for name, expected in oracle.items():
        assert torch.equal(read[f"model.{name}"], expected), name


def test_reading_the_model_reads_its_bytes_not_the_optimizers(fsdp2, oracle):
    directory = fsdp2 / "step-3"
    ranges = dcp.local_ranges(directory)
    counted: list[int] = []

    def counting(file: str, offset: int, length: int) -> bytes:
        counted.append(length)
        return ranges(file, offset, length)

    dcp.read_tensors(dcp.read_metadata(directory).under("model.").values(), counting)
    model_bytes = sum(t.numel() * t.element_size() for t in oracle.values())
    on_disk = sum(f.stat().st_size for f in directory.glob("*.distcp"))
    assert on_disk > 2.5 * model_bytes  # AdamW's two moments beside the weights
    assert model_bytes <= sum(counted) <= 1.1 * model_bytes


def test_one_tensor_reads_only_its_own_chunks(fsdp2):
    directory = fsdp2 / "step-3"
    index = dcp.read_metadata(directory)
    entry = index.tensors["model.model.layers.1.mlp.down_proj.weight"]
    seen: list[tuple[str, int, int]] = []
    ranges = dcp.local_ranges(directory)

    def recording(file: str, offset: int, length: int) -> bytes:
        seen.append((file, offset, length))
        return ranges(file, offset, length)

    dcp.read_tensor(entry, recording)
    assert sorted(seen) == sorted((c.file, c.offset, c.length) for c in entry.chunks)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_metadata_pickle_that_would_run_a_command_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(PickleRefused) as e:
        dcp.read_metadata(tmp_path)
    assert e.value.code == "pickle_refused" and "system" in e.value.message and ".metadata" in e.value.message
    assert not marker.exists()


def test_a_metadata_that_is_not_dcps_is_malformed(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(MalformedWeights, match="not DCP's Metadata"):
        dcp.read_metadata(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"\x80\x04\x95")  # truncated
    with pytest.raises(MalformedWeights, match="truncated or corrupt"):
        dcp.read_metadata(tmp_path)


def test_a_data_file_cut_short_or_missing_says_so(fsdp2, tmp_path):
    import shutil

    directory = tmp_path / "step-3"
    shutil.copytree(fsdp2 / "step-3", directory)
    index = dcp.read_metadata(directory)
    entry = index.tensors["model.lm_head.weight"]
    with open(directory / "__1_0.distcp", "r+b") as f:
        f.truncate(max(c.offset for c in entry.chunks if c.file == "__1_0.distcp"))
    with pytest.raises(MalformedWeights, match="bytes expected"):
        dcp.read_tensor(entry, dcp.local_ranges(directory))
    (directory / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointUnreadable, match=r"__1_0\.distcp"):
        dcp.read_tensor(entry, dcp.local_ranges(directory))
