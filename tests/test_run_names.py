"""Run names with '/' (``org/llama-350m``, as Hub-style names go) work on every run route,
in the client, the CLI and the dashboard page; names that would make a route ambiguous are
refused at submission with a message that says why."""

from __future__ import annotations

import os
import re
import subprocess
import typing

import pytest
from layertrack.service.api import create_app
from layertrack.service.client import Job, RunInfo, Trend
from services import layertrack_exe, live_service
from tiny_models import build_checkpoint

RUN = "org/llama-350m"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, redis_server, tokenizer):
    """A live service (PostgreSQL, Redis, one worker) with two scored steps of RUN."""
    tmp = tmp_path_factory.mktemp("run-names")
    with live_service(tmp, redis_server.new_url()) as svc:
        jobs = []
        with svc.client() as c:
            for step, seed in ((10, 0), (20, 1)):
                ckpt = build_checkpoint(svc.roots / "org" / f"step-{step}", "llama", tokenizer, seed=seed)
                jobs.append(c.submit(run=RUN, step=step, uri=str(ckpt), config={"max_tokens": 600, "seq_len": 64}))
            done = [c.wait(j["id"], timeout=300) for j in jobs]
        assert [j["status"] for j in done] == ["succeeded", "succeeded"], svc.logs()
        yield svc, done


def run_routes() -> list[tuple[str, str]]:
    paths = create_app().openapi()["paths"]
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops if "{run}" in p]
    return sorted(routes, key=lambda r: (r[0] == "DELETE", r))  # the alert rule is deleted last


def test_every_run_route_answers_for_a_name_with_a_slash(scored):
    svc, _jobs = scored
    routes = run_routes()
    assert len(routes) >= 12  # the walk below covers every one of them, whatever their number
    with svc.http() as h:
        rule = h.post(f"/v1/runs/{RUN}/alerts", json={"metric": "linearity", "kind": "threshold", "above": 2})
        assert rule.status_code == 201, rule.text
        assert rule.json()["run"] == RUN
        seen = {("POST", "/v1/runs/{run}/alerts")}
        for method, path in routes:
            if (method, path) in seen:
                continue
            url = path.replace("{run}", RUN).replace("{fmt}", "svg").replace("{rule_id}", str(rule.json()["id"]))
            assert "{" not in url, url
            deleting_the_run = (method, path) == ("DELETE", "/v1/runs/{run}")  # a dry run: it stays for the rest
            r = h.request(method, url, params={"dry_run": "true"} if deleting_the_run else None)
            expected = 204 if method == "DELETE" and not deleting_the_run else 200
            assert r.status_code == expected, (method, url, r.status_code, r.text)
            seen.add((method, path))
            if r.headers.get("content-type", "").startswith("application/json") and isinstance(r.json(), dict):
                assert r.json().get("run", r.json().get("name")) == RUN, (url, r.json())
            elif method == "GET" and path.endswith("plot.{fmt}"):
                assert r.headers["content-type"] == "image/svg+xml" and b"<svg" in r.content
            elif path.endswith("/export"):
                assert r.text.splitlines()[1].startswith(f"{RUN},")
    assert seen == set(routes)
    with svc.http() as h:  # the name is not split anywhere: "org" alone is no run
        assert h.get("/v1/runs/org").status_code == 404
        assert h.get("/v1/runs/llama-350m/trend").status_code == 404
        assert [r["name"] for r in h.get("/v1/runs").json()] == [RUN]
        assert [j["run"] for j in h.get("/v1/jobs", params={"run": RUN}).json()] == [RUN, RUN]
        page = h.get(f"/runs/{RUN}")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_the_client_and_its_typed_answers_match_the_api(scored):
    svc, jobs = scored
    with svc.client() as c:
        run, trend, job = c.run(RUN), c.trend(RUN, metric="linearity_nores"), c.job(jobs[0]["id"])
        assert run["name"] == RUN and run["last_step"] == 20 and run["jobs"]["succeeded"] == 2
        assert trend["steps"] == [10, 20] and all(0 <= v <= 1 for v in trend["values"])
        assert c.profile(RUN, metric="cosine", steps=[10])["steps"] == [10]
        assert c.plot(RUN, "heatmap", format="svg").startswith(b"<?xml")
        assert [r["run"] for r in c.compare([RUN])["runs"]] == [RUN]
    for typed, answer in ((RunInfo, run), (Trend, trend), (Job, job)):
        assert set(typing.get_type_hints(typed)) == set(answer), typed.__name__


def test_the_cli_trend_and_plot_take_such_a_name(scored, tmp_path):
    svc, _jobs = scored
    env = {**svc.env(), "LAYERTRACK_URL": svc.url, "LAYERTRACK_TOKEN": svc.token}
    out = subprocess.run([layertrack_exe(), "trend", RUN, "--metric", "linearity"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\s*20\s", out.stdout, re.M), out.stdout
    fig = tmp_path / "trend.svg"
    out = subprocess.run([layertrack_exe(), "plot", RUN, "--kind", "trend", "-o", str(fig)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert fig.read_bytes().startswith(b"<?xml")


@pytest.mark.parametrize(("name", "needle"), [
    ("org/trend", "may not have a part named 'trend'"),
    ("org/exp/alerts", "may not have a part named 'alerts'"),
    ("org//llama", "no empty part"),
    ("org/llama/", "no empty part"),
    ("org/../llama", "'.' or '..'"),
    ("org/plot.png", "may not have a part named 'plot.png'"),
])
def test_a_name_that_would_be_ambiguous_is_refused_with_the_reason(api_service, name, needle):
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json={"run": name, "step": 1, "uri": str(api_service.roots)})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert needle in r.json()["detail"], r.json()["detail"]


@pytest.mark.parametrize(("name", "why"), [
    ("my run", "a space is not allowed"),
    ("-leading", "it starts with '-'"),
    ("café/run#2", "'#', 'é' are not allowed"),
])
def test_a_name_with_characters_not_allowed_says_which_in_words(api_service, name, why):
    allowed = ("a run name may contain only the letters A-Z and a-z, digits and . _ : / @ + - ('/' between parts, "
               "as in org/llama-350m), starting with a letter or digit")
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json={"run": name, "step": 1, "uri": str(api_service.roots)})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail == f"body.run: {allowed}: {why}", detail
    assert "[A-Za-z0-9]" not in r.text  # no regular expression in the answer
    # the CLI prints the same words on its one line
    env = dict(os.environ, LAYERTRACK_URL=api_service.url, LAYERTRACK_TOKEN=api_service.token)
    out = subprocess.run([layertrack_exe(), "submit", "--", name, "1", str(api_service.roots)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stderr.count("\n") == 1, out.stderr
    assert f"{allowed}: {why}" in out.stderr and "[A-Za-z0-9]" not in out.stderr
