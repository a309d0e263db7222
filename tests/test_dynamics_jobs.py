"""weight_update through the service (the API server, a Celery worker, PostgreSQL, Redis): a
run's second step is compared with its first, stored per block and served like every metric;
the first step, ``dynamics: false`` and an earlier checkpoint that is gone leave it absent
with the reason on the job, never a failed job or a wrong value."""

from __future__ import annotations

import shutil
import uuid

import pytest
from safetensors.torch import load_file, save_file
from services import live_service
from test_dynamics import oracle
from tiny_models import build_checkpoint

CFG = {"max_tokens": 600, "seq_len": 64}
LLAMA_KINDS = {"attention": ".self_attn.", "mlp": ".mlp.", "norm": "layernorm"}


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server):
    with live_service(tmp_path_factory.mktemp("dynamics"), redis_server.new_url()) as svc:
        yield svc


def trained(path, start, scale: float, seed: int):
    """``start``'s weights moved by noise of ``scale`` (block 0 less than the others)."""
    import torch

    shutil.copytree(start, path)
    state = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        factor = scale / 10 if "layers.0." in name else scale
        state[name] = t + factor * t.abs().mean().clamp_min(1e-3) * torch.randn(t.shape, generator=g)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def by_layer(scores: dict) -> dict[int, dict[int, float]]:
    """{step: {layer: value}} of a scores answer."""
    out: dict[int, dict[int, float]] = {}
    for series in scores["series"]:
        for step, value in zip(series["steps"], series["values"], strict=True):
            out.setdefault(step, {})[series["layer"]] = value
    return out


def test_weight_update_is_measured_against_the_previous_scored_step_stored_and_served(live, tokenizer):
    run = f"dyn-{uuid.uuid4().hex[:6]}"
    base = live.roots / run
    s1 = build_checkpoint(base / "step-1", "llama", tokenizer, seed=3)
    s2 = trained(base / "step-2", s1, 0.05, seed=1)
    s3 = trained(base / "step-3", s2, 0.05, seed=2)
    s4 = trained(base / "step-4", s3, 0.05, seed=3)
    with live.client() as c:
        j1 = c.wait(c.submit(run=run, step=1, uri=str(s1), config=CFG)["id"], timeout=240, poll=0.3)
        j2 = c.wait(c.submit(run=run, step=2, uri=str(s2), config=CFG)["id"], timeout=240, poll=0.3)
        j3 = c.wait(c.submit(run=run, step=3, uri=str(s3), config={**CFG, "dynamics": False})["id"], timeout=240,
                    poll=0.3)
        assert [j["status"] for j in (j1, j2, j3)] == ["succeeded"] * 3, live.logs()
        shutil.rmtree(s3)  # the earlier checkpoint of step 4 is gone by the time it runs
        j4 = c.wait(c.submit(run=run, step=4, uri=str(s4), config={**CFG, "dynamics": True})["id"], timeout=240,
                    poll=0.3)
        assert j4["status"] == "succeeded", (j4, live.logs())
        got = by_layer(c.scores(run, metric="weight_update"))
        assert set(got) == {2}  # step 1 had nothing before it, step 3 said no, step 4's earlier one was gone
        want = oracle(s2, s1, "model.layers.", LLAMA_KINDS)
        assert got[2] == pytest.approx({i: w["total"] for i, w in want.items()}, rel=1e-9)
        assert got[2][0] < got[2][1]  # block 0 moved less
        result = c.job(j2["id"])["result"]
        assert result["dynamics"]["step"] == 1 and result["dynamics"]["compared_to"] == str(s1)
        kinds = {k["block"]: k for k in result["dynamics"]["weight_update_kinds"]}
        for i, w in want.items():
            assert kinds[i]["mlp"] == pytest.approx(w["mlp"], rel=1e-9)
        assert "dynamics" not in (c.job(j1["id"])["result"] or {})  # automatic: nothing before it, nothing said
        assert "dynamics" not in (c.job(j3["id"])["result"] or {})
        absent = c.job(j4["id"])["result"]["dynamics"]["absent"]
        assert "step 3" in absent and "cannot be read" in absent, absent
        trend = c.trend(run, metric="weight_update")
        assert trend["steps"] == [2]
        # drift_cka: both checkpoints run on the probe in the job, stored per hidden state
        from layertrack.workers.scoring import ScoreConfig, score_checkpoint

        drift = by_layer(c.scores(run, metric="drift_cka"))
        assert set(drift) == {2}
        local = score_checkpoint(str(s2), config=ScoreConfig(**CFG, compare_to=str(s1)))
        assert drift[2] == pytest.approx({s.layer: s.drift_cka for s in local.scores.layers}, rel=1e-9, abs=1e-12)
        assert len(drift[2]) == len(local.scores.layers) and all(0 < v < 1 for v in drift[2].values())
        assert result["dynamics"]["drift_cka"]["seconds"] >= 0
        heat = c.heatmap(run, metric="drift_cka")
        assert heat["steps"] == [2] and len(heat["layers"]) == len(drift[2])


