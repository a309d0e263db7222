"""The full path (resolve → load → tokenise → forward with hooks → engine) on tiny models of
six families, against the float64 oracle applied to the model's own output_hidden_states."""

from __future__ import annotations

import pytest
import torch
from layertrack.workers import checkpoint as ckpt
from layertrack.workers import engine, reference
from layertrack.workers.probe import default_probe, tokenize_probe
from layertrack.workers.scoring import ScoreConfig, find_blocks, score_checkpoint, score_model
from layertrack.workers.vocabulary import BASE_METRICS
from tiny_models import FAMILIES, build_checkpoint

TOL = 1e-6
SMALL = ScoreConfig(max_tokens=1200, seq_len=64)


def oracle(path, config: ScoreConfig) -> dict[str, list[float]]:
    """All hidden states in memory from output_hidden_states=True, then reference.score_pairs."""
    info = ckpt.inspect_checkpoint(path, allow_pickle=True)
    model = ckpt.load_model(info, device=torch.device("cpu"), dtype=torch.float32)
    tokens = tokenize_probe(
        default_probe(),
        ckpt.load_tokenizer(path),
        max_tokens=config.max_tokens,
        seq_len=config.seq_len,
        drop_first_token=config.drop_first_token,
    )
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens.input_ids),
            attention_mask=torch.tensor(tokens.attention_mask),
            output_hidden_states=True,
        )
    return reference.score_pairs([h[keep] for h in out.hidden_states])


def assert_close(result, want, tol=TOL):
    for metric in BASE_METRICS:
        got = result.scores.metric(metric)
        assert len(got) == len(want[metric])
        for layer, (a, b) in enumerate(zip(got, want[metric], strict=True)):
            assert reference.agrees(metric, a, b, tol), f"{metric} layer {layer}: {a} vs oracle {b}"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_path_matches_oracle(family, checkpoints):
    path = checkpoints(family)
    result = score_checkpoint(str(path), config=SMALL)
    assert result.model_type == family
    assert result.scores.n_tokens == 1200
    assert result.n_layers == 3 and len(result.scores.layers) == 4
    assert result.scores.pairs[-1].final_norm is True
    assert not any(p.final_norm for p in result.scores.pairs[:-1])
    assert result.device == "cpu" and result.dtype == "float32"
    assert len(result.probe_sha256) == 64 and len(result.checkpoint_fingerprint) == 64
    assert_close(result, oracle(path, SMALL))


def test_drop_first_token_scores_only_the_rest(checkpoints):
    path = checkpoints("llama")
    cfg = ScoreConfig(max_tokens=1260, seq_len=64, drop_first_token=True)
    result = score_checkpoint(str(path), config=cfg)
    assert result.scores.n_tokens == 1260
    assert result.n_sequences == 20  # 63 scored tokens per sequence
    assert_close(result, oracle(path, cfg))
    with_first = score_checkpoint(str(path), config=ScoreConfig(max_tokens=1260, seq_len=64))
    assert with_first.scores.pairs[0].linearity != result.scores.pairs[0].linearity


def test_layer_groups_in_several_passes_equal_one_pass(checkpoints):
    path = checkpoints("qwen2")
    one = score_checkpoint(str(path), config=SMALL)
    budget = engine.stats_bytes(2, 32)  # one pair per pass
    several = score_checkpoint(
        str(path), config=ScoreConfig(max_tokens=1200, seq_len=64, stats_memory_budget=budget)
    )
    assert one.n_passes == 1 and several.n_passes == 3
    assert several.scores.pairs[-1].final_norm
    for metric in BASE_METRICS:
        assert several.scores.metric(metric) == pytest.approx(one.scores.metric(metric), abs=1e-9)


def test_a_pass_runs_only_the_blocks_it_needs_and_leaves_the_model_whole(checkpoints):
    path = checkpoints("llama")
    model = ckpt.load_model(ckpt.inspect_checkpoint(path), device=torch.device("cpu"), dtype=torch.float32)
    blocks = find_blocks(model)
    before = list(blocks)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_args, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = tokenize_probe(default_probe(), ckpt.load_tokenizer(path), max_tokens=1200, seq_len=64)
    config = ScoreConfig(batch_size=4, stats_memory_budget=engine.stats_bytes(2, 32))  # one pair per pass
    scores, passes = score_model(model, tokens, config=config)
    n_batches = -(-len(tokens.input_ids) // 4)
    assert passes == 3
    assert calls == [3 * n_batches, 2 * n_batches, n_batches]  # pass k stops after block k
    assert list(blocks) == before and len(blocks) == 3
    assert scores.pairs[-1].final_norm and not scores.pairs[0].final_norm


def test_batch_size_does_not_change_scores(checkpoints):
    path = checkpoints("gpt2")
    a = score_checkpoint(str(path), config=ScoreConfig(max_tokens=1200, seq_len=64, batch_size=1))
    b = score_checkpoint(str(path), config=ScoreConfig(max_tokens=1200, seq_len=64, batch_size=7))
    for metric in BASE_METRICS:
        assert a.scores.metric(metric) == pytest.approx(b.scores.metric(metric), abs=TOL)


def test_sharded_and_file_uri_and_pickle_opt_in_all_load_the_same_model(tmp_path, tokenizer):
    single = build_checkpoint(tmp_path / "single", "llama", tokenizer, seed=3)
    sharded = build_checkpoint(tmp_path / "sharded", "llama", tokenizer, seed=3, max_shard_size="20KB")
    pickled = build_checkpoint(tmp_path / "pickled", "llama", tokenizer, seed=3, safe=False)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert list(pickled.glob("*.bin")) and not list(pickled.glob("*.safetensors"))
    base = score_checkpoint(str(single), config=SMALL)
    for uri, cfg in [
        (str(sharded), SMALL),
        (single.as_uri(), SMALL),
        (str(pickled), ScoreConfig(max_tokens=1200, seq_len=64, allow_pickle=True)),
    ]:
        other = score_checkpoint(uri, config=cfg)
        assert other.scores.metric("linearity") == pytest.approx(base.scores.metric("linearity"), abs=1e-12)


def test_bfloat16_runs_and_stays_close_to_float32(checkpoints):
    path = checkpoints("mistral")
    f32 = score_checkpoint(str(path), config=SMALL)
    bf16 = score_checkpoint(str(path), config=ScoreConfig(max_tokens=1200, seq_len=64, dtype="bfloat16"))
    assert bf16.dtype == "bfloat16"
    assert bf16.scores.metric("linearity") == pytest.approx(f32.scores.metric("linearity"), abs=0.02)


def test_progress_reports_every_token_and_seq_len_is_capped(checkpoints):
    seen: list[tuple[int, int]] = []
    result = score_checkpoint(
        str(checkpoints("opt")),
        config=ScoreConfig(max_tokens=2000, seq_len=4096),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result.seq_len == 512  # the model's max_position_embeddings
    assert any("exceeds the model's 512 positions" in w for w in result.scores.warnings)
    assert seen[-1] == (2000, 2000)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_default_token_budget_is_capped_by_the_probe_with_a_warning(checkpoints):
    result = score_checkpoint(str(checkpoints("gpt_neox")), config=ScoreConfig(seq_len=64))
    n = result.scores.n_tokens
    assert 8 * 32 <= n <= 16384
    if n < 16384:
        assert any("scoring" in w and "instead of the 16384" in w for w in result.scores.warnings)
