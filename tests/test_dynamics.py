"""weight_update between two checkpoints (workers/dynamics.py) against an oracle that loads
both state dicts whole and computes the norms in float64."""

from __future__ import annotations

import math

import pytest
import torch
from layertrack.workers import dynamics
from layertrack.workers.errors import CheckpointsDiffer
from safetensors.torch import load_file
from tiny_models import build_checkpoint


def oracle(current, previous, prefix: str, kinds: dict[str, str]) -> dict[int, dict[str, float]]:
    a = {k: v.to(torch.float64) for k, v in load_file(current / "model.safetensors").items()}
    b = {k: v.to(torch.float64) for k, v in load_file(previous / "model.safetensors").items()}
    out: dict[int, dict[str, float]] = {}
    blocks = sorted({int(k[len(prefix):].split(".")[0]) for k in a if k.startswith(prefix)})
    for i in blocks:
        names = [k for k in a if k.startswith(f"{prefix}{i}.")]

        def ratio(chosen):
            delta = sum(float((a[k] - b[k]).square().sum()) for k in chosen)
            return math.sqrt(delta / sum(float(b[k].square().sum()) for k in chosen))

        out[i] = {"total": ratio(names)}
        for kind, marker in kinds.items():
            out[i][kind] = ratio([k for k in names if marker in k])
    return out


@pytest.mark.parametrize("family, prefix, kinds", [
    ("llama", "model.layers.", {"attention": ".self_attn.", "mlp": ".mlp.", "norm": "layernorm"}),
    ("gpt2", "transformer.h.", {"attention": ".attn.", "mlp": ".mlp.", "norm": ".ln_"}),
])
def test_weight_update_per_block_and_kind_matches_the_oracle(tmp_path, tokenizer, family, prefix, kinds):
    previous = build_checkpoint(tmp_path / "prev", family, tokenizer, seed=0)
    current = build_checkpoint(tmp_path / "now", family, tokenizer, seed=0)
    state = load_file(current / "model.safetensors")  # a "training step": block 1 moves, block 0 barely
    g = torch.Generator().manual_seed(5)
    for name, t in state.items():
        scale = 0.3 if f"{prefix}1." in name else 1e-3 if f"{prefix}0." in name else 0.0
        state[name] = t + scale * torch.randn(t.shape, generator=g) * t.std().nan_to_num(1.0).clamp_min(1e-3)
    from safetensors.torch import save_file

    save_file(state, str(current / "model.safetensors"), metadata={"format": "pt"})
    got = dynamics.weight_updates(current, previous)
    want = oracle(current, previous, prefix, kinds)
    assert [u.block for u in got] == sorted(want)
    for u in got:
        assert u.weight_update == pytest.approx(want[u.block]["total"], rel=1e-12), u.block
        assert set(u.kinds) == set(kinds)
        for kind in kinds:
            assert u.kinds[kind] == pytest.approx(want[u.block][kind], rel=1e-12), (u.block, kind)
    assert got[0].weight_update < 0.01 < got[1].weight_update
    assert got[2].weight_update == 0.0


def test_the_same_checkpoint_has_not_moved_and_another_architecture_is_refused(tmp_path, tokenizer):
    a = build_checkpoint(tmp_path / "a", "llama", tokenizer, seed=0)
    assert all(u.weight_update == 0.0 for u in dynamics.weight_updates(a, a))
    wider = build_checkpoint(tmp_path / "b", "llama", tokenizer, seed=0, hidden=48)
    with pytest.raises(CheckpointsDiffer, match="not the same architecture"):
        dynamics.weight_updates(a, wider)


def _drift(x, y, batch: int) -> list[float]:
    stats = dynamics.DriftStats(x[0].shape[1], len(x))
    for start in range(0, x[0].shape[0], batch):
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            stats.add(i, a[start:start + batch], b[start:start + batch])
    return stats.drift()


def test_drift_cka_streamed_in_batches_matches_the_oracle_and_its_invariances():
    from layertrack.workers import reference

    g = torch.Generator().manual_seed(41)
    n, d = 2000, 24
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 5
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    same_up_to_rotation = 7 * x @ rotation - 2  # rotated, scaled, shifted: CKA 1, no drift
    partly = x + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    unrelated = torch.randn(n, d, generator=g, dtype=torch.float64)
    xs = [x, x, x]
    ys = [same_up_to_rotation, partly, unrelated]
    got = _drift(xs, ys, batch=300)
    want = [reference.drift_cka(a, b) for a, b in zip(xs, ys, strict=True)]
    assert got == pytest.approx(want, abs=1e-12)
    assert abs(got[0]) < 1e-12 and 0.05 < got[1] < 0.9 and got[2] > 0.9
    assert _drift(xs, ys, batch=n) == pytest.approx(got, abs=1e-12)  # batching does not matter


