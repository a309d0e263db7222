"""The HTTP API over a real socket, on SQLite and on PostgreSQL: tokens, validation,
idempotent submission, job state changes. (Scoring itself: tests/test_end_to_end.py.)"""

from __future__ import annotations

import re
import shutil
import uuid

import httpx
import pytest
from layertrack.service.auth import create_token, revoke
from layertrack.service.db import session_scope
from layertrack.service.models import AlertFiring, AlertRule, Checkpoint, Delivery, Job, Run, Score, Webhook
from sqlalchemy import func, select


@pytest.fixture(scope="module")
def ckpt(api_service, tmp_path_factory, tokenizer):
    from tiny_models import build_checkpoint

    return build_checkpoint(api_service.roots / "run-a" / "step-10", "llama", tokenizer)


def counts(svc) -> tuple[int, int, int, int]:
    with session_scope(svc.db_url) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Run, Checkpoint, Job, Score))


def body(ckpt, **over):
    b = {"run": f"run-{uuid.uuid4().hex[:8]}", "step": 10, "uri": str(ckpt),
         "config": {"max_tokens": 600, "seq_len": 64}}
    b.update(over)
    return b


def test_health_and_readiness_need_no_token(api_service):
    assert httpx.get(api_service.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(api_service.url + "/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok"}


#: the routes that hold no data and take no bearer token (the signed inbound hook has a
#: signature instead: tests/test_webhooks.py)
OPEN_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/hooks/checkpoint"),
               ("POST", "/v1/hooks/object-store")}
#: one route of every group the README lists, so that the schema walked below is the whole API
README_ROUTES = {
    ("POST", "/v1/checkpoints"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs/{}/retry"), ("GET", "/v1/runs/{}"),
    ("GET", "/v1/runs/{}/scores"), ("GET", "/v1/runs/{}/export"), ("GET", "/v1/compare"), ("GET", "/v1/meta"),
    ("PATCH", "/v1/webhooks/{}"), ("POST", "/v1/webhooks/{}/deliveries/{}/redeliver"), ("POST", "/v1/hook-sources"),
    ("GET", "/v1/runs/{}/alerts/firings"), ("GET", "/v1/runs/{}/profile"), ("GET", "/v1/runs/{}/heatmap/plot.{}"),
    ("GET", "/metrics"), ("DELETE", "/v1/runs/{}"),
}
PARAM_VALUES = {"job_id": "x", "run": "x", "delivery_id": "x", "name": "x", "fmt": "png"}  # ids: "1"


def test_every_other_endpoint_needs_a_valid_token(api_service, ckpt):
    paths = httpx.get(api_service.url + "/openapi.json").json()["paths"]  # the schema the server serves
    every = {(m.upper(), path) for path, ops in paths.items() for m in ops}
    assert OPEN_ROUTES - every == set()
    routes = sorted(every - OPEN_ROUTES)
    assert README_ROUTES - {(m, re.sub(r"\{[^}]*\}", "{}", p)) for m, p in routes} == set()
    with session_scope(api_service.db_url) as s:
        row, revoked_secret = create_token(s, "to-revoke")
    with session_scope(api_service.db_url) as s:
        revoke(s, row.id)
    before = counts(api_service)
    for headers, message in [
        ({}, "missing API token"),
        ({"Authorization": "Bearer lt_not-a-real-token"}, "unknown or revoked API token"),
        ({"Authorization": f"Bearer {revoked_secret}"}, "unknown or revoked API token"),
        ({"Authorization": f"Basic {api_service.token}"}, "must be 'Bearer <token>'"),
    ]:
        for method, path in routes:
            url = api_service.url + re.sub(r"\{(\w+)[^}]*\}", lambda m: PARAM_VALUES.get(m[1], "1"), path)
            r = httpx.request(method, url, headers=headers, json=body(ckpt) if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert message in r.json()["detail"], (path, r.json())
    assert counts(api_service) == before


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"uri": "ftp://host/ckpt"}, 422, "unsupported URI scheme 'ftp'"),
        ({"uri": "s3://bucket/ckpt"}, 422, "outside the allowed remote locations"),
        ({"uri": ""}, 422, "uri"),
        ({"uri": None}, 422, "uri"),
        ({"uri": "/etc"}, 422, "outside the allowed checkpoint roots"),
        ({"uri": "{root}/../../etc"}, 422, "outside the allowed checkpoint roots"),
        ({"uri": "{root}/missing"}, 422, "does not exist"),
        ({"step": -1}, 422, "step: Input should be greater than or equal to 0"),
        ({"step": "ten"}, 422, "step: Input should be a valid integer"),
        ({"run": ""}, 422, "run: String should have at least 1 character"),
        ({"run": "bad name!"}, 422, "run: a run name may contain only the letters A-Z and a-z, digits and"),
        ({"metrics": ["linearity", "vibes"]}, 422, "unknown metric 'vibes'"),
        ({"config": {"seq_len": 1}}, 422, "config.seq_len"),
        ({"config": {"dtype": "int8"}}, 422, "config.dtype"),
        ({"surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
        ({"probe": "other"}, 422, "unknown probe 'other'"),
        ({"parent_run": "no-such-run"}, 422, "parent run 'no-such-run' does not exist"),
    ],
)
def test_bad_submissions_get_a_clear_4xx_and_change_nothing(api_service, ckpt, change, status, needle):
    b = body(ckpt)
    for k, v in change.items():
        if v is None:
            b.pop(k)
        else:
            b[k] = v.replace("{root}", str(api_service.roots)) if isinstance(v, str) else v
    before = counts(api_service)
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json=b)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert needle in r.json()["detail"], r.json()
    assert counts(api_service) == before


