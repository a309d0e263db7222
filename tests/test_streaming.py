"""Streamed execution: a model whose blocks are read from disk one at a time, scored block by
block, gives the scores of the resident model, reads each block once per pass, measures the
same replaceability, and keeps within its memory budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from layertrack.workers import checkpoint as ckpt
from layertrack.workers import engine, planner
from layertrack.workers.probe import default_probe, tokenize_probe
from layertrack.workers.scoring import (
    ScoreConfig,
    find_blocks,
    holdout_tokens,
    prepare,
    replaceability,
    score_blockwise,
    score_checkpoint,
    score_model,
)
from layertrack.workers.streaming import BlockRunner, WeightSource, build_streamed, read_header
from layertrack.workers.vocabulary import BASE_METRICS, REPLACEABILITY_TOKENS_PER_DIM
from tiny_models import FAMILIES, build_checkpoint

TOL = 1e-10
LAYERS = 6
#: 10 sequences of 64 tokens, 2 per batch: every quantity the planner weighs is small enough
#: for a budget to stream the model in one pass or in several
JOB = dict(max_tokens=640, seq_len=64, batch_size=2)
#: each family's LM head (not loaded when only the base model is scored)
HEADS = {"llama": "lm_head.", "mistral": "lm_head.", "qwen2": "lm_head.", "gpt2": "lm_head.",
         "gpt_neox": "embed_out.", "opt": "lm_head."}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, most of all on a machine whose cores are busy
    (the scores are compared within one process, so the thread count is the same for both)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer):
    """A 6-block tiny checkpoint per family (built once per module); family -> path."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("deep")

    def get(family: str) -> Path:
        if family not in made:
            made[family] = build_checkpoint(root / family, family, tokenizer, seed=1, layers=LAYERS)
        return made[family]

    return get


def streamed_budget(path: Path, config: ScoreConfig, sequences_per_pass: int, *, prefetch: bool) -> tuple[int, int]:
    """From the planner's own numbers: the budget that streams ``path`` with
    ``sequences_per_pass`` hidden states held between blocks, and the next block read ahead or
    not (not: the budget leaves no room for a second block; 2 sequences' hidden states, 16 KiB,
    are less than a block here); and the resident need (weights + one batch's activations)."""
    prep = prepare(str(path), config=config)
    shape, seq_len = prep.shape, prep.seq_len
    db = 4  # float32 on the CPU
    act = planner.activation_bytes(shape, batch_sequences=prep.plan.batch_sequences, seq_len=seq_len,
                                   dtype_bytes=db)
    per_sequence = seq_len * shape.d * db
    assert shape.max_block_bytes > 2 * per_sequence
    peak = planner.streamed_stage_peak(shape, act=act, batch_bytes=prep.plan.batch_sequences * per_sequence,
                                       prefetch=prefetch)
    budget = peak + sequences_per_pass * per_sequence
    return budget, shape.weight_bytes + act


def n_sequences(path: Path, config: ScoreConfig) -> int:
    return len(prepare(str(path), config=config).tokens.input_ids)


def assert_same_scores(got, want, tol=TOL):
    for metric in BASE_METRICS:
        a, b = got.scores.metric(metric), want.scores.metric(metric)
        assert len(a) == len(b) > 0
        for layer, (x, y) in enumerate(zip(a, b, strict=True)):
            assert abs(x - y) <= tol, f"{metric} layer {layer}: streamed {x} vs resident {y}"
    assert [p.final_norm for p in got.scores.pairs] == [p.final_norm for p in want.scores.pairs]
    assert got.scores.pairs[-1].final_norm is True
    assert got.scores.n_tokens == want.scores.n_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_scores_equal_resident_in_one_pass_and_in_several(family, deep):
    path = deep(family)
    base = ScoreConfig(**JOB)
    n_seq = n_sequences(path, base)
    assert n_seq == 10
    resident = score_checkpoint(str(path), config=ScoreConfig(**JOB, execution="resident"))
    assert resident.plan["mode"] == "resident" and resident.n_passes == 1

    one_pass, resident_need = streamed_budget(path, base, n_seq, prefetch=True)
    assert one_pass < resident_need  # the planner would stream it anyway
    assert prepare(str(path), config=ScoreConfig(**JOB, max_memory=one_pass)).plan.mode == "streamed"
    one = score_checkpoint(str(path), config=ScoreConfig(**JOB, max_memory=one_pass, execution="streamed"))
    assert one.plan["mode"] == "streamed" and one.plan["prefetch"] is True
    assert one.plan["passes"] == 1 and one.n_passes == 1
    assert one.plan["peak_bytes"] <= one.plan["budget"] == one_pass
    assert_same_scores(one, resident)

    several_budget, _ = streamed_budget(path, base, 4, prefetch=False)  # 4 sequences between blocks
    several = score_checkpoint(str(path), config=ScoreConfig(**JOB, max_memory=several_budget,
                                                             execution="streamed"))
    assert several.plan["mode"] == "streamed"
    assert several.plan["passes"] == math.ceil(n_seq / 4) == 3 and several.n_passes == 3
    assert several.plan["sequences_per_pass"] == 4 and several.plan["prefetch"] is False
    assert_same_scores(several, resident)


