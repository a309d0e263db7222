"""The memory planner: resident or streamed, how many passes, where hidden states live, and
the refusal when nothing fits, from synthetic model shapes whose numbers are worked out by
hand below; ``model_shape`` against the tensors of real checkpoints; ``parse_bytes``."""

from __future__ import annotations

import pytest
import torch
from layertrack.workers.errors import OutOfMemory, PlanDoesNotFit
from layertrack.workers.planner import ModelShape, model_shape, parse_bytes, plan_memory
from layertrack.workers.streaming import read_header
from safetensors import safe_open
from tiny_models import FAMILIES
from transformers import AutoConfig

MiB = 2**20

# A synthetic model, chosen so that every quantity is a round number of MiB in bfloat16
# (2 bytes): d = 1024, MLP 4096, 16 heads, 32 blocks of 24 MiB, 64 MiB outside the blocks
# (weights 832 MiB). One batch of 2 sequences of 512 tokens (t = 1024) takes
#   2 · (6·1024·1024 + 3·1024·4096 + 2·2·16·512²) bytes = 68 MiB of activations,
# and one sequence's hidden state between blocks is 512 · 1024 · 2 bytes = 1 MiB.
# Streamed, the weights are 64 + 24 = 88 MiB (one block), or 112 MiB with the next block
# read ahead (prefetch); the smallest plan needs 88 + 68 + 2 (one batch's hidden states)
# = 158 MiB, and prefetch needs 182 MiB.
SHAPE = ModelShape(n_blocks=32, d=1024, ffn=4096, n_heads=16, block_bytes=(24 * MiB,) * 32,
                   other_bytes=64 * MiB, block_prefix="model.layers")
JOB = dict(dtype_bytes=2, seq_len=512, batch_sequences=2)


