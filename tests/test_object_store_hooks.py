"""Bucket notifications (``POST /v1/hooks/object-store?source=NAME``) with real components: the
API server and a Celery worker (PostgreSQL, the private Redis) and moto's S3 server on
loopback (tests/stores_fixtures.py ``s3_server``), which the worker's store client reads
through the standard AWS_ENDPOINT_URL. The tests upload each file to the S3 server and post
the event record S3 sends for that object (AWS's format, and MinIO's: ``s3:`` event names,
keys URL-encoded with ``/`` as ``%2F``), authenticated by the hook source's secret as bearer.

The design asserted (service/hooks.py): a checkpoint is submitted when one of its source's
completion markers lands (default ``model.safetensors.index.json`` or ``model.safetensors``);
every other file's record creates nothing; a marker that lands while a shard is still on its
way gives a job that waits (queued, progress phase ``waiting``) and scores when the shard
lands. So:

- a complete sharded checkpoint notified file by file: one job (from the index's record), it
  succeeds and scores exactly like the same checkpoint from a local path;
- a partial one: no job while only config.json and some shards are there; the index's record
  creates one job, which waits for the missing shard, then scores; the shard's record adds none;
- a replay (the same record again, alone or twice in one request) and a second write of the
  marker: no second job (``duplicate``, ``existing``);
- a wrong, missing or revoked secret, an API token, another source's secret: 401, no job;
- keys outside the pattern, the prefix or the allowed locations, invalid run names, events
  other than creations: reported per record in a 200 answer, never a 5xx; a source without a
  mapping is 409; a malformed message 422;
- creating a source checks its mapping (API and ``layertrack hook-source --pattern``).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, datetime
from urllib.parse import quote, quote_plus, unquote_plus

import httpx
import pytest
from layertrack.service import hooks
from layertrack.service.db import session_scope
from layertrack.service.models import HookSource, Job, Run, Score
from services import layertrack_exe, tiny_job_scores, wait_until
from sqlalchemy import func, select

BUCKET = "hooked-ckpts"
PREFIX = "runs"
#: an incomplete checkpoint is looked at again after 0.5, 1, 2, 2 ... s, given up after 120 s
ENV = {
    "LAYERTRACK_INCOMPLETE_DEADLINE_S": "120",
    "LAYERTRACK_INCOMPLETE_BACKOFF_S": "0.5",
    "LAYERTRACK_INCOMPLETE_BACKOFF_MAX_S": "2",
    "LAYERTRACK_PROGRESS_INTERVAL_S": "0.3",
}


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server, s3):
    from services import live_service

    tmp = tmp_path_factory.mktemp("object-store-hooks")
    env = {**s3.env(), **ENV, "LAYERTRACK_CHECKPOINT_ROOTS": f"{tmp / 'ckpts'},s3://{BUCKET}/{PREFIX}/"}
    with live_service(tmp, redis_server.new_url(), extra_env=env) as svc:  # a database of its own
        yield svc


@pytest.fixture(scope="module")
def source(live) -> dict:
    """A hook source mapping s3://BUCKET/runs/RUN/checkpoint-STEP/ (the default pattern)."""
    with live.client() as c:
        src = c.create_hook_source(f"store-{uid()}", prefix=f"s3://{BUCKET}/{PREFIX}/")
    assert src["prefix"] == f"s3://{BUCKET}/{PREFIX}/" and src["pattern"] == hooks.DEFAULT_PATTERN, src
    assert src["markers"] == list(hooks.DEFAULT_MARKERS) and src["secret"].startswith("whsec_"), src
    return src


@pytest.fixture(autouse=True)
def s3_up(s3):
    if not s3.running:
        s3.start()


def uid() -> str:
    return uuid.uuid4().hex[:8]