def test_streamed_in_several_passes_and_statistics_groups_equals_resident_in_groups(deep):
    path = deep("qwen2")
    stats_budget = engine.stats_bytes(3, 32)  # 3 hidden states a group: (0, 2), (2, 4), (4, 6)
    assert engine.plan_layer_groups(LAYERS + 1, 32, stats_budget) == [(0, 2), (2, 4), (4, 6)]
    budget, _ = streamed_budget(path, ScoreConfig(**JOB), 4, prefetch=False)
    resident = score_checkpoint(str(path), config=ScoreConfig(**JOB, stats_memory_budget=stats_budget,
                                                              execution="resident"))
    streamed = score_checkpoint(str(path), config=ScoreConfig(**JOB, stats_memory_budget=stats_budget,
                                                              max_memory=budget, execution="streamed"))
    assert resident.n_passes == 3
    assert streamed.plan["mode"] == "streamed" and streamed.plan["passes"] == 3
    assert streamed.n_passes == 3 * 3  # 3 groups, each in 3 passes over the probe
    assert_same_scores(streamed, resident)
    # and both equal the scores of one group
    whole = score_checkpoint(str(path), config=ScoreConfig(**JOB, execution="resident"))
    assert_same_scores(streamed, whole, tol=1e-9)


def file_tensors(path: Path) -> dict[str, int]:
    """Every tensor of the checkpoint and its bytes on disk, from the safetensors headers."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        header, _ = read_header(f)
        for name, t in header.items():
            if name != "__metadata__":
                begin, end = t["data_offsets"]
                out[name] = end - begin
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefetch", [True, False])
def test_each_block_and_the_rest_are_read_once_per_pass_in_their_stage(family, prefetch, deep):
    path = deep(family)
    sizes = file_tensors(path)
    prefix = planner.find_block_prefix(sizes, LAYERS)
    blocks = {n for n in sizes if planner.block_of(n, prefix) is not None}
    head = {n for n in sizes if n.startswith(HEADS[family])}
    others = set(sizes) - blocks - head
    assert len(blocks) >= 6 * LAYERS and others

    headers = {f.name: read_header(f) for f in path.glob("*.safetensors")}
    source = WeightSource(path, headers)
    loads: dict[str, int] = {}
    load = source.load

    def counting(name, *args, **kwargs):
        loads[name] = loads.get(name, 0) + 1
        return load(name, *args, **kwargs)

    source.load = counting
    model = build_streamed(path, source, with_lm_head=False, device=torch.device("cpu"), dtype=torch.float32,
                           prefetch=prefetch, find_blocks=find_blocks)
    tokens = tokenize_probe(default_probe(), ckpt.load_tokenizer(path), max_tokens=640, seq_len=64)
    config = ScoreConfig(**JOB)
    try:
        streamed, passes = score_blockwise(model, tokens, config=config, sequences_per_pass=4)
    finally:
        model.close()
    assert passes == 3  # 10 sequences, 4 a pass
    assert {n: loads.get(n, 0) for n in blocks} == dict.fromkeys(blocks, 3)
    # the tensors outside the blocks are held only in the stage that uses them, so each pass
    # reads them again: the input embeddings to embed (never in the tail), the final norm in
    # the tail; position embeddings (GPT-2's wpe) in both
    embedding = {n for n in others if planner.INPUT_EMBEDDING.search(n)}
    assert len(embedding) == 1
    assert {n: loads.get(n, 0) for n in embedding} == dict.fromkeys(embedding, 3)
    assert all(loads.get(n, 0) in (3, 6) for n in others - embedding), loads
    assert not head & set(loads)
    assert source.bytes_read == sum(loads[n] * sizes[n] for n in loads)
    # and the weights were the checkpoint's: the scores are the resident model's
    resident_model = ckpt.load_model(ckpt.inspect_checkpoint(path), device=torch.device("cpu"), dtype=torch.float32)
    resident, _ = score_model(resident_model, tokens, config=config)
    for metric in BASE_METRICS:
        assert streamed.metric(metric) == pytest.approx(resident.metric(metric), abs=TOL)


# ---------------------------------------------------------------- replaceability


def oracle_losses(lm, maps, held, *, final_norm: bool) -> tuple[float, dict[int, tuple[float | None, float]]]:
    """Whole forward passes of the LM with block i's output replaced by its input (drop) or by
    maps[i] of its input (linear), through a forward hook; the loss is the mean next-token
    cross-entropy over real positions, in float64 from the logits."""
    ids = torch.tensor(held.input_ids)
    attn = torch.tensor(held.attention_mask)
    target, real = ids[:, 1:], attn[:, 1:].bool()
    blocks = find_blocks(lm)

    def loss() -> float:
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=attn, use_cache=False).logits.double()
        nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, target[..., None])[..., 0]
        return float(nll[real].mean())

    def replaced(i: int, f):
        def hook(_module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            new = f(h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return blocks[i].register_forward_hook(hook, with_kwargs=True)

    intact = loss()
    deltas = {}
    for i in range(len(blocks)):
        handle = replaced(i, lambda h: h)
        try:
            drop = loss() - intact
        finally:
            handle.remove()
        linear = None
        if not (final_norm and i == len(blocks) - 1):
            handle = replaced(i, maps[i])
            try:
                linear = loss() - intact
            finally:
                handle.remove()
        deltas[i] = (linear, drop)
    return intact, deltas


@pytest.mark.parametrize("family", FAMILIES)
def test_replaceability_equals_whole_forward_passes_with_the_block_replaced(family, checkpoints):
    path = checkpoints(family)
    lm = ckpt.load_model(ckpt.inspect_checkpoint(path), device=torch.device("cpu"), dtype=torch.float32,
                         with_lm_head=True)
    # weights 15 times the initialiser's: a random LM at its default scale predicts nearly
    # uniformly and no block moves its loss by more than ~1e-3; at this scale each does by
    # ~0.01 to 0.3 nats, so a wrong block, map or token count shows
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=g)
    tokenizer = ckpt.load_tokenizer(path)
    tokens = tokenize_probe(default_probe(), tokenizer, max_tokens=1200, seq_len=64)
    maps = {}
    scores, _ = score_model(lm.base_model, tokens, maps=maps)
    final_norm = scores.pairs[-1].final_norm
    assert final_norm is True and set(maps) == {0, 1, 2}
    held, _ = holdout_tokens(default_probe(), tokenizer, used=tokens, n_tokens=512, seed=0)
    runner = BlockRunner(lm, find_blocks(lm), torch.device("cpu"))
    base, deltas = replaceability(runner, maps, held, final_norm=final_norm, batch_size=3)
    want_base, want = oracle_losses(lm, maps, held, final_norm=final_norm)
    tol = 1e-6 * want_base
    assert base == pytest.approx(want_base, rel=1e-6)
    assert set(deltas) == set(want) == {0, 1, 2}
    for i in want:
        (lin, drop), (want_lin, want_drop) = deltas[i], want[i]
        assert abs(drop - want_drop) <= tol, (i, drop, want_drop)
        assert (lin is None) == (want_lin is None) == (i == 2)
        if lin is not None:
            assert abs(lin - want_lin) <= tol, (i, lin, want_lin)
    # the measurement is not trivially zero: dropping any block changes the loss
    assert all(abs(drop) > 500 * tol for _, drop in deltas.values()), deltas


@pytest.mark.parametrize("family", FAMILIES)
def test_replaceability_streamed_equals_resident(family, deep):
    path = deep(family)
    job = dict(JOB, replaceability=True, holdout_tokens=256)
    budget, _ = streamed_budget(path, ScoreConfig(**job), 4, prefetch=False)
    resident = score_checkpoint(str(path), config=ScoreConfig(**job, execution="resident"))
    streamed = score_checkpoint(str(path), config=ScoreConfig(**job, max_memory=budget, execution="streamed"))
    assert streamed.plan["mode"] == "streamed" and streamed.plan["passes"] == 3
    assert resident.plan["mode"] == "resident"
    assert_same_scores(streamed, resident)
    assert streamed.holdout["n_tokens"] == resident.holdout["n_tokens"] > 0
    assert streamed.holdout["intact_loss"] == pytest.approx(resident.holdout["intact_loss"], abs=1e-8)
    for s, r in zip(streamed.scores.pairs, resident.scores.pairs, strict=True):
        assert abs(s.loss_delta_drop - r.loss_delta_drop) <= 1e-8, s.layer
        assert (s.loss_delta_linear is None) == (r.loss_delta_linear is None) == (s.layer == LAYERS - 1)
        if s.loss_delta_linear is not None:
            assert abs(s.loss_delta_linear - r.loss_delta_linear) <= 1e-8, s.layer


def test_a_replaceability_job_with_few_tokens_per_dimension_is_warned(deep):
    path = deep("llama")
    d = 32
    enough = math.ceil(REPLACEABILITY_TOKENS_PER_DIM * d)  # 1024 tokens

    def warning(warnings):
        return [w for w in warnings if w.startswith("replaceability:")]

    result = score_checkpoint(str(path), config=ScoreConfig(**JOB, replaceability=True, holdout_tokens=128,
                                                            execution="streamed", max_memory=2**30))
    (w,) = warning(result.scores.warnings)
    assert "fitted on 640 tokens, 20.0 per dimension (d=32)" in w and f"--max-tokens {enough}" in w
    assert result.scores.pairs[0].loss_delta_drop is not None  # a warning, not a refusal
    # the boundary: enough tokens per dimension, or no replaceability, warns of nothing
    at = prepare(str(path), config=ScoreConfig(max_tokens=enough, seq_len=64, replaceability=True))
    assert at.tokens.n_tokens == enough and warning(at.warnings) == []
    below = prepare(str(path), config=ScoreConfig(max_tokens=enough - 1, seq_len=64, replaceability=True))
    assert len(warning(below.warnings)) == 1
    assert warning(prepare(str(path), config=ScoreConfig(**JOB)).warnings) == []


def test_a_sharded_checkpoint_streams_too(tmp_path, tokenizer):
    path = build_checkpoint(tmp_path / "sharded", "llama", tokenizer, seed=2, layers=LAYERS,
                            max_shard_size="60KB")
    files = list(path.glob("*.safetensors"))
    assert len(files) >= 3 and (path / "model.safetensors.index.json").is_file()
    # the blocks' tensors are spread over the files
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({f for n, f in index.items() if n.startswith("model.layers.")}) >= 3
    budget, _ = streamed_budget(path, ScoreConfig(**JOB), 4, prefetch=False)
    streamed = score_checkpoint(str(path), config=ScoreConfig(**JOB, max_memory=budget, execution="streamed"))
    resident = score_checkpoint(str(path), config=ScoreConfig(**JOB, execution="resident"))
    assert streamed.plan["mode"] == "streamed" and streamed.plan["passes"] == 3
    assert_same_scores(streamed, resident)


# ---------------------------------------------------------------- peak memory

BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=32, num_attention_heads=12,
           num_key_value_heads=12, vocab_size=4096, max_position_embeddings=512)
BUDGET = 256 * 2**20

MEASURE = textwrap.dedent("""
    import json, re, sys

    def rss_kib(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+)", f.read())[1])

    # code only (no model, no tensor) before the baseline
    import accelerate, torch, transformers.models.llama.modeling_llama  # noqa: F401
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    # one thread: weights and activations do not depend on it, and on 2 cores shared with
    # other work, two threads spinning for their turn take 2 to 4 times as long
    torch.set_num_threads(1)

    path, budget, max_tokens, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    config = ScoreConfig(max_memory=budget, max_tokens=max_tokens, seq_len=seq_len)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    base = rss_kib("VmRSS")
    result = score_checkpoint(path, config=config)
    print(json.dumps({"base_kib": base, "peak_kib": rss_kib("VmHWM"), "plan": result.plan,
                      "warnings": result.scores.warnings, "n_tokens": result.scores.n_tokens,
                      "timings": result.timings}))
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory, tokenizer):
    """A random-init Llama of 0.87 GiB of float32 weights (32 blocks of 27 MiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert len(tokenizer) <= BIG["vocab_size"]
    config = LlamaConfig(**BIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("big") / "llama-1g"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


def test_a_model_three_times_the_budget_is_scored_within_it(big_checkpoint, tmp_path):
    path = big_checkpoint
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert weights > 3 * BUDGET
    d = BIG["hidden_size"]
    max_tokens = math.ceil(engine.WARN_TOKENS_PER_DIM * d)  # the fewest the engine takes without warning
    assert engine.check_token_count(max_tokens, d) == [] and engine.check_token_count(max_tokens - 1, d)
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    out = subprocess.run([sys.executable, str(script), str(path), str(BUDGET), str(max_tokens), "256"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    plan = m["plan"]
    assert plan["mode"] == "streamed" and plan["budget"] == BUDGET
    assert m["n_tokens"] == max_tokens and m["warnings"] == []
    mib = 2**20
    peak = (m["peak_kib"] - m["base_kib"]) * 1024
    bound = 1.15 * (BUDGET + plan["stats_bytes"])
    figures = (f"peak RSS above the baseline {peak / mib:.1f} MiB (baseline {m['base_kib'] / 1024:.1f} MiB); "
               f"bound {bound / mib:.1f} MiB = 1.15 × (budget {BUDGET / mib:.0f} MiB + statistics "
               f"{plan['stats_bytes'] / mib:.1f} MiB); planned peak {plan['peak_bytes'] / mib:.1f} MiB + statistics; "
               f"weights {weights / mib:.0f} MiB; {plan['passes']} pass(es), prefetch {plan['prefetch']}; "
               f"timings {m['timings']}")
    print(figures)
    assert peak <= bound, figures


@pytest.mark.slow
def test_a_135m_checkpoint_with_a_108_mib_embedding_streams_under_150_mib(tmp_path, tokenizer):
    """SmolLM2-135M's shape (d = 576, 30 blocks, a tied 49,152-token embedding: 108 MiB of its
    540 MB in float32) under a 150 MiB budget: the embedding is held only while a pass embeds
    its sequences, so the plan streams (held through every block, it did not fit), and the
    scores are the resident ones."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                      rope_theta=100000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    path = tmp_path / "smollm2-shape"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    budget = 150 * 2**20
    options = dict(max_tokens=1280, seq_len=512, batch_size=2)  # the CPU's default batch
    prep = prepare(str(path), config=ScoreConfig(**options, max_memory=budget))
    shape, plan = prep.shape, prep.plan
    assert 108 * 2**20 <= shape.input_embedding_bytes == shape.other_bytes - 576 * 4  # and the final norm
    assert plan.mode == "streamed" and plan.peak_bytes <= budget, plan
    act = planner.activation_bytes(shape, batch_sequences=2, seq_len=512, dtype_bytes=4)
    assert shape.other_bytes + shape.max_block_bytes + act > budget  # what holding it throughout needed
    streamed = score_checkpoint(str(path), config=ScoreConfig(**options, max_memory=budget))
    assert streamed.plan["mode"] == "streamed"
    resident = score_checkpoint(str(path), config=ScoreConfig(**options, execution="resident"))
    assert_same_scores(streamed, resident, tol=1e-9)
