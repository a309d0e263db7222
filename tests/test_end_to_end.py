"""End to end over HTTP with real processes: API server, Celery workers, PostgreSQL, Redis.

Also the embedded mode (`layertrack up`: SQLite + filesystem broker) through the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import uuid

import httpx
import pytest
from layertrack.service.db import session_scope
from layertrack.service.models import Job, Score
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from layertrack.workers.vocabulary import LAYER_METRICS, PAIR_METRICS
from services import layertrack_exe, wait_until
from sqlalchemy import func, select

#: dynamics off: which earlier step a job is compared with depends on which finished first
CFG = {"max_tokens": 600, "seq_len": 64, "dynamics": False}
ROWS_PER_TINY_JOB = 3 * len(PAIR_METRICS) + 4 * len(LAYER_METRICS)  # 3 pairs, 4 hidden states


@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_server):
    from services import live_service

    with live_service(tmp_path_factory.mktemp("live"), redis_server.new_url(), db_url=pg_url) as svc:
        yield svc


def wait_all(client, ids, timeout=240):
    return {i: client.wait(i, timeout=timeout, poll=0.5) for i in ids}


def no_duplicate_scores(db_url) -> bool:
    with session_scope(db_url) as s:
        dup = s.execute(
            select(Score.run_id, Score.step, Score.metric, Score.layer)
            .group_by(Score.run_id, Score.step, Score.metric, Score.layer)
            .having(func.count() > 1)
        ).all()
    return dup == []


def test_three_steps_scored_and_read_back_as_series_trend_heatmap_and_exports(live, tokenizer):
    from tiny_models import build_checkpoint

    run = f"e2e-{uuid.uuid4().hex[:6]}"
    paths = {step: build_checkpoint(live.roots / run / f"step-{step}", "llama", tokenizer, seed=step)
             for step in (100, 200, 300)}
    with live.client() as c:
        ids = [c.submit(run=run, step=step, uri=str(p), config=CFG)["id"] for step, p in paths.items()]
        done = wait_all(c, ids)
        assert all(j["status"] == "succeeded" for j in done.values()), (done, live.logs())
        assert all(j["worker"].startswith("w1@") and j["attempts"] == 1 for j in done.values())
        job = done[ids[0]]
        assert job["result"]["n_tokens"] == 600 and job["result"]["d"] == 32
        assert job["duration_s"] > 0

        want = {step: score_checkpoint(str(p), config=ScoreConfig(**CFG)).scores for step, p in paths.items()}

        series = c.scores(run, metric="linearity_nores")["series"]
        assert [s["layer"] for s in series] == [0, 1, 2]
        assert series[2]["final_norm"] is True and series[0]["final_norm"] is False
        for s in series:
            assert s["steps"] == [100, 200, 300]
            expect = [want[st].pairs[s["layer"]].linearity_nores for st in (100, 200, 300)]
            assert s["values"] == pytest.approx(expect, abs=1e-6)
        one = c.scores(run, metric="anisotropy", layer=3)["series"]
        assert len(one) == 1 and one[0]["values"] == pytest.approx(
            [want[st].layers[3].anisotropy for st in (100, 200, 300)], abs=1e-6)

        trend = c.trend(run, metric="linearity")
        assert trend["steps"] == [100, 200, 300]
        expect = [sum(p.linearity for p in want[st].pairs[:-1]) / 2 for st in (100, 200, 300)]
        assert trend["values"] == pytest.approx(expect, abs=1e-6)

        heat = c.heatmap(run, metric="cosine")
        assert heat["steps"] == [100, 200, 300] and heat["layers"] == [0, 1, 2]
        for i, st in enumerate((100, 200, 300)):
            assert heat["values"][i] == pytest.approx([p.cosine for p in want[st].pairs], abs=1e-6)

        rows = list(csv.DictReader(io.StringIO(c.export(run, format="csv").decode())))
        assert len(rows) == 3 * ROWS_PER_TINY_JOB
        for r in rows:
            st, lay, m = int(r["step"]), int(r["layer"]), r["metric"]
            ref = getattr(want[st].layers[lay], m) if m in LAYER_METRICS else getattr(want[st].pairs[lay], m)
            assert float(r["value"]) == pytest.approx(ref, abs=1e-6)

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(c.export(run, format="parquet"))).to_pylist()
        assert len(table) == len(rows)
        assert sorted((t["step"], t["layer"], t["metric"], t["value"]) for t in table) == sorted(
            (int(r["step"]), int(r["layer"]), r["metric"], float(r["value"])) for r in rows)

        both = c.compare([run, run], metric="linearity")
        assert [r["values"] for r in both["runs"]] == [trend["values"], trend["values"]]

    # the CLI talks to the same server
    env = dict(os.environ, LAYERTRACK_URL=live.url, LAYERTRACK_TOKEN=live.token)
    out = subprocess.run([layertrack_exe(), "trend", run, "--metric", "linearity"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [ln.split() for ln in out.stdout.splitlines()[2:]]
    assert [int(ln[0]) for ln in lines] == [100, 200, 300]
    assert [float(ln[1]) for ln in lines] == pytest.approx(trend["values"], abs=1e-6)
    out = subprocess.run([layertrack_exe(), "wait", ids[0]], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0 and "succeeded" in out.stdout


def test_two_workers_ten_jobs_each_done_once(live, tokenizer):
    from tiny_models import build_checkpoint

    live.start_worker("w2")
    run = f"ten-{uuid.uuid4().hex[:6]}"
    path = build_checkpoint(live.roots / run / "ckpt", "gpt2", tokenizer, seed=5)
    with live.client() as c:
        ids = [c.submit(run=run, step=step, uri=str(path), config=CFG)["id"] for step in range(10)]
        done = wait_all(c, ids)
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in done.values()), live.logs()
    with session_scope(live.db_url) as s:
        n = s.scalar(select(func.count()).select_from(Score).where(Score.job_id.in_(ids)))
    assert n == 10 * ROWS_PER_TINY_JOB
    assert no_duplicate_scores(live.db_url)


def test_a_worker_killed_mid_job_leaves_it_to_another_worker(live, tokenizer):
    """SIGKILL the worker (and its pool process) running a job: the sweeper sees the
    heartbeat stop, re-queues the job, and the other worker finishes it."""
    from tiny_models import build_checkpoint

    run = f"kill-{uuid.uuid4().hex[:6]}"
    path = build_checkpoint(live.roots / run / "ckpt", "llama", tokenizer, hidden=384, layers=6)
    cfg = {"max_tokens": 24576, "seq_len": 512}  # long enough (seconds) to be killed mid-run
    if "w2" not in live.workers:
        live.start_worker("w2")
    with live.client() as c:
        job = c.submit(run=run, step=1, uri=str(path), config=cfg)

        def running():
            j = c.job(job["id"])
            assert j["status"] in ("queued", "running"), (j, live.logs())  # not finished: too short a job
            return j if j["status"] == "running" else None

        j = wait_until(running, 120, what="the job to start running")

        def job_row():
            with session_scope(live.db_url) as s:
                return s.get(Job, job["id"])

        # kill it mid-run, once its heartbeat has been refreshed (the scoring is under way)
        first_beat = job_row().heartbeat_at

        def beat_again() -> bool:
            row = job_row()
            assert row.status.value == "running", (row.status, live.logs())
            return row.heartbeat_at != first_beat

        wait_until(beat_again, 30, what="the running job's next heartbeat")
        victim = j["worker"].split("@")[0]
        survivor = "w2" if victim == "w1" else "w1"
        live.kill_worker(victim)
        done = c.wait(job["id"], timeout=300, poll=0.5)
    assert done["status"] == "succeeded", (done, live.logs())
    assert done["worker"].startswith(f"{survivor}@") and done["attempts"] == 2
    with session_scope(live.db_url) as s:
        n = s.scalar(select(func.count()).select_from(Score).where(Score.job_id == job["id"]))
    assert n == 6 * len(PAIR_METRICS) + 7 * len(LAYER_METRICS)  # 6 blocks, 7 hidden states
    assert no_duplicate_scores(live.db_url)
    live.start_worker(victim)


def test_broker_down_while_submitting_loses_nothing(tmp_path, tokenizer):
    """A Redis of the test's own is stopped while a client submits: each submission is
    stored and accepted (202) without being sent, and runs once Redis is back (the sweeper
    sends it); nothing is accepted and then lost."""
    from services import RedisServer, Service, create_pg_database, drop_pg_database
    from tiny_models import build_checkpoint

    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        db = create_pg_database()
    except BaseException:
        redis.close()
        raise
    roots = tmp_path / "ckpts"
    roots.mkdir()
    svc = Service(tmp=tmp_path, db_url=db, broker_url=redis.new_url(), roots=roots)
    try:
        svc.migrate_and_token()
        svc.start_api()
        svc.start_worker("wr")
        path = build_checkpoint(roots / "ckpt", "qwen2", tokenizer)
        redis.stop()
        ready = httpx.get(svc.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unreachable")
        assert ready.headers["Retry-After"]
        accepted = []
        with svc.http() as h:
            for step in range(3):
                r = h.post("/v1/checkpoints", json={"run": "outage", "step": step, "uri": str(path), "config": CFG})
                assert r.status_code == 202, r.text
                accepted.append(r.json()["id"])
        with session_scope(db) as s:
            stored = s.scalars(select(Job).where(Job.id.in_(accepted))).all()
            assert len(stored) == 3 and {j.status.value for j in stored} == {"queued"}
            assert all(j.enqueued_at is None for j in stored)
        redis.start()
        with svc.client() as c:
            done = wait_all(c, accepted, timeout=180)
        assert all(j["status"] == "succeeded" for j in done.values()), (done, svc.logs())
    finally:
        svc.stop()
        redis.close()
        drop_pg_database(db)


def test_layertrack_up_runs_everything_without_servers(tmp_path, tokenizer):
    """The README's main command: API + worker on SQLite and a filesystem broker."""
    from services import AS_BACKGROUND_JOB, free_port, interrupt_group, ready
    from tiny_models import build_checkpoint

    port = free_port()
    roots = tmp_path / "ckpts"
    path = build_checkpoint(roots / "run" / "step-5", "opt", tokenizer)
    env = dict(os.environ, LAYERTRACK_DATA_DIR=str(tmp_path / "data"), LAYERTRACK_CHECKPOINT_ROOTS=str(roots),
               OMP_NUM_THREADS="1")
    for k in ("LAYERTRACK_DATABASE_URL", "LAYERTRACK_BROKER_URL", "LAYERTRACK_URL", "LAYERTRACK_TOKEN"):
        env.pop(k, None)
    exe = layertrack_exe()
    # as a script's background job: SIGINT ignored, which up restores (it stops on Ctrl-C below)
    up = subprocess.Popen([*AS_BACKGROUND_JOB, exe, "up", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = up.stdout.readline()
        assert first.startswith(f"layertrack is up at http://127.0.0.1:{port}"), first
        saved = json.loads((tmp_path / "data" / "client.json").read_text())
        assert saved["url"] == f"http://127.0.0.1:{port}" and saved["token"].startswith("lt_")
        assert oct((tmp_path / "data" / "client.json").stat().st_mode)[-3:] == "600"
        assert (tmp_path / "data" / "layertrack.db").is_file()
        wait_until(lambda: ready(f"http://127.0.0.1:{port}"), 60, what="layertrack up to answer /readyz with 200")
        out = subprocess.run([exe, "submit", "demo", "5", str(path), "--max-tokens", "600", "--seq-len", "64",
                              "--wait"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "succeeded" in out.stdout.splitlines()[-1]
        out = subprocess.run([exe, "trend", "demo"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.splitlines()[2].split()[0] == "5"
    finally:
        stopped = interrupt_group(up, timeout=40)
    assert stopped and up.returncode == 0, up.returncode


def test_a_failing_job_records_why_and_can_be_retried(live, tokenizer):
    """The API accepts any checkpoint directory with a config and weights; the worker finds
    out that this one is not a causal LM and the job says so."""
    from tiny_models import build_checkpoint
    from transformers import BertConfig, BertForMaskedLM

    run = f"fail-{uuid.uuid4().hex[:6]}"
    bert = live.roots / run / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=384)).save_pretrained(bert)
    with live.client() as c:
        job = c.wait(c.submit(run=run, step=1, uri=str(bert), config=CFG)["id"], timeout=120, poll=0.5)
        assert job["status"] == "failed" and job["error_code"] == "not_a_causal_lm", job
        assert "is not a causal language model (BertForMaskedLM)" in job["error"]
        assert job["attempts"] == 1 and job["finished_at"] is not None
        retried = c.retry(job["id"])  # the state the request committed, before any worker sees it
        assert retried["status"] == "queued" and retried["attempts"] == 1
        assert (retried["error"], retried["error_code"], retried["worker"], retried["finished_at"]) == (
            None, None, None, None)
        again = c.wait(job["id"], timeout=120, poll=0.5)
        assert again["status"] == "failed" and again["attempts"] == 2
        tiny = build_checkpoint(live.roots / run / "llama", "llama", tokenizer)
        few = c.submit(run=run, step=2, uri=str(tiny), config={"max_tokens": 40, "seq_len": 64})
        few = c.wait(few["id"], timeout=120, poll=0.5)
    assert few["status"] == "failed" and few["error_code"] == "too_few_tokens"
    assert "only 40 probe tokens for hidden size d=32" in few["error"]


def test_replaceability_through_the_service(live, tokenizer):
    """A job asking for replaceability stores loss_delta_linear / loss_delta_drop per block,
    queryable like every other metric and equal to a local run."""
    from tiny_models import build_checkpoint

    run = f"repl-{uuid.uuid4().hex[:6]}"
    path = build_checkpoint(live.roots / run / "step-1", "llama", tokenizer, seed=3)
    cfg = {**CFG, "replaceability": True, "holdout_tokens": 256}
    with live.client() as c:
        with pytest.raises(Exception, match=r"need config\.replaceability = true"):
            c.submit(run=run, step=1, uri=str(path), config=CFG, metrics=["loss_delta_drop"])
        job = c.wait(c.submit(run=run, step=1, uri=str(path), config=cfg)["id"], timeout=240, poll=0.5)
        assert job["status"] == "succeeded", (job, live.logs())
        assert job["result"]["holdout"]["n_tokens"] == 256
        want = score_checkpoint(str(path), config=ScoreConfig(**cfg)).scores.pairs
        for metric in ("loss_delta_linear", "loss_delta_drop"):
            series = {s["layer"]: s for s in c.scores(run, metric=metric)["series"]}
            assert sorted(series) == [0, 1, 2] and series[2]["final_norm"]
            for p in want:
                got, expect = series[p.layer]["values"][0], getattr(p, metric)
                if expect is None:
                    assert got is None
                else:
                    assert got == pytest.approx(expect, abs=1e-4)
        assert c.trend(run, metric="loss_delta_drop")["steps"] == [1]
        assert c.scores(run, metric="linearity")["series"][0]["steps"] == [1]  # the usual metrics too
