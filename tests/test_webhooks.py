"""Webhooks out and in, and trend alerts, against the live service: the API server, a
scoring worker and a webhook worker (separate Celery processes), PostgreSQL and Redis, and
a real HTTP receiver in the test. Signatures are checked against a hand-computed HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from services import Receiver, live_service, wait_until

CFG = {"max_tokens": 600, "seq_len": 64}


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server):
    env = {
        "LAYERTRACK_WEBHOOK_ALLOW_HOSTS": "127.0.0.0/8,::1",
        "LAYERTRACK_WEBHOOK_BACKOFF_S": "0.3",
        "LAYERTRACK_WEBHOOK_MAX_ATTEMPTS": "4",
        "LAYERTRACK_WEBHOOK_TIMEOUT_S": "5",
    }
    with live_service(tmp_path_factory.mktemp("hooks"), redis_server.new_url(), extra_env=env,
                      workers=(("w1", "gpu"), ("hooks", "webhooks"))) as svc:
        yield svc


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


def finished(delivery: dict) -> dict | None:
    """The delivery once it is no longer pending."""
    return delivery if delivery["status"] != "pending" else None


def oracle_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks v1 signature, computed here without the library."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def checkpoint(live, tokenizer, run: str, step: int):
    from tiny_models import build_checkpoint

    return build_checkpoint(live.roots / run / f"step-{step}", "llama", tokenizer, seed=step)


def test_job_succeeded_arrives_signed_with_a_summary_of_scores(live, receiver, tokenizer):
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint
    from standardwebhooks.webhooks import Webhook as Verifier

    run = f"wh-{uuid.uuid4().hex[:6]}"
    with live.client() as c:
        everything = c.create_webhook(receiver.url + "/all", description="every run")
        assert everything["secret"].startswith("whsec_") and everything["run"] is None
        assert all("secret" not in w or w["secret"] is None for w in c.webhooks())  # never shown again
        job = c.wait(c.submit(run=run, step=1, uri=str(checkpoint(live, tokenizer, run, 1)), config=CFG)["id"],
                     timeout=180, poll=0.3)
        assert job["status"] == "succeeded", live.logs()
        mine = c.create_webhook(receiver.url + "/mine", run=run, events=["job.succeeded"])
        other = f"other-{uuid.uuid4().hex[:6]}"
        c.wait(c.submit(run=other, step=1, uri=str(checkpoint(live, tokenizer, other, 1)), config=CFG)["id"],
               timeout=180, poll=0.3)
        job2 = c.wait(c.submit(run=run, step=2, uri=str(checkpoint(live, tokenizer, run, 2)), config=CFG)["id"],
                      timeout=180, poll=0.3)

        got = receiver.at("/all", 1, where=lambda r: json.loads(r["body"])["data"]["job_id"] == job["id"])[0]
        h, body = got["headers"], got["body"]
        assert h["webhook-signature"] == oracle_signature(everything["secret"], h["webhook-id"],
                                                          h["webhook-timestamp"], body)
        Verifier(everything["secret"]).verify(body, h)  # and what a receiver using the library does
        assert abs(int(h["webhook-timestamp"]) - time.time()) < 120
        event = json.loads(body)
        assert event["type"] == "job.succeeded" and datetime.fromisoformat(event["timestamp"])
        data = event["data"]
        assert (data["run"], data["step"], data["job_id"], data["status"]) == (run, 1, job["id"], "succeeded")
        want = score_checkpoint(str(live.roots / run / "step-1"), config=ScoreConfig(**CFG)).scores
        blocks = [p.linearity_nores for p in want.pairs if not p.final_norm]
        assert data["scores"]["linearity_nores"]["mean"] == pytest.approx(sum(blocks) / len(blocks), abs=1e-9)
        assert data["scores"]["linearity_nores"]["max"] == pytest.approx(max(blocks), abs=1e-9)
        assert set(data["scores"]) == {"linearity", "linearity_nores", "cosine", "norm_ratio", "anisotropy",
                                       "effective_rank", "massive_activation"}
        delivery = c.delivery(everything["id"], h["webhook-id"])
        assert delivery["status"] == "succeeded" and [a["status_code"] for a in delivery["attempt_log"]] == [200]

        # the run's own subscription got its run's later job, and nothing of the other run: the
        # deliveries are stored with the job's completion, so by now every one of them exists
        assert [d["payload"]["data"]["job_id"] for d in c.deliveries(mine["id"])] == [job2["id"]]
        mine_got = receiver.at("/mine", 1)
        assert [json.loads(r["body"])["data"]["job_id"] for r in mine_got] == [job2["id"]]
        for w in (everything, mine):
            c.delete_webhook(w["id"])


def test_a_receiver_failing_twice_gets_the_event_on_the_third_attempt_and_redeliver(live, receiver, tokenizer):
    run = f"flaky-{uuid.uuid4().hex[:6]}"
    receiver.script["/flaky"] = [500, 500]
    with live.client() as c:
        w = c.create_webhook(receiver.url + "/flaky", events=["job.succeeded"])
        job = c.wait(c.submit(run=run, step=3, uri=str(checkpoint(live, tokenizer, run, 3)), config=CFG)["id"],
                     timeout=180, poll=0.3)
        got = receiver.at("/flaky", 3)
        assert [r["status"] for r in got] == [500, 500, 200]
        assert len({r["headers"]["webhook-id"] for r in got}) == 1  # one message, three attempts
        assert len({r["body"] for r in got}) == 1
        for r in got:  # each attempt signed afresh
            assert r["headers"]["webhook-signature"] == oracle_signature(
                w["secret"], r["headers"]["webhook-id"], r["headers"]["webhook-timestamp"], r["body"])
        d = wait_until(lambda: finished(c.deliveries(w["id"])[0]), 30, what="the delivery to finish")
        assert d["status"] == "succeeded" and d["payload"]["data"]["job_id"] == job["id"]
        log = d["attempt_log"]
        assert [a["status_code"] for a in log] == [500, 500, 200]
        assert [a["error"] for a in log][:2] == ["the receiver answered 500"] * 2 and log[2]["error"] is None
        assert all(a["duration_ms"] > 0 for a in log)
        times = [datetime.fromisoformat(a["attempted_at"]) for a in log]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        assert gaps[0] >= 0.25 and gaps[1] >= 0.55  # back-off: 0.3 s, then 0.6 s

        again = c.redeliver(w["id"], d["id"])
        assert again["status"] == "pending"
        got = receiver.at("/flaky", 4)
        assert got[3]["headers"]["webhook-id"] == d["id"] and got[3]["body"] == got[0]["body"]
        d = wait_until(lambda: finished(c.delivery(w["id"], d["id"])), 30, what="the redelivery to finish")
        assert d["status"] == "succeeded" and len(d["attempt_log"]) == 4 and d["attempts"] == 1
        c.delete_webhook(w["id"])


def test_attempts_are_capped_and_a_4xx_is_not_retried(live, receiver):
    receiver.script["/down"] = [503] * 10
    receiver.script["/gone"] = [410] * 10
    with live.client() as c:
        down = c.create_webhook(receiver.url + "/down")
        gone = c.create_webhook(receiver.url + "/gone")
        t1 = c.test_webhook(down["id"])
        t2 = c.test_webhook(gone["id"])
        assert t1["event"] == "webhook.test" and t1["status"] == "pending"
        wait_until(lambda: {c.delivery(down["id"], t1["id"])["status"],
                            c.delivery(gone["id"], t2["id"])["status"]} == {"failed"}, 60,
                   what="both test deliveries to fail")
        d1, d2 = c.delivery(down["id"], t1["id"]), c.delivery(gone["id"], t2["id"])
        assert [a["status_code"] for a in d1["attempt_log"]] == [503] * 4  # LAYERTRACK_WEBHOOK_MAX_ATTEMPTS
        assert [a["status_code"] for a in d2["attempt_log"]] == [410]
        assert "only timeouts, 429 and 5xx are retried" in d2["last_error"]
        assert json.loads(receiver.at("/gone", 1)[0]["body"])["type"] == "webhook.test"
        for w in (down, gone):
            c.delete_webhook(w["id"])


def test_job_failed_event_says_why(live, receiver):
    from transformers import BertConfig, BertForMaskedLM

    run = f"failing-{uuid.uuid4().hex[:6]}"
    bert = live.roots / run / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=384)).save_pretrained(bert)
    with live.client() as c:
        w = c.create_webhook(receiver.url + "/failed", events=["job.failed"])
        job = c.wait(c.submit(run=run, step=1, uri=str(bert), config=CFG)["id"], timeout=180, poll=0.3)
        assert job["status"] == "failed"
        data = json.loads(receiver.at("/failed", 1)[0]["body"])["data"]
        assert (data["job_id"], data["error_code"], data["status"]) == (job["id"], "not_a_causal_lm", "failed")
        assert "not a causal language model" in data["error"]
        c.delete_webhook(w["id"])


@pytest.mark.parametrize("url, why", [
    ("http://10.1.2.3/hook", "non-public address 10.1.2.3"),
    ("http://192.168.0.10:8080/hook", "non-public address 192.168.0.10"),
    ("http://169.254.169.254/latest/meta-data", "non-public address 169.254.169.254"),
    ("http://[fd00::1]/hook", "non-public address fd00::1"),
    ("ftp://example.org/hook", "must be http:// or https://"),
    ("http://user:pw@127.0.0.1/hook", "must not carry a user name"),
])
def test_private_targets_not_on_the_allow_list_are_refused_at_subscription(live, url, why):
    with live.http() as h:
        r = h.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 422, r.text
    assert why in r.json()["detail"]
    if "non-public" in why:
        assert "LAYERTRACK_WEBHOOK_ALLOW_HOSTS" in r.json()["detail"]


# ------------------------------------------------------------------ signed hooks in
def signed(secret: str, body: bytes, *, msg_id: str | None = None, when: datetime | None = None) -> dict:
    from standardwebhooks.webhooks import Webhook as Signer

    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    when = when or datetime.now(UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Signer(secret).sign(msg_id, when, body.decode()),
            "content-type": "application/json"}


def test_inbound_signed_hook_accepts_valid_and_refuses_bad_old_and_replayed(live, tokenizer):
    run = f"inbound-{uuid.uuid4().hex[:6]}"
    path = checkpoint(live, tokenizer, run, 7)
    with live.client() as c:
        src = c.create_hook_source(f"ci-{uuid.uuid4().hex[:6]}")
        assert src["secret"].startswith("whsec_")
        assert all(s["secret"] is None for s in c.hook_sources())
    secret = src["secret"]
    url = f"{live.url}/v1/hooks/checkpoint?source={src['name']}"
    body = json.dumps({"run": run, "step": 7, "uri": str(path), "config": CFG}).encode()

    ok = signed(secret, body)
    r = httpx.post(url, content=body, headers=ok)  # no bearer token: the signature is the credential
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["run"], job["step"], job["status"]) == (run, 7, "queued")

    r = httpx.post(url, content=body, headers=ok)
    assert r.status_code == 409 and "already accepted" in r.json()["detail"]

    bad = signed("whsec_" + base64.b64encode(b"x" * 32).decode(), body)
    r = httpx.post(url, content=body, headers=bad)
    assert r.status_code == 401 and "does not match" in r.json()["detail"]

    tampered = body.replace(b'"step": 7', b'"step": 8')
    r = httpx.post(url, content=tampered, headers=signed(secret, body))
    assert r.status_code == 401 and "does not match" in r.json()["detail"]

    old = signed(secret, body, when=datetime.now(UTC) - timedelta(minutes=10))
    r = httpx.post(url, content=body, headers=old)
    assert r.status_code == 401 and "s old" in r.json()["detail"] and "300 s" in r.json()["detail"]
    future = signed(secret, body, when=datetime.now(UTC) + timedelta(minutes=10))
    r = httpx.post(url, content=body, headers=future)
    assert r.status_code == 401 and "in the future" in r.json()["detail"]

    r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 401 and "missing header(s) webhook-id, webhook-timestamp, webhook-signature" in r.text

    # without ?source= every active source's secret is tried
    r = httpx.post(f"{live.url}/v1/hooks/checkpoint", content=body, headers=signed(secret, body))
    assert r.status_code == 200 and r.json()["id"] == job["id"]  # the same checkpoint: the same job

    invalid = json.dumps({"run": run, "step": -1, "uri": str(path)}).encode()
    r = httpx.post(url, content=invalid, headers=signed(secret, invalid))
    assert r.status_code == 422 and "step" in r.json()["detail"]
    outside = json.dumps({"run": run, "step": 9, "uri": "/etc"}).encode()
    refused_id = f"msg_{uuid.uuid4().hex}"
    r = httpx.post(url, content=outside, headers=signed(secret, outside, msg_id=refused_id))
    assert r.status_code == 422 and "outside the allowed checkpoint roots" in r.json()["detail"]

    with live.client() as c:
        c.revoke_hook_source(src["name"])
        assert c.wait(job["id"], timeout=180, poll=0.3)["status"] == "succeeded"
    r = httpx.post(url, content=body, headers=signed(secret, body))
    assert r.status_code == 401


# ------------------------------------------------------------------ trend alerts
def test_alert_rules_fire_exactly_at_the_crossings(live, receiver, monkeypatch):
    """Synthetic scores through the real completion path (jobs.complete on PostgreSQL): the
    firings, and the trend.alert webhooks the webhook worker sends for them."""
    from layertrack.service import jobs, queue, submissions
    from layertrack.service.db import session_scope
    from layertrack.service.settings import Settings
    from layertrack.workers.vocabulary import KNOWN_METRICS, Phase

    # this process sends the deliveries as a worker does, to the live service's broker
    monkeypatch.setattr(queue, "app", queue.make_app(Settings(data_dir=live.data_dir, broker_url=live.broker_url)))

    run = f"alerts-{uuid.uuid4().hex[:6]}"
    lin_means = [0.30, 0.60, 0.70, 0.40, 0.55, 0.52]  # threshold above 0.5: crossings at steps 2 and 5
    layer1 = [0.50, 0.20, 0.40, 0.30, 0.36, 0.34]  # layer 1 below 0.35: crossings at steps 2, 4 and 6
    cosines = [0.50, 0.51, 0.49, 0.50, 0.80, 0.50]  # 3 sigma off the previous 3 only at step 5

    def finish(step: int) -> None:
        i = step - 1
        sub = submissions.Submission(run=run, step=step, uri=f"/synthetic/{step}", fingerprint=f"fp{step}",
                                     phase=Phase.pretrain, parent_run=None, parent_step=None, probe="default",
                                     config={"metrics": list(KNOWN_METRICS)})
        with session_scope(live.db_url) as s:
            job, _ = submissions.submit(s, sub)
            s.flush()
            job_id = job.id
        assert jobs.claim(live.db_url, job_id, "test") is not None
        l0 = 2 * lin_means[i] - layer1[i]  # so that the mean of layers 0 and 1 is lin_means[i]
        pairs = [
            {"layer": 0, "linearity": l0, "linearity_nores": 0.1, "cosine": cosines[i], "norm_ratio": 1.0},
            {"layer": 1, "linearity": layer1[i], "linearity_nores": 0.1, "cosine": cosines[i], "norm_ratio": 1.0},
            {"layer": 2, "linearity": 0.99, "linearity_nores": 0.9, "cosine": 0.1, "norm_ratio": 9.0,
             "final_norm": True},  # left out of layer means
        ]
        result = {"pairs": pairs, "layers": [{"layer": k, "anisotropy": 0.1} for k in range(4)], "n_tokens": 1}
        done = jobs.complete(live.db_url, job_id, "test", result, list(KNOWN_METRICS))
        assert done
        assert queue.send_deliveries(done.deliveries) == len(done.deliveries)

    finish(1)  # the run exists now
    with live.client() as c:
        w = c.create_webhook(receiver.url + "/alerts", run=run, events=["trend.alert"])
        mean_rule = c.create_alert(run, metric="linearity", kind="threshold", above=0.5)
        layer_rule = c.create_alert(run, metric="linearity", layer=1, kind="threshold", below=0.35)
        sigma_rule = c.create_alert(run, metric="cosine", kind="sigma", k=3, window=3)
        assert sigma_rule["window"] == 3 and mean_rule["layer"] is None
        for step in range(2, 7):
            finish(step)
        firings = c.firings(run)
        by_rule = {}
        for f in firings:
            by_rule.setdefault(f["rule_id"], []).append(f["step"])
        assert by_rule == {mean_rule["id"]: [2, 5], layer_rule["id"]: [2, 4, 6], sigma_rule["id"]: [5]}
        f5 = next(f for f in firings if f["rule_id"] == sigma_rule["id"])
        assert f5["value"] == pytest.approx(0.80)
        assert f5["details"]["baseline_mean"] == pytest.approx(0.50)
        assert f5["details"]["baseline_std"] == pytest.approx(0.01)
        assert "standard deviations" in f5["message"]
        f2 = next(f for f in firings if f["rule_id"] == mean_rule["id"])
        assert f2["value"] == pytest.approx(0.60) and "above 0.5" in f2["message"] and "was 0.3" in f2["message"]

        got = receiver.at("/alerts", 6)
        events = sorted((e["data"]["rule"]["id"], e["data"]["step"]) for e in (json.loads(r["body"]) for r in got))
        assert events == sorted([(mean_rule["id"], 2), (mean_rule["id"], 5), (layer_rule["id"], 2),
                                 (layer_rule["id"], 4), (layer_rule["id"], 6), (sigma_rule["id"], 5)])
        assert all(json.loads(r["body"])["type"] == "trend.alert" for r in got)

        # a bad rule is refused with the reason
        with live.http() as h:
            r = h.post(f"/v1/runs/{run}/alerts", json={"metric": "linearity", "kind": "threshold", "k": 2})
            assert r.status_code == 422 and "needs 'above', 'below' or both" in r.json()["detail"]
            r = h.post(f"/v1/runs/{run}/alerts", json={"metric": "nope", "kind": "sigma", "k": 2})
            assert r.status_code == 422 and "unknown metric 'nope'" in r.json()["detail"]
            r = h.post("/v1/runs/no-such-run/alerts", json={"metric": "linearity", "kind": "sigma", "k": 2})
            assert r.status_code == 404
        c.delete_webhook(w["id"])


def test_alert_fires_on_real_scores_when_they_cross(live, receiver, tokenizer):
    """End to end: the worker scores two checkpoints; a threshold between their layer means
    fires at the second step, and the trend.alert is delivered."""
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint

    run = f"real-alert-{uuid.uuid4().hex[:6]}"
    p1, p2 = checkpoint(live, tokenizer, run, 10), checkpoint(live, tokenizer, run, 20)
    with live.client() as c:
        assert c.wait(c.submit(run=run, step=10, uri=str(p1), config=CFG)["id"], timeout=180)["status"] == "succeeded"
        m1 = c.trend(run, metric="linearity")["values"][0]
        want = score_checkpoint(str(p2), config=ScoreConfig(**CFG)).scores
        blocks = [p.linearity for p in want.pairs if not p.final_norm]
        m2 = sum(blocks) / len(blocks)
        assert abs(m2 - m1) > 1e-6
        middle = (m1 + m2) / 2
        rule = c.create_alert(run, metric="linearity", kind="threshold",
                              **({"above": middle} if m2 > m1 else {"below": middle}))
        w = c.create_webhook(receiver.url + "/real-alert", run=run, events=["trend.alert"])
        assert c.wait(c.submit(run=run, step=20, uri=str(p2), config=CFG)["id"], timeout=180)["status"] == "succeeded"
        firings = c.firings(run)
        assert [(f["rule_id"], f["step"]) for f in firings] == [(rule["id"], 20)]
        assert firings[0]["value"] == pytest.approx(m2, abs=1e-9)
        data = json.loads(receiver.at("/real-alert", 1)[0]["body"])["data"]
        assert (data["step"], data["alert_id"]) == (20, firings[0]["id"])
        c.delete_webhook(w["id"])


def test_a_delivery_whose_task_was_lost_is_sent_by_the_sweeper(live, receiver):
    """A delivery committed but never handed to the queue (the broker was down, or the
    process died right after the commit) is found by the API's sweeper and sent."""
    from layertrack.service.db import session_scope
    from layertrack.service.models import Delivery

    with live.client() as c:
        w = c.create_webhook(receiver.url + "/lost")
        msg_id = f"msg_{uuid.uuid4().hex}"
        long_ago = datetime.now(UTC) - timedelta(minutes=5)
        with session_scope(live.db_url) as s:
            s.add(Delivery(id=msg_id, webhook_id=w["id"], event="webhook.test", status="pending", attempts=0,
                           payload={"type": "webhook.test", "timestamp": long_ago.isoformat(), "data": {}},
                           next_attempt_at=long_ago, created_at=long_ago))
        got = receiver.at("/lost", 1, timeout=60)
        assert got[0]["headers"]["webhook-id"] == msg_id
        wait_until(lambda: c.delivery(w["id"], msg_id)["status"] == "succeeded", 30,
                   what="the lost delivery to be recorded as succeeded")
        c.delete_webhook(w["id"])