@pytest.mark.parametrize(
    ("budget_mib", "n_sequences", "device_type", "force", "want"),
    [
        # weights 832 + activations 68 = 900 MiB fit: resident
        (1000, 64, "cpu", None, dict(mode="resident", passes=1, sequences_per_pass=64, hidden_states="device",
                                     prefetch=False, peak_mib=900)),
        (900, 64, "cpu", None, dict(mode="resident", passes=1, sequences_per_pass=64, hidden_states="device",
                                    prefetch=False, peak_mib=900)),
        # one byte short of resident: streamed, with room for every sequence's hidden state
        # (899 − 112 − 68 = 719 MiB ≥ 64 MiB): one pass, next block read ahead
        (899, 64, "cpu", None, dict(mode="streamed", passes=1, sequences_per_pass=64, hidden_states="device",
                                    prefetch=True, peak_mib=112 + 68 + 64)),
        # 213 − 112 − 68 = 33 MiB of hidden states: 32 sequences a pass, 2 passes (without
        # reading ahead, 57 MiB would also need 2)
        (213, 64, "cpu", None, dict(mode="streamed", passes=2, sequences_per_pass=32, hidden_states="device",
                                    prefetch=True, peak_mib=112 + 68 + 32)),
        # the same with 63 sequences: still 2 passes of 32 (whole batches)
        (213, 63, "cpu", None, dict(mode="streamed", passes=2, sequences_per_pass=32, hidden_states="device",
                                    prefetch=True, peak_mib=112 + 68 + 32)),
        # 176 − 88 − 68 = 20 MiB: 20 sequences a pass, 4 passes, evened to 16 each
        (176, 64, "cpu", None, dict(mode="streamed", passes=4, sequences_per_pass=16, hidden_states="device",
                                    prefetch=False, peak_mib=88 + 68 + 16)),
        (176, 63, "cpu", None, dict(mode="streamed", passes=4, sequences_per_pass=16, hidden_states="device",
                                    prefetch=False, peak_mib=88 + 68 + 16)),
        # below 182 MiB no read-ahead: 181 − 88 − 68 = 25 MiB → 24 sequences, 3 passes, evened to 22
        (181, 64, "cpu", None, dict(mode="streamed", passes=3, sequences_per_pass=22, hidden_states="device",
                                    prefetch=False, peak_mib=88 + 68 + 22)),
        # the smallest plan: one batch per pass
        (158, 64, "cpu", None, dict(mode="streamed", passes=32, sequences_per_pass=2, hidden_states="device",
                                    prefetch=False, peak_mib=158)),
        # CUDA: a pass's hidden states that do not fit the device wait in host memory, one
        # pass over everything, one batch's hidden states on the device at a time
        (200, 64, "cuda", None, dict(mode="streamed", passes=1, sequences_per_pass=64, hidden_states="host",
                                     prefetch=True, peak_mib=112 + 68 + 2)),
        (158, 64, "cuda", None, dict(mode="streamed", passes=1, sequences_per_pass=64, hidden_states="host",
                                     prefetch=False, peak_mib=158)),
        # ... and stay on the device when they fit it
        (899, 64, "cuda", None, dict(mode="streamed", passes=1, sequences_per_pass=64, hidden_states="device",
                                     prefetch=True, peak_mib=112 + 68 + 64)),
        # forced modes (tests, benchmarks): streamed although resident fits; resident although not
        (1000, 64, "cpu", "streamed", dict(mode="streamed", passes=1, sequences_per_pass=64,
                                           hidden_states="device", prefetch=True, peak_mib=112 + 68 + 64)),
        (100, 64, "cpu", "resident", dict(mode="resident", passes=1, sequences_per_pass=64, hidden_states="device",
                                          prefetch=False, peak_mib=900)),
        # one sequence: the batch shrinks to it (activations 34 MiB), so 832 + 34 MiB is resident
        (866, 1, "cpu", None, dict(mode="resident", passes=1, sequences_per_pass=1, hidden_states="device",
                                   prefetch=False, peak_mib=866, batch_sequences=1)),
    ],
)
def test_plan_memory(budget_mib, n_sequences, device_type, force, want):
    plan = plan_memory(SHAPE, **JOB, n_sequences=n_sequences, budget=budget_mib * MiB, stats_bytes=5 * MiB,
                       device_type=device_type, force=force)
    got = dict(mode=plan.mode, passes=plan.passes, sequences_per_pass=plan.sequences_per_pass,
               hidden_states=plan.hidden_states, prefetch=plan.prefetch, peak_mib=plan.peak_bytes / MiB)
    if "batch_sequences" in want:
        got["batch_sequences"] = plan.batch_sequences
    assert got == want
    assert plan.budget == budget_mib * MiB and plan.weight_bytes == 832 * MiB
    # the statistics are on top: the engine's (given) and its float64 fold buffers for one
    # batch (7 · 8 bytes · 1024 tokens · 1024 = 56 MiB)
    assert plan.stats_bytes == 5 * MiB + 56 * plan.batch_sequences // 2 * MiB
    # the passes cover every sequence, in whole batches
    assert plan.passes * plan.sequences_per_pass >= n_sequences
    assert (plan.passes - 1) * plan.sequences_per_pass < n_sequences
    assert plan.sequences_per_pass % plan.batch_sequences == 0 or plan.sequences_per_pass == n_sequences
    assert plan.to_dict()["mode"] == want["mode"] and want["mode"] in plan.describe()


def test_streamed_plans_keep_within_their_budget_and_pass_less_as_it_grows():
    """Every pass reads every block from disk again: reading the next block ahead must not
    take the room of hidden states that would save a pass (182 MiB reads ahead in 32 passes
    where 181 MiB needs 3)."""
    previous = None
    for budget_mib in range(158, 900):
        plan = plan_memory(SHAPE, **JOB, n_sequences=64, budget=budget_mib * MiB)
        assert plan.mode == "streamed"
        assert plan.peak_bytes <= plan.budget, budget_mib
        if previous is not None:
            assert plan.passes <= previous.passes, budget_mib
        previous = plan
    assert previous.passes == 1


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_a_budget_too_small_for_one_block_is_refused_with_the_numbers(device_type):
    with pytest.raises(PlanDoesNotFit) as err:
        plan_memory(SHAPE, **JOB, n_sequences=64, budget=157 * MiB, device_type=device_type)
    message = str(err.value)
    for part in ("157.0 MiB", "tensors outside the blocks (64.0 MiB", "largest block (24.0 MiB)",
                 "activations (68.0 MiB for 2 sequences of 512)", "hidden states (2.0 MiB)", "need 158.0 MiB",
                 "LAYERTRACK_MAX_MEMORY"):
        assert part in message, message
    assert isinstance(err.value, OutOfMemory) and err.value.code == "plan_does_not_fit"


