"""Queues that stay bounded: the sweeper re-sends only what the broker lost.

A live API (its sweeper every second, a queued item presumed lost after 2 s), PostgreSQL and
a private Redis, and at first no worker at all. N jobs are submitted and N webhook deliveries
made pending; the lengths of the ``gpu`` and ``webhooks`` Redis lists are read directly
(LLEN) while the sweeper runs: they stay at one message per item. Messages are then taken
out of both lists behind the service's back (lost): the sweeper re-sends exactly those many
and the lists return to one message per item. Then the workers start, and every job runs
once (attempts 1, one set of scores) and the receiver gets every delivery once.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from layertrack.workers.vocabulary import LAYER_METRICS, PAIR_METRICS
from services import Receiver, live_service, wait_until

#: dynamics off: which earlier step a job is compared with depends on which finished first
CFG = {"max_tokens": 600, "seq_len": 64, "dynamics": False}
ROWS_PER_TINY_JOB = 3 * len(PAIR_METRICS) + 4 * len(LAYER_METRICS)  # 3 pairs, 4 hidden states
N_JOBS = 20
N_DELIVERIES = 20
LOST = 3  # messages taken out of each list behind the service's back
SWEEP_S = 1.0
#: the most messages a list may hold beyond one per pending item
SLACK = 2


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


class Lists:
    """LLEN of the service's two queues on the private Redis, with every sample kept."""

    def __init__(self, redis_url: str):
        import redis

        self.r = redis.Redis.from_url(redis_url)
        self.samples: list[tuple[int, int]] = []

    def lengths(self) -> tuple[int, int]:
        got = (self.r.llen("gpu"), self.r.llen("webhooks"))
        self.samples.append(got)
        return got

    def watch(self, seconds: float) -> tuple[int, int]:
        """Sample every 0.1 s for ``seconds``; the largest lengths seen."""
        start = len(self.samples)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.lengths()
            time.sleep(0.1)  # sampling, not waiting for anything
        seen = self.samples[start:]
        return max(g for g, _ in seen), max(w for _, w in seen)

    def lose(self, name: str, n: int) -> None:
        """Take the ``n`` oldest messages out of list ``name`` at once (kombu pushes on the
        left and pops on the right), as a broker that lost them would."""
        pipe = self.r.pipeline(transaction=True)
        for _ in range(n):
            pipe.rpop(name)
        assert all(pipe.execute()), f"fewer than {n} messages in {name}"

    def unacked(self) -> int:
        """Messages a worker has taken but not acknowledged yet (kombu's ``unacked`` hash)."""
        return self.r.hlen("unacked")


def resends(svc) -> dict[str, float]:
    with svc.http() as h:
        r = h.get("/metrics")
    assert r.status_code == 200, r.text
    out = {}
    for line in r.text.splitlines():
        for name in ("layertrack_job_resends_total", "layertrack_delivery_resends_total"):
            if line.startswith(name + " "):
                out[name.removeprefix("layertrack_").removesuffix("_resends_total")] = float(line.split()[1])
    assert set(out) == {"job", "delivery"}, r.text
    return out