def test_not_json_oversized_and_unknown_things(api_service, ckpt):
    before = counts(api_service)
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
        r = h.post("/v1/checkpoints", json=body(ckpt, run="x" * 100_000))
        assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["detail"]
        r = h.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
        assert r.status_code == 404 and "no job with id" in r.json()["detail"]
        for path in ("/v1/runs/nope", "/v1/runs/nope/scores", "/v1/runs/nope/trend", "/v1/runs/nope/heatmap",
                     "/v1/runs/nope/export", "/v1/compare?runs=nope"):
            r = h.get(path)
            assert r.status_code == 404 and "no run named 'nope'" in r.json()["detail"], path
        r = h.get("/v1/jobs", params={"status": "sleeping"})
        assert r.status_code == 422
    assert counts(api_service) == before


def test_the_same_checkpoint_twice_is_one_job(api_service, ckpt):
    b = body(ckpt)
    with api_service.http() as h:
        first = h.post("/v1/checkpoints", json=b)
        assert first.status_code == 202, first.text
        job = first.json()
        assert job["status"] == "queued" and job["status_url"] == f"/v1/jobs/{job['id']}"
        assert first.headers["Location"] == job["status_url"]
        again = h.post("/v1/checkpoints", json=b)
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        # a different config is a different job for the same checkpoint
        other = h.post("/v1/checkpoints", json={**b, "config": {"max_tokens": 700, "seq_len": 64}})
        assert other.status_code == 202 and other.json()["id"] != job["id"]
        assert h.get(job["status_url"]).json()["run"] == b["run"]
        listed = h.get("/v1/jobs", params={"run": b["run"]}).json()
        assert {j["id"] for j in listed} == {job["id"], other.json()["id"]}
        run = h.get(f"/v1/runs/{b['run']}").json()
        assert run["n_checkpoints"] == 1 and run["jobs"]["queued"] == 2 and run["phase"] == "pretrain"


def test_idempotency_key(api_service, ckpt):
    key = uuid.uuid4().hex
    b = body(ckpt)
    with api_service.http() as h:
        r1 = h.post("/v1/checkpoints", json=b, headers={"Idempotency-Key": key})
        r2 = h.post("/v1/checkpoints", json=b, headers={"Idempotency-Key": key})
        assert r1.status_code == 202 and r2.status_code == 200 and r1.json()["id"] == r2.json()["id"]
        r3 = h.post("/v1/checkpoints", json={**b, "step": 11}, headers={"Idempotency-Key": key})
        assert r3.status_code == 409 and "already used with a different request" in r3.json()["detail"]


