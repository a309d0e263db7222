"""Remote checkpoints through the service, with real components: the API server and a Celery
worker (PostgreSQL, a private Redis) and, on loopback, moto's S3 server (tests/moto_s3.py,
reached through the standard AWS_ENDPOINT_URL and AWS_* variables), a server in the Hub's
HTTP layout (tests/hub_server.py, HF_ENDPOINT) and http.server. Nothing of the store clients
is mocked.

- a single-file and a sharded checkpoint in S3 score exactly like the same checkpoint from a
  local path (max |Δ| ≤ 1e-12 over every stored score); the same URI again is the same job;
- a prefix outside the allowed locations is refused (422, naming LAYERTRACK_CHECKPOINT_ROOTS);
- credentials in a URI are refused and stored nowhere (database, answers, logs);
- a missing checkpoint fails with checkpoint_not_found;
- the S3 server dying mid-transfer and coming back: the job is retried and completes;
- an upload in progress (the index there, a shard missing): the job waits (queued, progress
  phase "waiting"), then scores when the shard lands; one that never completes fails at the
  deadline with checkpoint_incomplete;
- the same content under another run is scored from the cache (no object bytes served);
- `layertrack wait` prints the fetch progress (bytes done / total, seconds);
- hf://org/repo@tag: the tag resolved to its commit (recorded on the job), scores as local;
- a directory over http: scores as local; one on a private address the allow list does not
  name fails with host_refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid

import pytest
from layertrack.service.db import session_scope
from layertrack.service.models import Checkpoint, Job
from moto_s3 import S3Server
from services import layertrack_exe, max_delta, store_service, stored_scores, tiny_job_scores, wait_until
from sqlalchemy import select
from stores_fixtures import assert_scored_like_local, hub_env, hub_srv, s3_server, upload_checkpoint, web  # noqa: F401  (fixtures)

BUCKET = "ml-ckpts"
PREFIX = "runs"
CFG = {"max_tokens": 600, "seq_len": 64}
#: the waits of the tests: an incomplete checkpoint is looked at again after 0.5, 1, 2, 2 ... s
#: and given up after 12 s; an unreachable store is retried after 2, 4, 8 ... s, 6 times
REMOTE_ENV = {
    "LAYERTRACK_INCOMPLETE_DEADLINE_S": "12",
    "LAYERTRACK_INCOMPLETE_BACKOFF_S": "0.5",
    "LAYERTRACK_INCOMPLETE_BACKOFF_MAX_S": "2",
    "LAYERTRACK_FETCH_MAX_RETRIES": "6",
    "LAYERTRACK_PROGRESS_INTERVAL_S": "0.3",
    "LAYERTRACK_FETCH_ALLOW_HOSTS": "127.0.0.1",
}
SECRET = "s3cr3tVALUE9f8e7d"
HUB_ORG = "hf://layertrack-test/"


@pytest.fixture(scope="module")
def s3(s3_server):  # noqa: F811
    s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_server, s3, web, hub_srv):  # noqa: F811
    tmp = tmp_path_factory.mktemp("remote")
    port = web.url.rsplit(":", 1)[1]
    roots = [f"s3://{BUCKET}/{PREFIX}/", f"{HUB_ORG}", f"{web.url}/ckpts/",
             # allowed as a location, but not as an address (LAYERTRACK_FETCH_ALLOW_HOSTS)
             f"http://127.0.0.2:{port}/ckpts/"]
    env = {**s3.env(), **REMOTE_ENV, **hub_env(hub_srv, tmp / "hf-home")}
    with store_service(tmp, redis_server.new_url(), roots, env, db_url=pg_url) as svc:
        yield svc


@pytest.fixture(autouse=True)
def s3_running(s3):
    """Every test starts with the S3 server up and no trap set."""
    s3.on_get, s3.delay_s = None, 0.0
    if not s3.running:
        s3.start()
    yield


def uid() -> str:
    return uuid.uuid4().hex[:8]


def s3_uri(*parts: str) -> str:
    return f"s3://{BUCKET}/{PREFIX}/" + "/".join(parts)


def weight_bytes_served(s3: S3Server, prefix: str) -> int:
    return sum(n for k, n in s3.bytes_by_key.items() if prefix in k and k.endswith(".safetensors"))


def remote_checkpoint(live, s3, tokenizer, name: str, *, shard: str | None = None, seed: int = 0,
                      skip: tuple[str, ...] = ()):
    """A tiny llama checkpoint built under the local root and uploaded to S3 (but the files
    in ``skip``); (local directory, s3 URI, S3 key prefix)."""
    local, key_prefix = upload_checkpoint(live, tokenizer, name, lambda k, d: s3.upload_dir(BUCKET, k, d, skip=skip),
                                          prefix=PREFIX, shard=shard, seed=seed)
    return local, s3_uri(name, "step-1"), key_prefix


# ------------------------------------------------------------------ scoring from S3
@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single-file", "sharded"])
def test_a_checkpoint_in_s3_scores_exactly_like_the_same_checkpoint_from_a_local_path(live, s3, tokenizer, shard):
    name = f"same-{uid()}"
    local, uri, key_prefix = remote_checkpoint(live, s3, tokenizer, name, shard=shard, seed=3)
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert (len(shards) > 1) == (shard is not None), shards
    with live.http() as h:
        r = h.post("/v1/checkpoints", json={"run": f"s3-{name}", "step": 1, "uri": uri, "config": CFG})
        assert r.status_code == 202, r.text
        remote = r.json()
        # the API stored the job without reading the store: no object was fetched for it
        assert remote["uri"] == uri and remote["content_fingerprint"] is None
        again = h.post("/v1/checkpoints", json={"run": f"s3-{name}", "step": 1, "uri": uri, "config": CFG})
        assert again.status_code == 200 and again.json()["id"] == remote["id"]
    with live.client() as c:
        local_job = c.submit(run=f"local-{name}", step=1, uri=str(local), config=CFG)
        done = c.wait(remote["id"], timeout=240, poll=0.5)
        local_done = c.wait(local_job["id"], timeout=240, poll=0.5)
    _p, weights = assert_scored_like_local(live, done, local_done, local,
                                           f"{'sharded' if shard else 'single-file'} S3")
    assert local_done["progress"] is None
    assert weight_bytes_served(s3, key_prefix) >= weights  # the weights came from S3
    with session_scope(live.db_url) as s:
        fp = s.scalar(select(Checkpoint.fingerprint).join(Job, Job.checkpoint_id == Checkpoint.id)
                      .where(Job.id == remote["id"]))
    assert re.fullmatch(r"uri:[0-9a-f]{64}", fp), fp  # provisional: the normalized URI's hash


def test_the_same_content_under_another_run_is_scored_from_the_cache(live, s3, tokenizer):
    name = f"cache-{uid()}"
    _local, uri, key_prefix = remote_checkpoint(live, s3, tokenizer, name, shard="60KB", seed=4)
    with live.client() as c:
        first = c.wait(c.submit(run=f"first-{name}", step=1, uri=uri, config=CFG)["id"], timeout=240, poll=0.5)
        assert first["status"] == "succeeded", (first, live.logs())
        served = weight_bytes_served(s3, key_prefix)
        assert served > 0 and first["progress"]["bytes_fetched"] == first["progress"]["bytes_total"]
        second = c.wait(c.submit(run=f"second-{name}", step=1, uri=uri, config=CFG)["id"], timeout=240, poll=0.5)
    assert second["status"] == "succeeded", (second, live.logs())
    assert second["id"] != first["id"]
    assert weight_bytes_served(s3, key_prefix) == served  # not one weight byte fetched again
    assert second["progress"]["bytes_fetched"] == 0, second["progress"]
    assert second["content_fingerprint"] == first["content_fingerprint"]
    assert max_delta(stored_scores(live.db_url, first["id"]), stored_scores(live.db_url, second["id"])) == 0


def test_a_hub_revision_is_resolved_to_its_commit_and_scored_like_the_local_checkpoint(live, hub_srv, tokenizer):  # noqa: F811
    from hub_server import Repo, files_of
    from tiny_models import build_checkpoint

    name = f"hub-{uid()}"
    local = build_checkpoint(live.roots / name, "llama", tokenizer, seed=9, max_shard_size="60KB")
    repo = Repo()
    repo.commit({"README.md": b"step 0"}, tag="step0")
    sha = repo.commit(files_of(local), tag="step100")
    hub_srv.repos[f"layertrack-test/{name}"] = repo
    with live.client() as c:
        job = c.submit(run=f"hub-{name}", step=100, uri=f"hf://layertrack-test/{name}@step100", config=CFG)
        assert job["resolved_revision"] is None  # the API does not reach the Hub
        done = c.wait(job["id"], timeout=240, poll=0.5)
        local_job = c.wait(c.submit(run=f"local-{name}", step=100, uri=str(local), config=CFG)["id"], timeout=240)
    assert done["status"] == "succeeded", (done, live.logs())
    assert done["uri"] == f"hf://layertrack-test/{name}@step100" and done["resolved_revision"] == sha, done
    assert max_delta(stored_scores(live.db_url, done["id"]), stored_scores(live.db_url, local_job["id"])) <= 1e-12


def test_a_directory_over_http_is_scored_and_a_private_address_is_refused(live, web, tokenizer):  # noqa: F811
    from tiny_models import build_checkpoint

    name = f"web-{uid()}"
    local = build_checkpoint(live.roots / name, "llama", tokenizer, seed=10)
    shutil.copytree(local, web.directory / "ckpts" / name)
    with live.client() as c:
        job = c.submit(run=f"web-{name}", step=1, uri=f"{web.url}/ckpts/{name}/", config=CFG)
        refused = c.submit(run=f"web-{name}", step=2, uri=f"http://127.0.0.2:{web.url.rsplit(':', 1)[1]}/ckpts/{name}/",
                           config=CFG)
        done = c.wait(job["id"], timeout=240, poll=0.5)
        refused = c.wait(refused["id"], timeout=120, poll=0.5)
        local_job = c.wait(c.submit(run=f"local-{name}", step=1, uri=str(local), config=CFG)["id"], timeout=240)
    assert done["status"] == "succeeded", (done, live.logs())
    assert max_delta(stored_scores(live.db_url, done["id"]), stored_scores(live.db_url, local_job["id"])) <= 1e-12
    assert refused["status"] == "failed" and refused["error_code"] == "host_refused", refused
    assert "LAYERTRACK_FETCH_ALLOW_HOSTS" in refused["error"], refused["error"]


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("uri", [
    f"s3://{BUCKET}/{PREFIX}-evil/x/step-1",  # a prefix of the root's name, not under it
    f"s3://{BUCKET}/other/x/step-1",
    f"s3://another-bucket/{PREFIX}/x/step-1",
    "gs://ml-ckpts/runs/x",
    "hf://EleutherAI/pythia-70m",
    "hf://layertrack-testx/repo",
    "http://127.0.0.1:9/ckpts/x",
])
def test_a_location_outside_the_allowed_prefixes_is_refused(live, uri):
    with live.http() as h:
        r = h.post("/v1/checkpoints", json={"run": f"out-{uid()}", "step": 1, "uri": uri})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "checkpoint_outside_roots", problem
    assert "LAYERTRACK_CHECKPOINT_ROOTS" in problem["detail"] and "--roots" in problem["detail"], problem


@pytest.mark.parametrize("uri", [
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@{BUCKET}/{PREFIX}/x/step-1",
    f"s3://{SECRET}@{BUCKET}/{PREFIX}/x/step-1",
    f"s3://{BUCKET}/{PREFIX}/x/step-1?X-Amz-Signature={SECRET}&X-Amz-Credential=AKIA",
    f"https://user:{SECRET}@models.example.com/ckpt/",
    f"https://models.example.com/ckpt/?token={SECRET}",
])
def test_credentials_in_a_uri_are_refused_and_stored_nowhere(live, uri):
    run = f"creds-{uid()}"
    with live.http() as h:
        r = h.post("/v1/checkpoints", json={"run": run, "step": 1, "uri": uri})
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "credentials_in_uri", r.json()
        assert SECRET not in r.text
        assert h.get("/v1/jobs", params={"limit": 500}).status_code == 200
    with session_scope(live.db_url) as s:
        assert s.scalar(select(Checkpoint.id).where(Checkpoint.uri.contains(SECRET))) is None
        assert s.scalar(select(Job.id).where(Job.error.contains(SECRET))) is None
    for log in live.log_dir.glob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), log


def test_a_missing_checkpoint_fails_with_checkpoint_not_found(live):
    with live.client() as c:
        job = c.submit(run=f"missing-{uid()}", step=1, uri=s3_uri(f"nothing-{uid()}", "step-1"), config=CFG)
        done = c.wait(job["id"], timeout=120, poll=0.5)
    assert done["status"] == "failed" and done["error_code"] == "checkpoint_not_found", (done, live.logs())
    assert done["attempts"] == 1


# ------------------------------------------------------------------ transient trouble
def test_the_store_dying_mid_transfer_and_returning_lets_the_job_complete(live, s3, tokenizer):
    name = f"outage-{uid()}"
    local, uri, _ = remote_checkpoint(live, s3, tokenizer, name, shard="60KB", seed=5)
    cut: list[str] = []

    def die_on_first_weights(key: str) -> str | None:
        if key.endswith(".safetensors") and not cut:
            cut.append(key)
            return "cut"  # half the body, then the server stops
        return None

    s3.on_get = die_on_first_weights
    with live.client() as c:
        job = c.submit(run=f"s3-{name}", step=1, uri=uri, config=CFG)
        wait_until(lambda: not s3.running, 120, what="the S3 server to die mid-transfer")

        def retrying():
            j = c.job(job["id"])
            assert j["status"] in ("queued", "running"), (j, live.logs())
            msg = (j["progress"] or {}).get("message") or ""
            return j if "store_unreachable" in msg or "checksum_mismatch" in msg else None

        seen = wait_until(retrying, 180, what="the job to be retried while the store is down")
        s3.on_get = None
        s3.start()
        done = c.wait(job["id"], timeout=240, poll=0.5)
        local_job = c.wait(c.submit(run=f"local-{name}", step=1, uri=str(local), config=CFG)["id"], timeout=240)
    assert done["status"] == "succeeded", (done, seen, live.logs())
    assert done["attempts"] >= 2, done
    assert max_delta(stored_scores(live.db_url, done["id"]), stored_scores(live.db_url, local_job["id"])) <= 1e-12


def test_an_upload_in_progress_makes_the_job_wait_then_score_when_the_shard_lands(live, s3, tokenizer):
    name = f"upload-{uid()}"
    from tiny_models import build_checkpoint

    local = build_checkpoint(live.roots / name, "llama", tokenizer, seed=6, max_shard_size="60KB")
    shards = sorted(p.name for p in local.glob("model-*.safetensors"))
    assert len(shards) >= 2
    key_prefix = f"{PREFIX}/{name}/step-1"
    s3.upload_dir(BUCKET, key_prefix, local, skip=[shards[-1]])  # the index is there, a shard is not
    uri = s3_uri(name, "step-1")
    env = {**os.environ, "LAYERTRACK_URL": live.url, "LAYERTRACK_TOKEN": live.token}
    with live.client() as c:
        job = c.submit(run=f"s3-{name}", step=1, uri=uri, config=CFG)

        def waiting():
            j = c.job(job["id"])
            assert j["status"] in ("queued", "running"), (j, live.logs())
            return j if (j["progress"] or {}).get("phase") == "waiting" else None

        w = wait_until(waiting, 120, what="the job to wait for the upload")
        assert w["status"] == "queued" and w["worker"] is None, w
        assert "waiting for the upload" in w["progress"]["message"], w["progress"]
        # the CLI's wait says so too (and times out: the upload is not done)
        out = subprocess.run([layertrack_exe(), "wait", job["id"], "--timeout", "2"], capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 1 and "waiting: waiting for the upload" in out.stdout, (out.stdout, out.stderr)
        s3.upload_dir(BUCKET, key_prefix, local, skip=[p.name for p in local.iterdir() if p.name != shards[-1]])
        done = c.wait(job["id"], timeout=240, poll=0.5)
    assert done["status"] == "succeeded", (done, live.logs())
    assert done["attempts"] == 1, done  # the looks that found it incomplete are not attempts
    assert done["progress"]["waiting_since"] and done["progress"]["looks"] >= 1, done["progress"]
    assert len(stored_scores(live.db_url, done["id"])) == tiny_job_scores()


def test_an_upload_that_never_completes_fails_at_the_deadline(live, s3, tokenizer):
    name = f"never-{uid()}"
    from tiny_models import build_checkpoint

    local = build_checkpoint(live.roots / name, "llama", tokenizer, seed=7, max_shard_size="60KB")
    shards = sorted(p.name for p in local.glob("model-*.safetensors"))
    s3.upload_dir(BUCKET, f"{PREFIX}/{name}/step-1", local, skip=[shards[0]])
    with live.client() as c:
        job = c.submit(run=f"s3-{name}", step=1, uri=s3_uri(name, "step-1"), config=CFG)
        done = c.wait(job["id"], timeout=120, poll=0.5)
    assert done["status"] == "failed" and done["error_code"] == "checkpoint_incomplete", (done, live.logs())
    assert "LAYERTRACK_INCOMPLETE_DEADLINE_S" in done["error"] and "retry" in done["error"], done["error"]
    waited = done["progress"]
    assert waited["phase"] == "waiting" and waited["looks"] >= 3, waited


# ------------------------------------------------------------------ progress in the CLI
def test_layertrack_wait_prints_the_fetch_progress(live, s3, tokenizer):
    name = f"slow-{uid()}"
    _local, uri, _ = remote_checkpoint(live, s3, tokenizer, name, shard="60KB", seed=8)
    s3.delay_s = 2.0  # every object GET answers after 2 s: the fetch lasts a few seconds
    env = {**os.environ, "LAYERTRACK_URL": live.url, "LAYERTRACK_TOKEN": live.token}
    with live.client() as c:
        job = c.submit(run=f"s3-{name}", step=1, uri=uri, config=CFG)
    proc = subprocess.Popen([layertrack_exe(), "wait", job["id"], "--timeout", "240"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)

    def row() -> Job:
        with session_scope(live.db_url) as s:
            return s.get(Job, job["id"])

    def fetching() -> Job | None:
        r = row()
        assert r.status.value in ("queued", "running"), (r.status, live.logs())
        return r if (r.progress or {}).get("bytes_total") and r.progress["phase"] == "fetching" else None

    try:
        first = wait_until(fetching, 120, what="the job to fetch").heartbeat_at
        # the heartbeat goes on while the bytes come in (the sweeper would re-queue a silent job)
        wait_until(lambda: (r := fetching()) is not None and r.heartbeat_at > first, 30,
                   what="a heartbeat while fetching", interval=0.05)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a failed wait above: not left running
            proc.kill()
            proc.communicate()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, (out.stdout, out.stderr, live.logs())
    assert re.search(r"fetching [\d.]+ (B|KiB|MiB) / [\d.]+ (KiB|MiB) \(\d+ %\), [\d.]+ s", out.stdout), out.stdout
    assert "succeeded" in out.stdout
    print("\n" + out.stdout)
    with live.client() as c:
        final = c.job(job["id"])
    assert json.dumps(final["progress"])  # kept after the job: where the bytes came from


# ------------------------------------------------------------------ progress on the dashboard
def test_the_jobs_page_shows_a_remote_jobs_progress(live, s3, tokenizer):
    """Debian's Chromium through Playwright (as tests/test_dashboard.py): the Jobs page shows
    a job waiting for an upload, then fetching, then nothing once it succeeded."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright
    from test_dashboard import ARTIFACTS, CHROMIUM
    from tiny_models import build_checkpoint

    name = f"page-{uid()}"
    local = build_checkpoint(live.roots / name, "llama", tokenizer, seed=11, max_shard_size="60KB")
    shards = sorted(p.name for p in local.glob("model-*.safetensors"))
    key_prefix = f"{PREFIX}/{name}/step-1"
    s3.upload_dir(BUCKET, key_prefix, local, skip=[shards[-1]])
    with live.client() as c:
        job = c.submit(run=f"s3-{name}", step=1, uri=s3_uri(name, "step-1"), config=CFG)
    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    row = f"#jobs tr[data-job='{job['id']}']"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and errors.append(f"console error: {m.text}"))
            page.goto(live.url + "/")
            page.fill("#token-input", live.token)
            page.click("button[type=submit]")
            page.wait_for_selector("#runs tbody tr")
            page.goto(live.url + "/jobs")
            page.wait_for_function(
                f"() => (document.querySelector(\"{row} .job-progress\") || {{}}).textContent?.startsWith("
                "'waiting: waiting for the upload')", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "jobs-remote-waiting.png"), full_page=True)
            s3.delay_s = 5.0  # every object GET answers after 5 s: the page (polling every 4 s) sees the fetch
            s3.upload_dir(BUCKET, key_prefix, local, skip=[f.name for f in local.iterdir() if f.name != shards[-1]])
            page.wait_for_function(
                f"() => /^fetching [0-9.]+ [KMG]?i?B \\/ [0-9.]+ [KMG]?i?B \\([0-9]+ %\\), [0-9.]+ s$/.test("
                f"(document.querySelector(\"{row} .job-progress\") || {{}}).textContent || '')",
                timeout=60_000)
            text = page.locator(f"{row} .job-progress").inner_text()
            page.screenshot(path=str(ARTIFACTS / "jobs-remote-fetching.png"), full_page=True)
            page.wait_for_selector(f"{row}[data-status='succeeded']", timeout=120_000)
            assert page.locator(f"{row} .job-progress").count() == 0  # a finished job shows none
            assert errors == [], errors
        finally:
            browser.close()
    print(f"\nJobs page while fetching: {text!r}")