def test_layertrack_score_compare_to_prints_weight_update_per_block(tmp_path, tokenizer):
    import json
    import subprocess

    from services import layertrack_exe

    a = build_checkpoint(tmp_path / "a", "llama", tokenizer, seed=0)
    b = build_checkpoint(tmp_path / "b", "llama", tokenizer, seed=1)
    args = [layertrack_exe(), "score", str(b), "--max-tokens", "300", "--seq-len", "64", "--quiet"]
    table = subprocess.run([*args, "--compare-to", str(a)], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "w_update" in table.stdout and f"against {a}" in table.stdout
    out = subprocess.run([*args, "--compare-to", str(a), "--json"], capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout)
    want = {u.block: u.weight_update for u in dynamics.weight_updates(b, a)}
    assert {p["layer"]: p["weight_update"] for p in result["pairs"]} == pytest.approx(want, rel=1e-12)
    off = subprocess.run([*args, "--compare-to", str(a), "--no-dynamics", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert all(p["weight_update"] is None for p in json.loads(off.stdout)["pairs"])


def _oracle_drift(current, earlier, tokens) -> list[float]:
    """drift_cka of every hidden state from the definition: both models' hidden states over all
    the scored tokens kept (float64), reference.drift_cka of each pair."""
    from layertrack.workers import checkpoint as ckpt
    from layertrack.workers import reference

    models = [ckpt.load_model(ckpt.inspect_checkpoint(p, check_causal_lm=False), dtype=torch.float32)
              for p in (current, earlier)]
    ids = torch.tensor(tokens.input_ids)
    keep = torch.tensor(tokens.score_mask, dtype=torch.bool).reshape(-1)
    with torch.no_grad():
        hs = [m(input_ids=ids, attention_mask=torch.tensor(tokens.attention_mask), output_hidden_states=True)
              .hidden_states for m in models]
    d = hs[0][0].shape[-1]
    return [reference.drift_cka(x.reshape(-1, d)[keep], y.reshape(-1, d)[keep]) for x, y in zip(*hs, strict=True)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_drift_cka_of_a_scored_checkpoint_matches_the_oracle_in_one_group_and_several(tmp_path, tokenizer, family):
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    a = build_checkpoint(tmp_path / "a", family, tokenizer, seed=0, hidden=128)
    b = build_checkpoint(tmp_path / "b", family, tokenizer, seed=1, hidden=128)
    config = ScoreConfig(max_tokens=1024, seq_len=64, batch_size=4, compare_to=str(a), dtype="float32")
    result = score_checkpoint(str(b), config=config)
    got = [s.drift_cka for s in result.scores.layers]
    want = _oracle_drift(b, a, __import__("layertrack.workers.scoring", fromlist=["prepare"]).prepare(
        str(b), config=config).tokens)
    assert got == pytest.approx(want, abs=1e-9)
    assert all(0.0 < v < 1.0 for v in got), got
    assert "seconds" in result.dynamics["drift_cka"]
    # Grams for one hidden state at a time: one pass over both models per hidden state, the same values
    from layertrack.workers.dynamics import DriftStats
    from layertrack.workers.engine import stats_bytes

    d, n_hidden = result.scores.d, len(got)
    budget = max(stats_bytes(2, d), DriftStats.bytes(d, 1))  # the engine's least: one pair
    assert budget // DriftStats.bytes(d, 1) < n_hidden  # so drift takes several groups
    tight = score_checkpoint(str(b), config=ScoreConfig(**{**vars(config), "stats_memory_budget": budget}))
    assert [s.drift_cka for s in tight.scores.layers] == pytest.approx(got, abs=1e-12)
    itself = score_checkpoint(str(b), config=ScoreConfig(**{**vars(config), "compare_to": str(b)}))
    assert all(abs(s.drift_cka) < 1e-12 for s in itself.scores.layers), [s.drift_cka for s in itself.scores.layers]
    assert all(p.weight_update == 0.0 for p in itself.scores.pairs)