def test_cancel_retry_and_finetune_runs(api_service, ckpt, tmp_path):
    parent = body(ckpt)
    with api_service.http() as h:
        pj = h.post("/v1/checkpoints", json=parent).json()
        ft_ckpt = api_service.roots / f"ft-{uuid.uuid4().hex[:6]}"
        shutil.copytree(ckpt, ft_ckpt)
        child = h.post("/v1/checkpoints", json=body(ft_ckpt, parent_run=parent["run"], parent_step=10))
        assert child.status_code == 202, child.text
        run = h.get(f"/v1/runs/{child.json()['run']}").json()
        assert run["phase"] == "finetune" and run["parent_run"] == parent["run"] and run["parent_step"] == 10
        r = h.post(f"/v1/jobs/{pj['id']}/retry")
        assert r.status_code == 409 and "only failed or cancelled jobs can be retried" in r.json()["detail"]
        r = h.post(f"/v1/jobs/{pj['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = h.post(f"/v1/jobs/{pj['id']}/cancel")
        assert r.status_code == 409
        r = h.post(f"/v1/jobs/{pj['id']}/retry")
        assert r.status_code == 200 and r.json()["status"] == "queued"
        names = [x["name"] for x in h.get("/v1/runs", params={"name": parent["run"][4:]}).json()]
        assert names == [parent["run"]]


def test_metrics_endpoint_counts_jobs(api_service):
    with api_service.http() as h:
        r = h.get("/metrics")
    assert r.status_code == 200
    assert 'layertrack_jobs{status="queued"}' in r.text


def test_meta_is_the_vocabulary_clients_use(api_service):
    with api_service.http() as h:
        r = h.get("/v1/meta")
    assert r.status_code == 200, r.text
    meta = r.json()
    metrics = {m["name"]: m for m in meta["metrics"]}
    layer = ("anisotropy", "effective_rank", "massive_activation")
    assert list(metrics) == ["linearity", "linearity_nores", "cosine", "norm_ratio", *layer,
                             "loss_delta_linear", "loss_delta_drop", "weight_update", "drift_cka", "logit_lens_loss"]
    assert {n: m["kind"] for n, m in metrics.items()} == {
        n: "layer" if n in (*layer, "drift_cka", "logit_lens_loss") else "pair" for n in metrics}
    assert {n: m["range"] for n, m in metrics.items()} == {
        "linearity": [0, 1], "linearity_nores": [0, 1], "cosine": [-1, 1], "norm_ratio": [0, None],
        "anisotropy": [0, 1], "effective_rank": [1, None], "massive_activation": [1, None],
        "loss_delta_linear": [None, None], "loss_delta_drop": [None, None], "weight_update": [0, None],
        "drift_cka": [0, 1], "logit_lens_loss": [0, None]}
    assert [n for n, m in metrics.items() if m["default"]] == [
        "linearity", "linearity_nores", "cosine", "norm_ratio", *layer]
    assert all(isinstance(m["label"], str) and m["label"] for m in metrics.values())
    assert meta["default_metric"] == "linearity_nores"
    assert meta["job_statuses"] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert meta["webhook_events"] == ["job.succeeded", "job.failed", "trend.alert"]
    assert isinstance(meta["defaults"], dict)


def test_the_read_routes_default_to_the_vocabularys_metric(api_service):
    """Without ``metric``, every read route and figure shows DEFAULT_METRIC (linearity_nores)."""
    from layertrack.workers.vocabulary import DEFAULT_METRIC
    from services import synthetic_run

    assert DEFAULT_METRIC == "linearity_nores"
    run = f"default-metric-{uuid.uuid4().hex[:6]}"
    synthetic_run(api_service.db_url, run, (10, 20), fingerprint=f"dm-{run}", anisotropy=0.3,
                  pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.25, "cosine": 0.8, "norm_ratio": 1.1})
    with api_service.http() as h:
        for view in ("scores", "trend", "heatmap", "profile"):
            got = h.get(f"/v1/runs/{run}/{view}")
            assert got.status_code == 200, (view, got.text)
            assert got.json()["metric"] == DEFAULT_METRIC, view
        assert h.get(f"/v1/runs/{run}/trend").json()["values"] == [0.25, 0.25]
        assert {v for s in h.get(f"/v1/runs/{run}/scores").json()["series"] for v in s["values"]} == {0.25}
        compared = h.get("/v1/compare", params={"runs": run}).json()
        assert compared["metric"] == DEFAULT_METRIC and compared["runs"][0]["values"] == [0.25, 0.25]
        for kind in ("trend", "heatmap", "profile"):
            assert h.get(f"/v1/runs/{run}/{kind}/plot.svg").status_code == 200, kind
    schema = httpx.get(api_service.url + "/openapi.json").json()["paths"]
    for path in ("/v1/runs/{run}/scores", "/v1/runs/{run}/trend", "/v1/runs/{run}/heatmap", "/v1/runs/{run}/profile",
                 "/v1/compare", "/v1/runs/{run}/trend/plot.{fmt}"):
        [metric] = [p for p in schema[path]["get"]["parameters"] if p["name"] == "metric"]
        assert metric["schema"]["default"] == DEFAULT_METRIC, path