# ------------------------------------------------------------------ what a store sends
class Store:
    """Puts objects into the S3 server and gives, for each, the record S3 sends about it."""

    def __init__(self, s3):
        self.client = s3.client()
        self.sequence = 0

    def put(self, key: str, data: bytes) -> dict:
        etag = self.client.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"')
        self.sequence += 1
        return aws_record(key, size=len(data), etag=etag, sequencer=f"{self.sequence:016X}")

    def upload(self, key_prefix: str, directory, names) -> dict[str, dict]:
        """Upload the files ``names`` of ``directory`` under ``key_prefix/``: file name -> record."""
        return {n: self.put(f"{key_prefix}/{n}", (directory / n).read_bytes()) for n in names}


def aws_record(key: str, *, size: int, etag: str, sequencer: str, event: str = "ObjectCreated:Put",
               bucket: str = BUCKET) -> dict:
    """An S3 event notification record as AWS S3 writes it (event message structure 2.1): the
    key URL-encoded, '+' for a space."""
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "eventName": event, "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": uid().upper(), "x-amz-id-2": uid()},
        "s3": {
            "s3SchemaVersion": "1.0", "configurationId": "layertrack",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "EXAMPLE"}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": quote_plus(key, safe="/"), "size": size, "eTag": etag, "sequencer": sequencer},
        },
    }


def minio_message(record: dict) -> dict:
    """The same event as MinIO posts it to a webhook target: one record per request, the
    event name with 's3:', the key URL-encoded with '/' as %2F, EventName and Key on top."""
    rec = {**record, "eventName": "s3:" + record["eventName"], "eventSource": "minio:s3",
           "s3": {**record["s3"], "object": {**record["s3"]["object"]}}}
    key = quote_plus(unquote_plus(record["s3"]["object"]["key"]), safe="")
    rec["s3"]["object"]["key"] = key
    return {"EventName": rec["eventName"], "Key": f"{record['s3']['bucket']['name']}/{key}", "Records": [rec]}


def notify(live, source: dict, body: dict, *, secret: str | None = None) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/hooks/object-store", params={"source": source["name"]}, json=body,
                      headers={"Authorization": f"Bearer {secret or source['secret']}"}, timeout=30)


def jobs_of(live, run: str) -> list[str]:
    with session_scope(live.db_url) as s:
        return list(s.scalars(select(Job.id).join(Run, Job.run_id == Run.id).where(Run.name == run)))


def job_count(live) -> int:
    with session_scope(live.db_url) as s:
        return s.scalar(select(func.count()).select_from(Job))


def stored_scores(db_url: str, job_id: str) -> dict:
    with session_scope(db_url) as s:
        rows = s.execute(select(Score.metric, Score.layer, Score.value).where(Score.job_id == job_id)).all()
    return {(m, layer): v for m, layer, v in rows}


def build(live, tokenizer, name: str, *, shard: str | None, seed: int):
    from tiny_models import build_checkpoint

    return build_checkpoint(live.roots / name, "llama", tokenizer, seed=seed, max_shard_size=shard)


def upload_order(local) -> list[str]:
    """The files in the order save_pretrained writes them: config.json, the weights (the shard
    index last), the rest (generation config, tokenizer)."""
    names = sorted(p.name for p in local.iterdir())
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    first = ["config.json", *weights, *[n for n in names if n == "model.safetensors.index.json"]]
    return first + [n for n in names if n not in first]