def test_forcing_streamed_still_checks_the_budget():
    with pytest.raises(PlanDoesNotFit):
        plan_memory(SHAPE, **JOB, n_sequences=64, budget=100 * MiB, force="streamed")


def test_the_largest_block_is_what_must_fit():
    uneven = ModelShape(n_blocks=3, d=1024, ffn=4096, n_heads=16, block_bytes=(10 * MiB, 40 * MiB, 10 * MiB),
                        other_bytes=64 * MiB)
    # 64 + 40 + 68 + 2 = 174 MiB
    assert plan_memory(uneven, **JOB, n_sequences=8, budget=174 * MiB).mode == "streamed"
    with pytest.raises(PlanDoesNotFit, match=r"largest block \(40\.0 MiB\)"):
        plan_memory(uneven, **JOB, n_sequences=8, budget=174 * MiB - 1)


# LM heads as each family names them (left out of the shape when only the base model is loaded)
HEADS = {"llama": "lm_head.", "mistral": "lm_head.", "qwen2": "lm_head.", "gpt2": "lm_head.",
         "gpt_neox": "embed_out.", "opt": "lm_head."}
BLOCK_PREFIX = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h",
                "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_shape_counts_the_checkpoints_tensors(family, checkpoints):
    import json

    path = checkpoints(family)
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    tensors, sizes = {}, {}
    for f in files:
        header, _ = read_header(f)
        tensors.update({n: (t["dtype"], t["shape"]) for n, t in header.items() if n != "__metadata__"})
        with safe_open(str(f), framework="pt") as st:  # the tensors themselves: an independent count
            for n in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = st.get_tensor(n)
                sizes[n] = (t.numel(), t.dtype)
    assert set(sizes) == set(tensors)
    prefix = BLOCK_PREFIX[family]
    n_blocks = 3

    def expect(dtype_bytes: int, skip: tuple[str, ...] = ()) -> tuple[list[int], int]:
        blocks, other = [0] * n_blocks, 0
        for n, (numel, dtype) in sizes.items():
            if skip and n.startswith(skip):
                continue
            size = numel * (dtype_bytes if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size())
            head = n[len(prefix) + 1:].split(".")[0] if n.startswith(prefix + ".") else None
            if head is not None:
                blocks[int(head)] += size
            else:
                other += size
        return blocks, other

    shape = model_shape(tensors, config, dtype_bytes=4)
    assert shape.block_prefix == prefix
    assert (shape.n_blocks, shape.d, shape.n_heads) == (3, 32, 4)
    assert shape.ffn == (128 if family == "gpt2" else 64)  # GPT-2's n_inner is None: 4·d
    blocks, other = expect(4)
    assert list(shape.block_bytes) == blocks and shape.other_bytes == other
    assert shape.weight_bytes == sum(4 * numel for numel, _ in sizes.values())  # float32 checkpoints
    assert len(set(shape.block_bytes)) == 1 and shape.max_block_bytes == blocks[0] > 0

    half = model_shape(tensors, config, dtype_bytes=2)  # bfloat16 jobs: floating tensors cast on load
    assert (list(half.block_bytes), half.other_bytes) == expect(2)

    head = HEADS[family]
    without = model_shape(tensors, config, dtype_bytes=4, skip=(head,))
    assert (list(without.block_bytes), without.other_bytes) == expect(4, (head,))
    head_bytes = sum(4 * numel for n, (numel, _) in sizes.items() if n.startswith(head))
    assert shape.other_bytes - without.other_bytes == head_bytes
    # a head tied to the embeddings (GPT-2, OPT) is not in the checkpoint
    tied = AutoConfig.from_pretrained(str(path)).tie_word_embeddings
    assert head_bytes == (0 if tied else 4 * 384 * 32)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("256MiB", 256 * 2**20),
        ("256M", 256 * 2**20),
        ("256 MiB", 256 * 2**20),
        ("1.5G", 3 * 2**29),
        ("1.5GiB", 3 * 2**29),
        ("8GB", 8 * 10**9),  # …B without i: decimal
        ("512MB", 512 * 10**6),
        ("4kB", 4000),
        ("4K", 4096),
        ("2T", 2 * 2**40),
        ("1000", 1000),
        (" 64 ", 64),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "1.2.3G", "8 PB", "G", "1e9", "12 bytes"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError) as err:
        parse_bytes(text)
    message = str(err.value)
    assert repr(text) in message and "512MiB" in message and "8GB" in message