def test_pages_static_files_favicon_and_docs_are_open_and_local(api_service):
    for path in ("/", "/jobs", "/jobs/some-job-id", "/compare", "/runs/org/llama-350m", "/static/app.js",
                 "/static/app.css",
                 "/static/vendor/echarts.min.js", "/static/vendor/swagger-ui/swagger-ui-bundle.js",
                 "/static/vendor/swagger-ui/swagger-ui.css"):
        r = httpx.get(api_service.url + path)
        assert r.status_code == 200, (path, r.status_code)
    icon = httpx.get(api_service.url + "/favicon.ico")
    assert icon.status_code == 200 and icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
    docs = httpx.get(api_service.url + "/docs")
    assert docs.status_code == 200
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "/static/vendor/swagger-ui/swagger-ui.css" in docs.text
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text
    assert httpx.get(api_service.url + "/redoc").status_code == 404


def test_run_names_with_a_slash_work_in_the_run_routes(api_service, ckpt):
    """``org/llama-350m``: the dashboard sends such names with the ``/`` unencoded."""
    run = f"org-{uuid.uuid4().hex[:6]}/llama-350m"
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json=body(ckpt, run=run))
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["run"] == run
        got = h.get(f"/v1/runs/{run}")
        assert got.status_code == 200 and got.json()["name"] == run, got.text
        for view in ("trend", "heatmap", "scores", "profile", "alerts", "alerts/firings"):
            r = h.get(f"/v1/runs/{run}/{view}", params={"metric": "linearity"} if view != "alerts" else None)
            assert r.status_code == 200, (view, r.text)
        assert h.get(f"/v1/runs/{run}/trend").json()["steps"] == []
        assert [j["id"] for j in h.get("/v1/jobs", params={"run": run}).json()] == [job["id"]]
        assert [x["name"] for x in h.get("/v1/runs", params={"name": run}).json()] == [run]


# ------------------------------------------------------------------ deleting a run
def scores_of(svc, run_name: str) -> dict:
    """Every stored score of a run, straight from the database: {(step, metric, layer): value}."""
    with session_scope(svc.db_url) as s:
        rows = s.execute(select(Score.step, Score.metric, Score.layer, Score.value).join(Run, Run.id == Score.run_id)
                         .where(Run.name == run_name)).all()
    return {(step, m, layer): v for step, m, layer, v in rows}


def rows_of_run(svc, run_id: int) -> dict[str, int]:
    with session_scope(svc.db_url) as s:
        return {t.__tablename__: s.scalar(select(func.count()).select_from(t).where(t.run_id == run_id))
                for t in (Checkpoint, Job, Score, AlertRule, AlertFiring, Webhook)}