# ------------------------------------------------------------------ scoring through notifications
def test_a_complete_checkpoint_notified_file_by_file_gets_one_job_that_scores_like_the_local_copy(
        live, s3, source, tokenizer):
    run = f"notified-{uid()}"
    local = build(live, tokenizer, run, shard="60KB", seed=21)
    order = upload_order(local)
    assert order[0] == "config.json" and "model.safetensors.index.json" in order
    assert sum(n.endswith(".safetensors") for n in order) >= 2
    key_prefix = f"{PREFIX}/{run}/checkpoint-1000"
    records = Store(s3).upload(key_prefix, local, order)  # the whole checkpoint is there
    answers = {}
    for name in order:  # then the store posts one message per object, in the order they were written
        r = notify(live, source, minio_message(records[name]))
        assert r.status_code in (200, 202), r.text
        answers[name] = r
    for name, r in answers.items():
        [result] = r.json()["results"]
        assert result["key"] == f"{key_prefix}/{name}" and result["file"] == name, result  # decoded
        assert result["run"] == run and result["step"] == 1000, result
        assert result["uri"] == f"s3://{BUCKET}/{key_prefix}", result
        if name == "model.safetensors.index.json":
            assert r.status_code == 202 and result["status"] == "accepted", result
            assert r.json()["jobs_created"] == 1 and result["status_url"] == f"/v1/jobs/{result['job_id']}"
            job_id = result["job_id"]
        else:
            assert r.status_code == 200 and result["status"] == "skipped", result
            assert "not a completion marker" in result["detail"], result
    assert jobs_of(live, run) == [job_id]
    with live.client() as c:
        done = c.wait(job_id, timeout=240, poll=0.5)
        local_job = c.wait(c.submit(run=f"local-{run}", step=1000, uri=str(local))["id"], timeout=240, poll=0.5)
    assert done["status"] == "succeeded", (done, live.logs())
    assert local_job["status"] == "succeeded", (local_job, live.logs())
    assert done["uri"] == f"s3://{BUCKET}/{key_prefix}" and done["run"] == run and done["step"] == 1000
    a, b = stored_scores(live.db_url, job_id), stored_scores(live.db_url, local_job["id"])
    assert a.keys() == b.keys() and len(a) == tiny_job_scores()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-12
    assert jobs_of(live, run) == [job_id]  # and still one


def test_a_partial_checkpoint_gets_no_job_until_its_marker_lands_then_waits_for_the_missing_shard(
        live, s3, source, tokenizer):
    run = f"partial-{uid()}"
    local = build(live, tokenizer, run, shard="60KB", seed=22)
    order = upload_order(local)
    shards = [n for n in order if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) >= 2
    late = shards[-1]
    key_prefix = f"{PREFIX}/{run}/checkpoint-2000"
    store = Store(s3)
    # config.json, the tokenizer and every shard but the last: no marker yet, so no job
    early = store.upload(key_prefix, local, [n for n in order if n not in (late, "model.safetensors.index.json")])
    r = notify(live, source, {"Records": list(early.values())})  # several records in one message (AWS style)
    assert r.status_code == 200, r.text
    assert r.json()["jobs_created"] == 0 and r.json()["received"] == len(early)
    assert {x["status"] for x in r.json()["results"]} == {"skipped"}, r.json()
    assert jobs_of(live, run) == []
    # the index lands before the last shard: one job, which waits for the shard
    r = notify(live, source, {"Records": [store.put(f"{key_prefix}/model.safetensors.index.json",
                                                    (local / "model.safetensors.index.json").read_bytes())]})
    assert r.status_code == 202, r.text
    [result] = r.json()["results"]
    assert result["status"] == "accepted", result
    job_id = result["job_id"]
    with live.client() as c:
        def waiting():
            j = c.job(job_id)
            assert j["status"] in ("queued", "running"), (j, live.logs())
            return j if (j["progress"] or {}).get("phase") == "waiting" else None

        w = wait_until(waiting, 120, what="the job to wait for the missing shard")
        assert w["status"] == "queued" and late in w["progress"]["message"], w["progress"]
        # the shard lands: its record creates nothing; the waiting job finds it and scores
        r = notify(live, source, {"Records": [store.put(f"{key_prefix}/{late}", (local / late).read_bytes())]})
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "skipped", r.text
        done = c.wait(job_id, timeout=240, poll=0.5)
    assert done["status"] == "succeeded", (done, live.logs())
    assert done["progress"]["waiting_since"] and done["progress"]["looks"] >= 1, done["progress"]
    assert len(stored_scores(live.db_url, job_id)) == tiny_job_scores()
    assert jobs_of(live, run) == [job_id]