def test_queues_hold_one_message_per_item_without_workers_and_each_item_runs_once(
        tmp_path, redis_server, receiver, tokenizer):
    from layertrack.service.db import session_scope
    from layertrack.service.models import Delivery, Job, Score
    from sqlalchemy import func, select
    from tiny_models import build_checkpoint

    redis_url = redis_server.new_url()
    env = {"LAYERTRACK_SWEEP_INTERVAL_S": f"{SWEEP_S:g}", "LAYERTRACK_REQUEUE_AFTER_S": "2",
           "LAYERTRACK_WEBHOOK_ALLOW_HOSTS": "127.0.0.0/8"}
    with live_service(tmp_path, redis_url, extra_env=env, workers=()) as svc:
        lists = Lists(redis_url)
        run = f"bounded-{uuid.uuid4().hex[:6]}"
        path = build_checkpoint(svc.roots / run / "ckpt", "gpt2", tokenizer, seed=3)
        with svc.client() as c:
            hook = c.create_webhook(receiver.url + "/hook", events=["job.succeeded"])
            job_ids = [c.submit(run=run, step=step, uri=str(path), config=CFG)["id"] for step in range(N_JOBS)]
            with svc.http() as h:
                test_ids = []
                for _ in range(N_DELIVERIES):
                    r = h.post(f"/v1/webhooks/{hook['id']}/test")
                    assert r.status_code == 202, r.text
                    test_ids.append(r.json()["id"])
        assert lists.lengths() == (N_JOBS, N_DELIVERIES)

        # 1. nothing lost, no worker: the sweeper re-sends nothing, however long the items wait
        gpu_max, hooks_max = lists.watch(10 * SWEEP_S)
        print(f"\nno worker for {10 * SWEEP_S:g} s ({N_JOBS} queued jobs, {N_DELIVERIES} pending deliveries): "
              f"largest gpu list {gpu_max}, largest webhooks list {hooks_max}; now {lists.lengths()}")
        assert gpu_max <= N_JOBS + SLACK and hooks_max <= N_DELIVERIES + SLACK, lists.samples
        assert resends(svc) == {"job": 0, "delivery": 0}

        # 2. the broker loses messages: exactly those many are re-sent, and no more
        lists.lose("gpu", LOST)
        lists.lose("webhooks", LOST)
        assert lists.lengths() == (N_JOBS - LOST, N_DELIVERIES - LOST)
        wait_until(lambda: lists.lengths() == (N_JOBS, N_DELIVERIES), 30,
                   what="the sweeper to re-send the lost messages")
        gpu_max, hooks_max = lists.watch(10 * SWEEP_S)
        counted = resends(svc)
        print(f"{LOST} messages lost from each list, then {10 * SWEEP_S:g} s more: largest gpu list {gpu_max}, "
              f"largest webhooks list {hooks_max}; now {lists.lengths()}; /metrics resends {counted}")
        assert gpu_max <= N_JOBS + SLACK and hooks_max <= N_DELIVERIES + SLACK, lists.samples
        assert counted == {"job": LOST, "delivery": LOST}
        with session_scope(svc.db_url) as s:
            assert s.scalar(select(func.sum(Job.resends))) == LOST
            assert s.scalar(select(func.max(Job.resends))) == 1  # each lost one re-sent once
            assert s.scalar(select(func.max(Delivery.resends))) == 1

        # 3. the workers come back: every job runs once, every delivery arrives once
        svc.start_worker("w1", "gpu")
        svc.start_worker("hooks", "webhooks", pool="threads", concurrency=2)
        with svc.client() as c:
            done = {i: c.wait(i, timeout=300, poll=0.5) for i in job_ids}
        assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in done.values()), (done, svc.logs())
        with session_scope(svc.db_url) as s:
            per_job = dict(s.execute(select(Score.job_id, func.count()).where(Score.job_id.in_(job_ids))
                                     .group_by(Score.job_id)).all())
        assert per_job == {i: ROWS_PER_TINY_JOB for i in job_ids}

        def settled() -> bool:
            with session_scope(svc.db_url) as s:
                pending = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status != "succeeded"))
                total = s.scalar(select(func.count()).select_from(Delivery))
            return (pending == 0 and total == N_DELIVERIES + N_JOBS and lists.lengths() == (0, 0)
                    and lists.unacked() == 0)

        wait_until(settled, 120, what="every delivery to succeed and both queues to drain")
        got = Counter(r["headers"].get("webhook-id") for r in receiver.got())
        with session_scope(svc.db_url) as s:
            delivery_ids = set(s.scalars(select(Delivery.id)))
        assert set(test_ids) <= delivery_ids
        assert set(got) == delivery_ids and set(got.values()) == {1}, got
        counted = resends(svc)
        print(f"workers back: {N_JOBS} jobs succeeded with attempts 1, {len(got)} deliveries received once "
              f"each; /metrics resends {counted}")
        # While workers drain the queues, a message a worker has taken but not yet claimed looks
        # lost for a moment; on a loaded machine the sweeper may re-send a few of those. That
        # costs a duplicate message, never a second run (checked above): the re-sends stay
        # bounded by one per item.
        assert LOST <= counted["job"] <= LOST + N_JOBS and LOST <= counted["delivery"] <= LOST + N_DELIVERIES, counted