def test_deleting_a_run_needs_admin_and_leaves_nothing_of_it_in_any_read_route(api_service, ckpt):
    from services import synthetic_run

    tag = uuid.uuid4().hex[:6]
    run, neighbour = f"org-{tag}/doomed", f"org-{tag}/kept"

    def score(name: str, steps: tuple[int, ...]) -> list[str]:
        return synthetic_run(api_service.db_url, name, steps, fingerprint=f"del-{name}", anisotropy=0.3,
                             pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.2 if step < 15 else 0.8,
                                                "cosine": 0.8, "norm_ratio": 1.1})

    scored = score(run, (10,))
    score(neighbour, (10, 20))
    with api_service.http() as h:  # every token scope
        assert h.post(f"/v1/runs/{run}/alerts", json={"metric": "linearity_nores", "kind": "threshold",
                                                     "above": 0.5}).status_code == 201
        own_hook = h.post("/v1/webhooks", json={"url": "http://8.8.8.8/doomed", "run": run}).json()["id"]
        every_run_hook = h.post("/v1/webhooks", json={"url": "http://8.8.8.8/every-run"}).json()["id"]
        scored += score(run, (20,))  # fires the rule: job.succeeded and trend.alert to each webhook
        assert len(h.get(f"/v1/runs/{run}/alerts/firings").json()) == 1
        kept_deliveries = {d["id"] for d in h.get(f"/v1/webhooks/{every_run_hook}/deliveries").json()}
        assert any(d["payload"]["data"].get("run") == run for d in
                   h.get(f"/v1/webhooks/{every_run_hook}/deliveries").json())
        ft = shutil.copytree(ckpt, api_service.roots / f"ft-{tag}")
        child = h.post("/v1/checkpoints", json=body(ft, run=f"org-{tag}/child", parent_run=run, parent_step=20))
        assert child.status_code == 202, child.text
    with session_scope(api_service.db_url) as s:
        run_id = s.scalar(select(Run.id).where(Run.name == run))
        tokens = {scope: create_token(s, f"{scope}-{tag}", scopes=[scope])[1] for scope in ("read", "submit", "admin")}
    before = rows_of_run(api_service, run_id)
    assert before == {"checkpoints": 2, "jobs": 2, "scores": 32, "alert_rules": 1, "alert_firings": 1, "webhooks": 1}
    neighbour_scores = scores_of(api_service, neighbour)
    assert len(neighbour_scores) == 32

    def delete(token: str, name: str = run, **params) -> httpx.Response:
        return httpx.delete(f"{api_service.url}/v1/runs/{name}", params=params, timeout=30,
                            headers={"Authorization": f"Bearer {token}"})

    for scope in ("read", "submit"):  # refused, and nothing is gone
        r = delete(tokens[scope])
        assert r.status_code == 403 and r.json()["code"] == "missing_scope", r.text
        assert "lacks the 'admin' scope" in r.json()["detail"]
    assert rows_of_run(api_service, run_id) == before

    dry = delete(tokens["admin"], dry_run="true")
    assert dry.status_code == 200, dry.text
    assert dry.json() == {"run": run, "deleted": False, "jobs": 2, "checkpoints": 2, "scores": 32, "alert_rules": 1,
                          "alert_firings": 1, "webhooks": 1, "webhook_deliveries": 2, "active_jobs": [],
                          "child_runs": [f"org-{tag}/child"]}
    assert rows_of_run(api_service, run_id) == before

    with api_service.http() as h:  # a queued job of the run: refused until it is cancelled
        queued = h.post("/v1/checkpoints", json=body(ckpt, run=run, step=30)).json()["id"]
        r = delete(tokens["admin"])
        assert r.status_code == 409 and r.json()["code"] == "run_has_active_jobs", r.text
        assert f"1 queued or running job(s) ({queued}): cancel them first" in r.json()["detail"]
        assert delete(tokens["admin"], dry_run="true").json()["active_jobs"] == [queued]
        assert h.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"

    r = delete(tokens["admin"])
    assert r.status_code == 200, r.text
    assert r.json() == {**dry.json(), "deleted": True, "jobs": 3, "checkpoints": 3}
    assert rows_of_run(api_service, run_id) == dict.fromkeys(before, 0)
    with api_service.http() as h:
        for path in ("", "/scores", "/trend", "/heatmap", "/profile", "/export", "/alerts", "/alerts/firings",
                     "/trend/plot.svg", "/heatmap/plot.svg", "/profile/plot.svg"):
            r = h.get(f"/v1/runs/{run}{path}")
            assert r.status_code == 404 and r.json()["code"] == "run_not_found", (path, r.text)
        for path in (f"/v1/compare?runs={run}", f"/v1/jobs?run={run}"):
            assert h.get(path).json()["code"] == "run_not_found", path
        assert run not in {x["name"] for x in h.get("/v1/runs").json()}
        listed = {j["id"] for j in h.get("/v1/jobs", params={"limit": 1000}).json()}
        for job in (*scored, queued):
            assert h.get(f"/v1/jobs/{job}").status_code == 404 and job not in listed
        assert h.get(f"/v1/webhooks/{own_hook}").status_code == 404  # limited to the run: gone with it
        assert {d["id"] for d in h.get(f"/v1/webhooks/{every_run_hook}/deliveries").json()} >= kept_deliveries
        kid = h.get(f"/v1/runs/org-{tag}/child").json()  # the fine-tune stays, without a parent
        assert (kid["parent_run"], kid["parent_step"], kid["jobs"]["queued"]) == (None, None, 1)
        assert scores_of(api_service, neighbour) == neighbour_scores
        r = h.delete(f"/v1/runs/{run}")
        assert r.status_code == 404 and r.json()["code"] == "run_not_found"
        assert h.delete("/v1/runs/no-such-run", params={"dry_run": "true"}).json()["code"] == "run_not_found"
    with session_scope(api_service.db_url) as s:  # nothing left over that pointed at the run or its jobs
        assert s.scalar(select(func.count()).select_from(Score).where(Score.job_id.in_(scored))) == 0
        assert s.scalar(select(func.count()).select_from(Delivery).where(Delivery.webhook_id == own_hook)) == 0
