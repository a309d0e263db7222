"""An S3 endpoint where nothing listens, through the service with real components: the API
server and a Celery worker (PostgreSQL, a private Redis), AWS_ENDPOINT_URL on a loopback
port the test bound and closed, LAYERTRACK_FETCH_RETRY_BUDGET_S small. Nothing of the store
client or the runner is mocked.

- while it retries, the job (queued) says why, until when and which attempt comes next
  (``store_unreachable: … s3 endpoint http://127.0.0.1:PORT refused the connection …;
  retrying until HH:MM:SS UTC (attempt 2 in 2 s)``, progress phase ``retrying``);
- then it fails with store_unreachable, saying it gave up, after how many attempts and since
  when; the attempts are those the declared back-off (job_runner.retry_delay) fits in the
  budget, counted from the first failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import datetime, timedelta

import pytest
from layertrack.service import job_runner
from moto_s3 import CREDENTIALS
from services import layertrack_exe, store_service, wait_until

#: 13 s: attempts start at 0, 2 and 6 s after the first failure, and the next would start at
#: 14 s. Each boundary is 7 s (or more) away from where the attempts fall, so the load of the
#: machine (each attempt takes well under a second) does not change the count
BUDGET_S = 13
BUCKET = "ml-ckpts"


def expected_attempts(budget_s: float, max_retries: int) -> int:
    """Attempts the declared back-off fits in the budget (attempt n+1 starts retry_delay(n-1)
    after attempt n fails; the length of an attempt is left out)."""
    attempts, t = 1, 0
    while attempts <= max_retries and t + job_runner.retry_delay(attempts - 1) <= budget_s:
        t += job_runner.retry_delay(attempts - 1)
        attempts += 1
    return attempts


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def dead(tmp_path_factory, pg_url, redis_server):
    port = closed_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **CREDENTIALS,
           "LAYERTRACK_FETCH_RETRY_BUDGET_S": str(BUDGET_S), "LAYERTRACK_FETCH_MAX_RETRIES": "8",
           "LAYERTRACK_PROGRESS_INTERVAL_S": "0.3"}
    with store_service(tmp_path_factory.mktemp("dead-store"), redis_server.new_url(), [f"s3://{BUCKET}/runs/"],
                       env, db_url=pg_url) as svc:
        svc.endpoint = env["AWS_ENDPOINT_URL"]
        yield svc


def test_an_unreachable_store_is_retried_until_the_budget_then_the_job_fails_saying_so(dead):
    expected = expected_attempts(BUDGET_S, 8)
    assert expected == 3
    with dead.client() as c:
        job = c.submit(run="dead-store", step=1, uri=f"s3://{BUCKET}/runs/dead/step-1", config={"max_tokens": 600})
        # `layertrack wait` follows it from the start: it prints each progress line as it changes
        env = {**os.environ, "LAYERTRACK_URL": dead.url, "LAYERTRACK_TOKEN": dead.token}
        cli = subprocess.Popen([layertrack_exe(), "wait", job["id"], "--timeout", "170"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        seen: list[dict] = []

        def retrying():
            j = c.job(job["id"])
            message = (j["progress"] or {}).get("message") or ""
            if "retrying until" in message:
                seen.append(j)
            return j if j["status"] in ("succeeded", "failed", "cancelled") else None

        done = wait_until(retrying, 180, what="the job to give up on the store", interval=0.1)
        out, err = cli.communicate(timeout=60)
    assert seen, ("the job never said it was retrying", done, dead.logs())
    first = seen[0]
    assert first["status"] == "queued" and first["progress"]["phase"] == "retrying", first
    message = first["progress"]["message"]
    assert message.startswith("store_unreachable: "), message
    assert f"s3 endpoint {dead.endpoint} refused the connection" in message, message
    since = datetime.fromisoformat(first["progress"]["store_failing_since"])
    until = datetime.fromisoformat(first["progress"]["retry_until"])
    assert until - since == timedelta(seconds=BUDGET_S)
    assert f"retrying until {until.strftime('%H:%M:%S')} UTC (attempt 2 in {job_runner.retry_delay(0)} s)" in message
    for j in seen:  # each retry announced with the delay of the declared back-off
        failed = j["progress"]["store_failures"]
        assert 1 <= failed < expected, j  # never a retry announced past the budget
        assert f"(attempt {failed + 1} in {job_runner.retry_delay(failed - 1)} s)" in j["progress"]["message"], j
    assert all(j["progress"]["store_failing_since"] == first["progress"]["store_failing_since"] for j in seen)

    assert done["status"] == "failed" and done["error_code"] == "store_unreachable", (done, dead.logs())
    error = done["error"]
    assert f"s3 endpoint {dead.endpoint} refused the connection" in error, error
    assert f"gave up after {expected} attempts" in error, error
    assert f"since the first failure at {since.strftime('%H:%M:%S')} UTC" in error, error
    assert f"LAYERTRACK_FETCH_RETRY_BUDGET_S is {BUDGET_S} s" in error, error
    assert done["attempts"] == expected, done
    assert done["progress"]["store_failures"] == expected, done["progress"]
    assert done["progress"]["message"] == f"store_unreachable: {error}", done["progress"]

    # the CLI showed the retrying (its poll, every second, falls in the 4 s before attempt 3)
    assert cli.returncode == 1, (out, err)
    assert f"  retrying: store_unreachable: listing in s3://{BUCKET}/runs/dead/step-1: s3 endpoint {dead.endpoint}" \
        in out and "retrying until" in out, out
    assert f"  error (store_unreachable): {error}" in out, out
