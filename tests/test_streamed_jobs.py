"""The memory plan through the service and the CLI: a worker whose LAYERTRACK_MAX_MEMORY is
below a model's weights scores it streamed, records the plan on the job and stores the same
scores as resident scoring; a model that cannot fit even streamed fails before loading with
the numbers; ``layertrack score --plan`` prints the plan without scoring."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
from layertrack.workers import planner
from layertrack.workers.scoring import ScoreConfig, prepare, score_checkpoint
from services import layertrack_exe

CFG = {"max_tokens": 4096, "seq_len": 64}
METRICS = ("linearity", "linearity_nores", "cosine", "norm_ratio", "anisotropy")


def two_pass_budget(path) -> int:
    """A budget that streams the checkpoint at ``path`` in two passes (from the planner's own model)."""
    prep = prepare(str(path), config=ScoreConfig(**CFG, execution="streamed"))
    shape, plan = prep.shape, prep.plan
    n_seq = len(prep.tokens.input_ids)
    act = planner.activation_bytes(shape, batch_sequences=plan.batch_sequences, seq_len=prep.seq_len, dtype_bytes=4)
    per_seq = prep.seq_len * shape.d * 4
    half = -(-n_seq // 2 // plan.batch_sequences) * plan.batch_sequences
    peak = planner.streamed_stage_peak(shape, act=act, batch_bytes=plan.batch_sequences * per_seq, prefetch=False)
    return peak + half * per_seq + per_seq


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A model whose weights outweigh a batch's activations (12 blocks of d = 256) and one whose
    single block does not fit the budget that streams the first (d = 512)."""
    from tiny_models import build_checkpoint

    root = tmp_path_factory.mktemp("streamed-models")
    deep = build_checkpoint(root / "deep", "llama", tokenizer, seed=7, hidden=256, layers=12)
    wide = build_checkpoint(root / "wide", "llama", tokenizer, seed=8, hidden=512, layers=2)
    return deep, wide, two_pass_budget(deep)


@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_server, models):
    from services import live_service

    _deep, _wide, budget = models
    with live_service(tmp_path_factory.mktemp("streamed"), redis_server.new_url(), db_url=pg_url,
                      extra_env={"LAYERTRACK_MAX_MEMORY": str(budget)}) as svc:
        yield svc


def scored(live, client, model, name: str) -> tuple[str, dict]:
    """A copy of ``model`` under the service's roots submitted as step 1 of a new run; (run, the finished job)."""
    run = f"{name}-{uuid.uuid4().hex[:6]}"
    path = live.roots / run / "step-1"
    shutil.copytree(model, path)
    return run, client.wait(client.submit(run=run, step=1, uri=str(path), config=CFG)["id"], timeout=300, poll=0.5)


def test_a_worker_streams_a_model_over_its_budget_and_stores_the_same_scores(live, models):
    deep, _wide, budget = models
    with live.client() as c:
        run, job = scored(live, c, deep, "streamed")
        assert job["status"] == "succeeded", (job, live.logs())
        plan = job["result"]["plan"]
        assert (plan["mode"], plan["passes"], plan["budget"]) == ("streamed", 2, budget), plan
        assert plan["peak_bytes"] <= budget and plan["weight_bytes"] > budget
        stored = {m: {s["layer"]: s["values"][0] for s in c.scores(run, metric=m)["series"]} for m in METRICS}
    resident = score_checkpoint(str(deep), config=ScoreConfig(**CFG, execution="resident"))
    for m in METRICS:
        want = resident.scores.metric(m)
        assert max(abs(stored[m][i] - want[i]) for i in range(len(want))) <= 1e-10, m


def test_a_model_that_cannot_fit_even_streamed_fails_before_loading(live, models):
    _deep, wide, budget = models
    with live.client() as c:
        _run, job = scored(live, c, wide, "toobig")
    assert job["status"] == "failed" and job["error_code"] == "plan_does_not_fit", job
    assert f"does not fit a budget of {planner.fmt_bytes(budget)} even streamed" in job["error"]
    assert "its largest block (" in job["error"] and "LAYERTRACK_MAX_MEMORY" in job["error"]


def test_score_plan_prints_the_plan_without_scoring(models):
    deep, _wide, budget = models
    base = [layertrack_exe(), "score", str(deep), "--max-tokens", "4096", "--seq-len", "64"]
    out = subprocess.run([*base, "--plan", "--json", "--max-memory", str(budget)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert (plan["mode"], plan["passes"], plan["budget"]) == ("streamed", 2, budget)
    text = subprocess.run([*base, "--plan", "--max-memory", f"{budget / 2**20:.3f}MiB"], capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "plan: streamed, 2 passes over the probe" in text.stdout
    assert "linearity" not in text.stdout  # nothing scored
    resident = subprocess.run([*base, "--plan", "--max-memory", "8GiB"], capture_output=True, text=True, timeout=120)
    assert "plan: resident, 1 pass over the probe" in resident.stdout, resident.stderr
    bad = subprocess.run([*base, "--plan", "--max-memory", "lots"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not a size" in bad.stderr