def test_a_job_asked_for_the_logit_lens_stores_it_per_hidden_state(live, tokenizer):
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    run = f"lens-{uuid.uuid4().hex[:6]}"
    s1 = build_checkpoint(live.roots / run / "step-1", "llama", tokenizer, seed=4)
    with live.client() as c:
        plain = c.submit(run=run, step=1, uri=str(s1), config=CFG)
        lens = c.submit(run=run, step=1, uri=str(s1), config={**CFG, "logit_lens": True})
        assert lens["id"] != plain["id"]  # another config: another job
        again = c.submit(run=run, step=1, uri=str(s1), config={**CFG, "logit_lens": False})
        assert again["id"] == plain["id"]  # false is the default: the same job as without it
        for j in (plain, lens):
            assert c.wait(j["id"], timeout=240, poll=0.3)["status"] == "succeeded", live.logs()
        got = by_layer(c.scores(run, metric="logit_lens_loss"))
    local = score_checkpoint(str(s1), config=ScoreConfig(**CFG, logit_lens=True))
    assert got[1] == pytest.approx({s.layer: s.logit_lens_loss for s in local.scores.layers}, rel=1e-9)


def test_config_compare_to_names_a_step_of_the_run_or_a_checkpoint_by_its_path(live, tokenizer):
    from layertrack.service.client import ApiError

    run = f"cmp-{uuid.uuid4().hex[:6]}"
    base = live.roots / run
    s1 = build_checkpoint(base / "step-1", "llama", tokenizer, seed=3)
    s2 = trained(base / "step-2", s1, 0.05, seed=1)
    s3 = trained(base / "step-3", s2, 0.05, seed=2)
    with live.client() as c:
        for step, path in ((1, s1), (2, s2)):
            assert c.wait(c.submit(run=run, step=step, uri=str(path), config=CFG)["id"], timeout=240,
                          poll=0.3)["status"] == "succeeded"
        by_step = c.wait(c.submit(run=run, step=3, uri=str(s3), config={**CFG, "compare_to": 1})["id"],
                         timeout=240, poll=0.3)
        assert by_step["status"] == "succeeded", live.logs()
        dyn = c.job(by_step["id"])["result"]["dynamics"]
        assert dyn["step"] == 1 and dyn["named"] == 1 and dyn["compared_to"] == str(s1)
        want = oracle(s3, s1, "model.layers.", LLAMA_KINDS)
        assert by_layer(c.scores(run, metric="weight_update"))[3] == pytest.approx(
            {i: w["total"] for i, w in want.items()}, rel=1e-9)
        # by its path (another run's checkpoint would do as well): the same comparison, no step
        by_path = c.wait(c.submit(run=run + "-p", step=3, uri=str(s3), config={**CFG, "compare_to": str(s1)})["id"],
                         timeout=240, poll=0.3)
        dyn = c.job(by_path["id"])["result"]["dynamics"]
        assert dyn["step"] is None and dyn["compared_to"] == str(s1)
        assert by_layer(c.scores(run + "-p", metric="weight_update"))[3] == pytest.approx(
            {i: w["total"] for i, w in want.items()}, rel=1e-9)
        nowhere = c.wait(c.submit(run=run + "-n", step=3, uri=str(s3), config={**CFG, "compare_to": 7})["id"],
                         timeout=240, poll=0.3)
        assert nowhere["status"] == "succeeded"
        assert "step 7" in c.job(nowhere["id"])["result"]["dynamics"]["absent"]
        with pytest.raises(ApiError) as e:
            c.submit(run=run, step=4, uri=str(s3), config={**CFG, "compare_to": "/etc"})
        assert e.value.code == "checkpoint_outside_roots", e.value