def test_a_replay_and_a_second_write_of_the_marker_create_no_second_job(live, s3, source, tokenizer):
    run = f"replay-{uid()}"
    local = build(live, tokenizer, run, shard=None, seed=23)  # single file: model.safetensors is the marker
    key_prefix = f"{PREFIX}/{run}/checkpoint-3000"
    store = Store(s3)
    records = store.upload(key_prefix, local, upload_order(local))
    marker = records["model.safetensors"]
    first = notify(live, source, {"Records": [marker]})
    assert first.status_code == 202, first.text
    job_id = first.json()["results"][0]["job_id"]
    # the same record again (a store retrying a delivery), alone and twice in one message
    again = notify(live, source, {"Records": [marker]})
    twice = notify(live, source, minio_message(marker) | {"Records": [marker, marker]})
    for r in (again, twice):
        assert r.status_code == 200 and r.json()["jobs_created"] == 0, r.text
        for result in r.json()["results"]:
            assert result["status"] == "duplicate" and result["job_id"] == job_id, result
            assert "replay" in result["detail"], result
    # the marker written again (a new ETag and sequencer): the same checkpoint, its job
    rewritten = store.put(f"{key_prefix}/model.safetensors", (local / "model.safetensors").read_bytes())
    r = notify(live, source, {"Records": [rewritten]})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["status"] == "existing" and result["job_id"] == job_id, result
    # config.json as an extra marker of another source for the same prefix: still that job
    with live.client() as c:
        other = c.create_hook_source(f"store-{uid()}", prefix=f"s3://{BUCKET}/{PREFIX}/",
                                     markers=["config.json", "model.safetensors"])
        r = notify(live, other, {"Records": [records["config.json"]]})
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "existing", r.text
        assert r.json()["results"][0]["job_id"] == job_id
        done = c.wait(job_id, timeout=240, poll=0.5)
    assert done["status"] == "succeeded", (done, live.logs())
    assert jobs_of(live, run) == [job_id]


# ------------------------------------------------------------------ refusals
def test_a_wrong_missing_or_revoked_secret_is_401_and_creates_nothing(live, s3, source):
    record = aws_record(f"{PREFIX}/secret-{uid()}/checkpoint-1/model.safetensors", size=1, etag="e", sequencer="1")
    with live.client() as c:
        revoked = c.create_hook_source(f"revoked-{uid()}", prefix=f"s3://{BUCKET}/{PREFIX}/")
        c.revoke_hook_source(revoked["name"])
        other = c.create_hook_source(f"other-{uid()}", prefix=f"s3://{BUCKET}/{PREFIX}/")
    before = job_count(live)
    url = f"{live.url}/v1/hooks/object-store"
    cases = {
        "wrong secret": ({"source": source["name"]}, {"Authorization": f"Bearer {source['secret'][:-4]}AAA="}),
        "another source's secret": ({"source": source["name"]}, {"Authorization": f"Bearer {other['secret']}"}),
        "an API token": ({"source": source["name"]}, {"Authorization": f"Bearer {live.token}"}),
        "a revoked source": ({"source": revoked["name"]}, {"Authorization": f"Bearer {revoked['secret']}"}),
        "an unknown source": ({"source": f"nobody-{uid()}"}, {"Authorization": f"Bearer {source['secret']}"}),
        "no header": ({"source": source["name"]}, {}),
        "not bearer": ({"source": source["name"]}, {"Authorization": f"Basic {source['secret']}"}),
    }
    for what, (params, headers) in cases.items():
        r = httpx.post(url, params=params, json={"Records": [record]}, headers=headers, timeout=30)
        assert r.status_code == 401, (what, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), what
        assert r.headers["www-authenticate"] == "Bearer", what
        assert "hook-source secret" in r.json()["detail"] or "hook source" in r.json()["detail"], (what, r.json())
        assert source["secret"] not in r.text and other["secret"] not in r.text, what
    # unknown name and wrong secret answer alike: the answer does not tell which names exist
    unknown = httpx.post(url, params={"source": "nobody"}, json={}, headers={"Authorization": "Bearer whsec_x"})
    wrong = httpx.post(url, params={"source": source["name"]}, json={}, headers={"Authorization": "Bearer whsec_x"})
    assert unknown.json()["detail"].replace("'nobody'", "X") == wrong.json()["detail"].replace(
        repr(source["name"]), "X")
    assert job_count(live) == before