def test_a_paused_webhook_records_nothing_until_resumed(live, receiver, tokenizer):
    run = f"pause-{uuid.uuid4().hex[:6]}"
    with live.client() as c:
        w = c.create_webhook(receiver.url + "/paused", events=["job.succeeded"])
        assert c.update_webhook(w["id"], active=False)["active"] is False
        job = c.wait(c.submit(run=run, step=1, uri=str(checkpoint(live, tokenizer, run, 1)), config=CFG)["id"],
                     timeout=180, poll=0.3)
        assert job["status"] == "succeeded"
        assert c.deliveries(w["id"]) == []
        back = c.update_webhook(w["id"], active=True, events=["job.succeeded", "job.failed"], description="back")
        assert (back["active"], back["events"], back["description"]) == (True, ["job.failed", "job.succeeded"], "back")
        c.wait(c.submit(run=run, step=2, uri=str(checkpoint(live, tokenizer, run, 2)), config=CFG)["id"],
               timeout=180, poll=0.3)
        got = receiver.at("/paused", 1)
        assert [json.loads(r["body"])["data"]["step"] for r in got] == [2]
        with live.http() as h:
            r = h.patch(f"/v1/webhooks/{w['id']}", json={"url": "http://example.org/"})
            assert r.status_code == 422 and "url" in r.json()["detail"]
        c.delete_webhook(w["id"])
