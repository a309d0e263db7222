"""The scoring path on CUDA: the default dtype, the float32 GEMM option, streamed execution
and blocks spread over several devices. Skipped (reported as such) without CUDA; the tests
that need two devices or more are skipped with one.

Tolerances: bfloat16 vs float32 as on the CPU (test_scoring's 0.02: bfloat16 keeps 8 bits
of mantissa); the float64 statistics meet the float64 oracle at test_scoring's 1e-6 and the
opt-in float32 GEMMs stay within the documented 1e-4 of them (test_engine, docs/engine.md
"Precision"); streamed and resident runs give the statistics the same batches in the same
order with the same values, so their scores are equal.
"""

from __future__ import annotations

import pytest
import torch
from layertrack.workers import checkpoint as ckpt
from layertrack.workers import reference
from layertrack.workers.engine import EngineConfig
from layertrack.workers.probe import default_probe, tokenize_probe
from layertrack.workers.scoring import ScoreConfig, _device_map, prepare, score_checkpoint
from layertrack.workers.vocabulary import BASE_METRICS
from tiny_models import build_checkpoint

CUDA = torch.cuda.is_available()
N_CUDA = torch.cuda.device_count() if CUDA else 0

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_two = pytest.mark.skipif(N_CUDA < 2, reason="needs 2 or more CUDA devices")
pytestmark = needs_cuda

SMALL = dict(max_tokens=1200, seq_len=64)
ORACLE_TOL = 1e-6  # test_scoring.TOL
GEMM_FLOAT32_TOL = 1e-4  # test_engine, docs/engine.md
BF16_TOL = 0.02  # test_scoring.test_bfloat16_runs_and_stays_close_to_float32


def metrics(result) -> dict[str, list[float]]:
    return {m: result.scores.metric(m) for m in BASE_METRICS}


def assert_close(a, b, *, abs_tol: float, rel_tol: float = 0.0) -> None:
    for metric, got in metrics(a).items():
        want = b.scores.metric(metric)
        assert len(got) == len(want)
        for layer, (x, y) in enumerate(zip(got, want, strict=True)):
            assert x == pytest.approx(y, abs=abs_tol, rel=rel_tol), f"{metric} layer {layer}: {x} vs {y}"


def test_default_dtype_on_cuda_is_bfloat16_and_close_to_float32(checkpoints):
    path = str(checkpoints("mistral"))
    default = score_checkpoint(path, config=ScoreConfig(**SMALL, device="cuda"))
    f32 = score_checkpoint(path, config=ScoreConfig(**SMALL, device="cuda", dtype="float32"))
    assert default.device.startswith("cuda")
    assert default.dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert f32.dtype == "float32"
    assert_close(default, f32, abs_tol=BF16_TOL, rel_tol=BF16_TOL)


def cuda_oracle(path, device: str) -> dict[str, list[float]]:
    """Every hidden state of the model on ``device`` in float32 (output_hidden_states=True),
    scored by the float64 oracle (test_scoring.oracle, on CUDA)."""
    info = ckpt.inspect_checkpoint(path)
    model = ckpt.load_model(info, device=torch.device(device), dtype=torch.float32)
    tokens = tokenize_probe(default_probe(), ckpt.load_tokenizer(path), **SMALL)
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool, device=device)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens.input_ids, device=device),
                    attention_mask=torch.tensor(tokens.attention_mask, device=device), output_hidden_states=True)
    return reference.score_pairs([h[keep].cpu() for h in out.hidden_states])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float64_statistics_meet_the_oracle_and_float32_gemms_stay_within_1e_4(family, checkpoints):
    path = checkpoints(family)
    exact = score_checkpoint(str(path), config=ScoreConfig(**SMALL, device="cuda:0", dtype="float32"))
    fast = score_checkpoint(str(path), config=ScoreConfig(**SMALL, device="cuda:0", dtype="float32",
                                                          engine=EngineConfig(gemm_precision="float32")))
    want = cuda_oracle(path, "cuda:0")
    for metric, got in metrics(exact).items():
        assert all(reference.agrees(metric, a, b, ORACLE_TOL) for a, b in zip(got, want[metric], strict=True)), metric
    assert_close(fast, exact, abs_tol=GEMM_FLOAT32_TOL)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_streamed_equals_resident_on_cuda(dtype, checkpoints):
    path = str(checkpoints("llama"))
    cfg = dict(**SMALL, device="cuda:0", dtype=dtype)
    resident = score_checkpoint(path, config=ScoreConfig(**cfg, execution="resident"))
    streamed = score_checkpoint(path, config=ScoreConfig(**cfg, execution="streamed"))
    assert resident.plan["mode"] == "resident" and streamed.plan["mode"] == "streamed"
    assert metrics(streamed) == metrics(resident)
    assert streamed.scores.pairs[-1].final_norm is resident.scores.pairs[-1].final_norm is True


def test_streamed_with_hidden_states_on_the_host_equals_resident(checkpoints):
    """A budget too small for one pass's hidden states on the device: on CUDA they wait in
    host memory (``hidden_states == "host"``) and each batch visits the device for its block."""
    path = str(checkpoints("llama"))
    cfg = dict(**SMALL, device="cuda:0", dtype="float32", batch_size=2)
    prep = prepare(path, config=ScoreConfig(**cfg, execution="streamed"))
    assert prep.plan.hidden_states == "device"
    # all the hidden states of a pass but one sequence's fit: they go to the host instead
    budget = prep.plan.peak_bytes - prep.seq_len * prep.shape.d * 4
    streamed = score_checkpoint(path, config=ScoreConfig(**cfg, execution="streamed", max_memory=budget))
    assert streamed.plan["hidden_states"] == "host" and streamed.n_passes == 1, streamed.plan
    resident = score_checkpoint(path, config=ScoreConfig(**cfg, execution="resident"))
    assert metrics(streamed) == metrics(resident)


@needs_two
def test_resident_blocks_are_spread_over_every_device_and_score_as_on_one(tmp_path, tokenizer):
    layers = max(4, 2 * N_CUDA)
    path = str(build_checkpoint(tmp_path / "llama", "llama", tokenizer, layers=layers))
    everywhere = ScoreConfig(**SMALL, device="cuda", dtype="float32", execution="resident")
    prep = prepare(path, config=everywhere)
    devices = [f"cuda:{i}" for i in range(N_CUDA)]
    assert list(prep.plan.devices) == devices
    placed = _device_map(prep)
    assert placed is not None and set(placed.values()) == set(range(N_CUDA)), placed
    spread = score_checkpoint(path, config=everywhere)
    assert spread.plan["devices"] == devices
    one = score_checkpoint(path, config=ScoreConfig(**SMALL, device="cuda:0", dtype="float32",
                                                    execution="resident"))
    assert one.plan["devices"] == ["cuda:0"]
    assert_close(spread, one, abs_tol=ORACLE_TOL)