def test_records_outside_the_pattern_prefix_or_allowed_locations_are_refused_in_the_body(live, s3, source):
    with live.client() as c:
        # allowed by the source, but outside the service's allowed locations (s3://BUCKET/runs/)
        elsewhere = c.create_hook_source(f"elsewhere-{uid()}", prefix=f"s3://{BUCKET}/elsewhere/",
                                         pattern=r"(?P<run>[a-z0-9-]+)/step_(?P<step>[0-9]+)/")
        unmapped = c.create_hook_source(f"signed-only-{uid()}")
    tag = uid()

    def rec(key: str, **kw) -> dict:
        return aws_record(key, size=10, etag=uid(), sequencer=uid(), **kw)

    before = job_count(live)
    body = {"Records": [
        rec(f"{PREFIX}/r-{tag}/ckpt-1000/model.safetensors"),                 # not RUN/checkpoint-STEP/
        rec(f"{PREFIX}/r-{tag}/checkpoint-x/model.safetensors"),              # the step is not digits either
        rec(f"{PREFIX}/model.safetensors"),                                   # no checkpoint directory
        rec(f"other/r-{tag}/checkpoint-1/model.safetensors"),                 # outside the prefix
        rec(f"{PREFIX}-evil/r-{tag}/checkpoint-1/model.safetensors"),         # a name beside the prefix's
        rec(f"{PREFIX}/r-{tag}/checkpoint-1/model.safetensors", bucket="another-bucket"),
        rec(f"{PREFIX}/-bad {tag}/checkpoint-1/model.safetensors"),           # not a run name
        rec(f"{PREFIX}/r-{tag}/checkpoint-1/sub/model.safetensors"),          # not directly in the directory
        rec(f"{PREFIX}/r-{tag}/checkpoint-1/model.safetensors", event="ObjectRemoved:Delete"),
        rec(f"{PREFIX}/r-{tag}/checkpoint-1/README.md"),                      # not a marker
    ]}
    r = notify(live, source, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["received"] == 10 and out["jobs_created"] == 0 and out["source"] == source["name"]
    got = [(x["status"], x["code"]) for x in out["results"]]
    assert got == [
        ("refused", "no_match"), ("refused", "no_match"), ("refused", "no_match"),
        ("refused", "outside_prefix"), ("refused", "outside_prefix"), ("refused", "outside_prefix"),
        ("refused", "invalid_checkpoint"), ("refused", "not_in_directory"), ("skipped", None), ("skipped", None),
    ], out["results"]
    assert [x["index"] for x in out["results"]] == list(range(10))
    assert out["results"][6]["key"] == f"{PREFIX}/-bad {tag}/checkpoint-1/model.safetensors"  # '+' decoded
    assert "pattern" in out["results"][0]["detail"] and "prefix" in out["results"][3]["detail"]
    assert all(x["detail"] for x in out["results"])
    # the source's own prefix lies outside the service's allowed locations: refused with that code
    r = notify(live, elsewhere, {"Records": [rec(f"elsewhere/r-{tag}/step_5/model.safetensors")]})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert (result["status"], result["code"]) == ("refused", "checkpoint_outside_roots"), result
    assert result["run"] == f"r-{tag}" and result["step"] == 5 and "LAYERTRACK_CHECKPOINT_ROOTS" in result["detail"]
    # S3's test event (no records), a source without a mapping, malformed messages
    r = notify(live, source, {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})
    assert r.status_code == 200 and r.json()["results"] == [], r.text
    r = notify(live, unmapped, {"Records": body["Records"][:1]})
    assert r.status_code == 409 and "--prefix" in r.json()["detail"], r.text
    for bad in ({"Records": {"eventName": "x"}}, {"Records": [{"eventName": "ObjectCreated:Put"}]},
                {"Records": [{**body["Records"][0], "s3": {"bucket": {"name": BUCKET}, "object": {"key": 5}}}]}):
        r = notify(live, source, bad)
        assert r.status_code == 422 and r.json()["errors"][0]["loc"][0] == "body", r.text
    r = httpx.post(f"{live.url}/v1/hooks/object-store", params={"source": source["name"]}, content=b"{not json",
                   headers={"Authorization": f"Bearer {source['secret']}", "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert job_count(live) == before


# ------------------------------------------------------------------ the mapping, where it is made
def test_a_hook_sources_mapping_is_checked_when_it_is_created(live):
    bad = [
        ({"prefix": "gs://bucket/runs/"}, "not an s3:// location"),
        ({"prefix": f"s3://AKIAEXAMPLE:s3cr3t@{BUCKET}/runs/"}, "credentials"),
        ({"prefix": f"s3://{BUCKET}/runs/", "pattern": r"(?P<run>[^/]+)/(?P<step>[0-9]+"}, "not a valid regular"),
        ({"prefix": f"s3://{BUCKET}/runs/", "pattern": r"(?P<run>[^/]+)/"}, "no named group 'step'"),
        ({"prefix": f"s3://{BUCKET}/runs/", "pattern": r"(?P<run>[^/]+)/checkpoint-(?P<step>[0-9]+)"}, "end with '/'"),
        ({"prefix": f"s3://{BUCKET}/runs/", "markers": ["sub/model.safetensors"]}, "not a file name"),
        ({"pattern": hooks.DEFAULT_PATTERN}, "give the prefix too"),
    ]
    with live.http() as h:
        for fields, needle in bad:
            r = h.post("/v1/hook-sources", json={"name": f"bad-{uid()}", **fields})
            assert r.status_code == 422 and needle in r.json()["detail"], (fields, r.text)
            assert "s3cr3t" not in r.text
        r = h.post("/v1/hook-sources", json={"name": f"ok-{uid()}", "prefix": f"s3://{BUCKET}",
                                             "pattern": r"(?P<run>[^/]+/[^/]+)/global_step(?P<step>\d+)/",
                                             "markers": ["_SUCCESS", "_SUCCESS"]})
        assert r.status_code == 201, r.text
        assert r.json()["prefix"] == f"s3://{BUCKET}/" and r.json()["markers"] == ["_SUCCESS"], r.json()
        listed = {s["name"]: s for s in h.get("/v1/hook-sources").json()}
        assert listed[r.json()["name"]]["pattern"] == r"(?P<run>[^/]+/[^/]+)/global_step(?P<step>\d+)/"
        assert listed[r.json()["name"]]["secret"] is None
    with session_scope(live.db_url) as s:
        stored = s.scalar(select(HookSource).where(HookSource.name == r.json()["name"]))
        assert r.json()["secret"] not in stored.secret  # encrypted at rest


def test_the_cli_creates_a_source_with_a_mapping_and_refuses_a_bad_pattern(live):
    env = {**os.environ, "LAYERTRACK_URL": live.url, "LAYERTRACK_TOKEN": live.token}
    name = f"cli-{uid()}"
    out = subprocess.run([layertrack_exe(), "hook-source", name, "--prefix", f"s3://{BUCKET}/{PREFIX}/",
                          "--pattern", r"(?P<run>[^/]+)/step_(?P<step>\d+)/", "--marker", "config.json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert f"POST /v1/hooks/object-store?source={name}" in out.stdout, out.stdout
    assert r"(?P<run>[^/]+)/step_(?P<step>\d+)/" in out.stdout and "config.json" in out.stdout, out.stdout
    assert "secret (shown once): whsec_" in out.stdout
    bad = subprocess.run([layertrack_exe(), "hook-source", f"cli-{uid()}", "--prefix", f"s3://{BUCKET}/{PREFIX}/",
                          "--pattern", r"(?P<run>[^/]+)/"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 3 and bad.stderr.startswith("error: ") and "'step'" in bad.stderr, (bad.stdout, bad.stderr)
    usage = subprocess.run([layertrack_exe(), "hook-source", f"cli-{uid()}", "--pattern", "x/"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 2 and "--prefix" in usage.stderr, (usage.stdout, usage.stderr)


# ------------------------------------------------------------------ mapping keys (no service)
def test_keys_map_to_run_step_and_uri_as_the_store_encodes_them():
    src = HookSource(name="m", secret="", prefix=f"s3://{BUCKET}/{PREFIX}/",
                     pattern=r"(?P<run>[^/]+/[^/]+)/checkpoint-(?P<step>[0-9]+)/", markers=["config.json"])
    aws = hooks.map_object(src, BUCKET, quote_plus(f"{PREFIX}/org/llama 1b/checkpoint-50/config.json", safe="/"))
    minio = hooks.map_object(src, BUCKET, quote(f"{PREFIX}/org/llama 1b/checkpoint-50/config.json", safe=""))
    assert aws == minio == hooks.ObjectTarget(run="org/llama 1b", step=50, uri=f"s3://{BUCKET}/{PREFIX}/org/llama "
                                              "1b/checkpoint-50", file="config.json", marker=True)
    assert not hooks.map_object(src, BUCKET, f"{PREFIX}/org/x/checkpoint-50/model.safetensors").marker
    root = HookSource(name="r", secret="", prefix=f"s3://{BUCKET}/", pattern=hooks.DEFAULT_PATTERN,
                      markers=list(hooks.DEFAULT_MARKERS))
    assert hooks.map_object(root, BUCKET, "a/checkpoint-7/model.safetensors").uri == f"s3://{BUCKET}/a/checkpoint-7"
    one = hooks.record_receipt(root, BUCKET, "a%2Fb", version=None, sequencer="01", etag="e").msg_id
    assert one == hooks.record_receipt(root, BUCKET, "a/b", version=None, sequencer="01", etag="e").msg_id
    assert one != hooks.record_receipt(root, BUCKET, "a/b", version=None, sequencer="02", etag="e").msg_id


# ------------------------------------------------------------------ property-based, with the secret
FUZZ_BUCKET = "fuzz-bucket"


def test_generated_notifications_with_the_right_secret_get_documented_answers_and_no_5xx(tmp_path, redis_server):
    """schemathesis over this one operation, as tests/test_openapi_fuzz.py runs it over all of
    them, but with the hook source's secret as the bearer, so that the records reach the
    mapping and the submission (the general fuzz test only gets 401s here): keys, buckets and
    event names drawn half of the time from ones that map, refuse, or carry NUL, '..', '%2F'
    and '+'; no 5xx, every answer documented, jobs created for the ones that map."""
    import json

    from services import Service
    from test_openapi_fuzz import failure_text, schemathesis_exe

    roots = tmp_path / "ckpts"
    roots.mkdir()
    svc = Service(tmp=tmp_path, db_url=f"sqlite:///{tmp_path / 'lt.db'}", broker_url="filesystem://", roots=roots,
                  extra_env={"LAYERTRACK_SWEEP_INTERVAL_S": "0",
                             "LAYERTRACK_CHECKPOINT_ROOTS": f"{roots},s3://{FUZZ_BUCKET}/in/"})
    try:
        svc.migrate_and_token()
        svc.start_api()
        with svc.client() as c:  # every key below the bucket maps: PART/RUN/STEP/FILE, the step anything
            src = c.create_hook_source("fuzz-store", prefix=f"s3://{FUZZ_BUCKET}/",
                                       pattern=r"[^/]*/(?P<run>[^/]*)/(?P<step>[^/]*)/",
                                       markers=["model.safetensors", "config.json"])
        keys = ["in/run-a/100/model.safetensors", "in%2Frun-b%2F200%2Fconfig.json", "in/run+c/300/config.json",
                "out/run-d/1/model.safetensors", "in/run-e/x1/model.safetensors", "in/trend/5/model.safetensors",
                "in/../6/model.safetensors", "in/run-f/7/%00", "in/run-g/8/sub/config.json", "in//9/config.json",
                "in/run-h/99999999999999999999/config.json", "in/run-i/10/README.md"]
        values = {"key": keys, "bucket": [FUZZ_BUCKET, "other-bucket"],
                  "event": ["ObjectCreated:Put", "s3:ObjectCreated:CompleteMultipartUpload", "ObjectRemoved:Delete"],
                  "source": ["fuzz-store"]}
        lines = ["[generation]", "deterministic = true", 'database = "none"', "",
                 "[phases.examples]", "enabled = false", "[phases.stateful]", "enabled = false",
                 "[phases.fuzzing.error-feedback]", "enabled = false", "",
                 # a generated body over the 64 KiB limit is refused as too large before it is read
                 "[checks.negative_data_rejection]",
                 "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]", ""]
        lines += [f'[dictionaries."{k}"]\nvalues = {json.dumps(v)}' for k, v in values.items()]
        lines += ["", "[parameters]", '"query.source" = { dictionary = "source", probability = 0.8 }',
                  '"body.Records[*].s3.object.key" = { dictionary = "key", probability = 0.8 }',
                  '"body.Records[*].s3.bucket.name" = { dictionary = "bucket", probability = 0.9 }',
                  '"body.Records[*].eventName" = { dictionary = "event", probability = 0.8 }']
        (tmp_path / "schemathesis.toml").write_text("\n".join(lines) + "\n")
        report, events = tmp_path / "report.json", tmp_path / "events.ndjson"
        cmd = [schemathesis_exe(), "--config-file", str(tmp_path / "schemathesis.toml"), "run",
               f"{svc.url}/openapi.json", "--include-path", "/v1/hooks/object-store", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--phases", "coverage,fuzzing", "--max-examples", "150",
               "--workers", "1", "--continue-on-failure", "--no-color", "--request-timeout", "30",
               "--header", f"Authorization: Bearer {src['secret']}", "--report", "json,ndjson",
               "--report-json-path", str(report), "--report-ndjson-path", str(events)]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert report.exists(), output[-4000:]
        data = json.loads(report.read_text())
        statuses: dict = {}
        for line in events.read_text().splitlines():
            event = json.loads(line)
            recorder = event.get("ScenarioFinished", {}).get("recorder", {})
            for interaction in (recorder.get("interactions") or {}).values():
                status = (interaction.get("response") or {}).get("status_code")
                statuses[status] = statuses.get(status, 0) + 1
        print(f"\nschemathesis [object-store hook, with the secret]: {data['test_cases']['generated']} cases, "
              f"status codes {dict(sorted(statuses.items(), key=lambda kv: kv[0] or 0))}")
        assert data["operations"]["tested"] == 1 and not data["errors"], data
        assert not data["failures"] and not any(s and s >= 500 for s in statuses), failure_text(output)
        assert statuses.get(200, 0) > 20 and statuses.get(202, 0) > 0 and statuses.get(401, 0) > 0, statuses
        with session_scope(svc.db_url) as s:  # what was submitted lies within the allowed prefix
            uris = [j.checkpoint.uri for j in s.scalars(select(Job))]
        assert uris and all(u.startswith(f"s3://{FUZZ_BUCKET}/in/") for u in uris), uris
    finally:
        svc.stop()
