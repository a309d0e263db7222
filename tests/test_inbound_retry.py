"""A signed inbound hook that fails after it was verified does not lose the checkpoint: its
receipt (the webhook-id, kept to refuse replays) is stored in the same transaction as the
job, so the sender's retry with the same webhook-id is accepted with a job, and a replay
after that success is still refused (409).

The failures are real: a checkpoint that is not there yet (refused, 422), the database
refusing the job row at COMMIT (a deferred constraint trigger, after the receipt row was
written in the same transaction), and the database turned read-only. PostgreSQL, a private
database of this module's own."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from layertrack.service.db import session_scope
from layertrack.service.models import HookReceipt, Job
from services import api_only, create_pg_database, drop_pg_database
from sqlalchemy import create_engine, func, select, text
from standardwebhooks.webhooks import Webhook as Signer

CFG = {"max_tokens": 600, "seq_len": 64}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, redis_server):
    db = create_pg_database()
    try:
        with api_only(tmp_path_factory.mktemp("inbound"), db_url=db, broker_url=redis_server.new_url()) as s:
            with s.http() as h:
                r = h.post("/v1/hook-sources", json={"name": "trainer"})
                assert r.status_code == 201, r.text
                s.hook_secret = r.json()["secret"]
            yield s
    finally:
        drop_pg_database(db)


def admin_sql(svc, *statements: str) -> None:
    """Statements on the service's own database, then every other connection to it ended, so
    that the API's next request opens a new one (which sees a changed database default)."""
    engine = create_engine(svc.db_url, isolation_level="AUTOCOMMIT")
    name = svc.db_url.rsplit("/", 1)[1]
    try:
        with engine.connect() as c:
            c.execute(text("SET default_transaction_read_only = off"))  # this session writes, whatever the default
            for s in statements:
                c.execute(text(s.replace("{db}", name)))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
    finally:
        engine.dispose()


def send(svc, body: dict, msg_id: str) -> httpx.Response:
    """One delivery attempt by the sender: the same webhook-id on every retry, a fresh
    timestamp and signature (as Standard Webhooks senders retry)."""
    raw = json.dumps(body)
    now = datetime.now(UTC)
    headers = {"content-type": "application/json", "webhook-id": msg_id,
               "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Signer(svc.hook_secret).sign(msg_id, now, raw)}
    return httpx.post(f"{svc.url}/v1/hooks/checkpoint?source=trainer", content=raw, headers=headers, timeout=30)


def stored(svc, msg_id: str, run: str) -> tuple[int, int]:
    """(receipts of this webhook-id, jobs of this run) in the database."""
    with session_scope(svc.db_url) as s:
        receipts = s.scalar(select(func.count()).select_from(HookReceipt).where(HookReceipt.msg_id == msg_id))
        jobs = s.scalar(select(func.count()).select_from(Job).join(Job.run).where(text("runs.name = :r"))
                        .params(r=run))
        return receipts, jobs


def accepted_once(svc, body: dict, msg_id: str) -> None:
    """The retry is accepted with a job; the same webhook-id again is a replay."""
    r = send(svc, body, msg_id)
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["run"], job["step"], job["status"]) == (body["run"], body["step"], "queued")
    assert stored(svc, msg_id, body["run"]) == (1, 1)
    with session_scope(svc.db_url) as s:
        assert s.scalar(select(HookReceipt.job_id).where(HookReceipt.msg_id == msg_id)) == job["id"]
        assert s.get(Job, job["id"]).token_id is None  # no token submitted it: a signed hook
    replay = send(svc, body, msg_id)
    assert replay.status_code == 409, replay.text
    assert "already accepted" in replay.json()["detail"] and f"/v1/jobs/{job['id']}" in replay.json()["detail"]
    assert stored(svc, msg_id, body["run"]) == (1, 1)


def test_a_checkpoint_refused_then_present_is_accepted_on_retry(svc, tokenizer):
    from tiny_models import build_checkpoint

    run, msg_id = f"early-{uuid.uuid4().hex[:6]}", f"msg_{uuid.uuid4().hex}"
    path = svc.roots / run / "step-5"
    body = {"run": run, "step": 5, "uri": str(path), "config": CFG}
    r = send(svc, body, msg_id)  # the hook came before the files were there
    assert r.status_code == 422 and "does not exist" in r.json()["detail"], r.text
    assert stored(svc, msg_id, run) == (0, 0)
    build_checkpoint(path, "llama", tokenizer, seed=5)
    accepted_once(svc, body, msg_id)


def test_the_database_refusing_the_job_at_commit_keeps_no_receipt(svc, tokenizer):
    from tiny_models import build_checkpoint

    run, msg_id = f"commit-{uuid.uuid4().hex[:6]}", f"msg_{uuid.uuid4().hex}"
    body = {"run": run, "step": 6, "uri": str(build_checkpoint(svc.roots / run / "step-6", "llama", tokenizer, seed=6)),
            "config": CFG}
    admin_sql(svc,
              "CREATE FUNCTION lt_refuse_job() RETURNS trigger LANGUAGE plpgsql AS "
              "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
              # deferred: fires at COMMIT, after the receipt and the job rows were both written
              "CREATE CONSTRAINT TRIGGER lt_refuse_job AFTER INSERT ON jobs DEFERRABLE INITIALLY DEFERRED "
              "FOR EACH ROW EXECUTE FUNCTION lt_refuse_job()")
    try:
        for _ in range(2):  # the sender retries while the database still refuses
            r = send(svc, body, msg_id)
            assert r.status_code >= 500, r.text
            assert stored(svc, msg_id, run) == (0, 0)
    finally:
        admin_sql(svc, "DROP TRIGGER lt_refuse_job ON jobs", "DROP FUNCTION lt_refuse_job()")
    accepted_once(svc, body, msg_id)


def test_a_read_only_database_keeps_no_receipt(svc, tokenizer):
    from tiny_models import build_checkpoint

    run, msg_id = f"readonly-{uuid.uuid4().hex[:6]}", f"msg_{uuid.uuid4().hex}"
    body = {"run": run, "step": 7, "uri": str(build_checkpoint(svc.roots / run / "step-7", "llama", tokenizer, seed=7)),
            "config": CFG}
    admin_sql(svc, 'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    try:
        r = send(svc, body, msg_id)
        assert r.status_code >= 500, r.text
    finally:
        admin_sql(svc, 'ALTER DATABASE "{db}" RESET default_transaction_read_only')
    assert stored(svc, msg_id, run) == (0, 0)
    accepted_once(svc, body, msg_id)
