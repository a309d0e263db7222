"""Token scopes and run patterns, over real HTTP on SQLite and PostgreSQL: every route of the
API's own OpenAPI document, called with a token of every kind, is refused (403 naming the
missing scope, or the token's run patterns) or not, as the table below says; lists leave
out what a token may not see; the CLI makes and lists such tokens; the dashboard works with
a read token and says that Retry and Cancel need submit.

token kind (scopes; runs) -> read routes / reading jobs / submit, cancel, retry / admin routes / /metrics:
- every scope (tokens from before scopes, up's first): yes / every job / every job / yes / yes
(admin routes: webhooks, hook sources, alert rules, deleting a run)
- read: yes / every job / 403 submit / 403 admin / yes
- submit: 403 read / its own jobs, others 403 read / its own jobs, others 403 admin / 403 admin / 403 read
- admin: 403 read / 403 read / 403 submit / yes / 403 read
- read + submit, runs 'team-a/*': its runs, others 403 patterns / jobs of its runs / its runs, its own jobs
  (others 403 admin) / 403 admin / 403 patterns
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from layertrack.service.auth import create_token
from layertrack.service.db import session_scope
from layertrack.service.models import Job
from services import layertrack_exe, wait_until

# what a route needs
OPEN, SIGNED, ANY = "open", "signed", "any token"
#: bucket notifications: the hook source's secret is the bearer, no API token is one
HOOK_SECRET = "hook-source secret"
READ, READ_EVERY_RUN, SUBMIT, ADMIN = "read", "read, every run", "submit", "admin"
JOB_READ, JOB_CHANGE = "read, or submit for its own jobs", "submit: its own jobs, or any with admin"

#: every route of the API and what it needs (a route missing here fails the walk: add it)
TABLE = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("POST", "/v1/hooks/checkpoint"): SIGNED,
    ("POST", "/v1/hooks/object-store"): HOOK_SECRET,
    ("GET", "/v1/meta"): ANY,
    ("GET", "/metrics"): READ_EVERY_RUN,
    ("POST", "/v1/checkpoints"): SUBMIT,
    ("GET", "/v1/jobs/{job_id}"): JOB_READ,
    ("GET", "/v1/jobs"): JOB_READ,
    ("POST", "/v1/jobs/{job_id}/cancel"): JOB_CHANGE,
    ("POST", "/v1/jobs/{job_id}/retry"): JOB_CHANGE,
    ("POST", "/v1/webhooks"): ADMIN,
    ("GET", "/v1/webhooks"): ADMIN,
    ("GET", "/v1/webhooks/{webhook_id}"): ADMIN,
    ("PATCH", "/v1/webhooks/{webhook_id}"): ADMIN,
    ("DELETE", "/v1/webhooks/{webhook_id}"): ADMIN,
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): ADMIN,
    ("GET", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}"): ADMIN,
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): ADMIN,
    ("POST", "/v1/webhooks/{webhook_id}/test"): ADMIN,
    ("POST", "/v1/hook-sources"): ADMIN,
    ("GET", "/v1/hook-sources"): ADMIN,
    ("DELETE", "/v1/hook-sources/{name}"): ADMIN,
    ("POST", "/v1/runs/{run}/alerts"): ADMIN,
    ("DELETE", "/v1/runs/{run}/alerts/{rule_id}"): ADMIN,
    ("GET", "/v1/runs/{run}/alerts"): READ,
    ("GET", "/v1/runs/{run}/alerts/firings"): READ,
    ("GET", "/v1/runs/{run}/trend/plot.{fmt}"): READ,
    ("GET", "/v1/runs/{run}/heatmap/plot.{fmt}"): READ,
    ("GET", "/v1/runs/{run}/profile/plot.{fmt}"): READ,
    ("GET", "/v1/runs"): READ,
    ("GET", "/v1/runs/{run}/scores"): READ,
    ("GET", "/v1/runs/{run}/trend"): READ,
    ("GET", "/v1/runs/{run}/heatmap"): READ,
    ("GET", "/v1/runs/{run}/profile"): READ,
    ("GET", "/v1/runs/{run}/export"): READ,
    ("GET", "/v1/compare"): READ,
    ("GET", "/v1/runs/{run}"): READ,
    ("DELETE", "/v1/runs/{run}"): ADMIN,
}

KINDS = ("full", "read", "submit", "admin", "limited")
PATTERN = "team-a/*"


class World:
    """The service, a token of every kind, two runs (one inside the limited token's pattern,
    one outside) and jobs, a webhook with a delivery, a hook source and an alert rule."""

    def __init__(self, svc, ckpt: Path):
        self.svc, self.ckpt = svc, ckpt
        tag = uuid.uuid4().hex[:6]
        self.run_a, self.run_b = f"team-a/{tag}", f"team-b/{tag}"
        self.tokens = {"full": svc.token}
        self.token_ids: dict[str, int] = {}
        with session_scope(svc.db_url) as s:
            for kind, scopes, runs in (("read", ["read"], ()), ("submit", ["submit"], ()), ("admin", ["admin"], ()),
                                       ("limited", ["read", "submit"], [PATTERN])):
                row, self.tokens[kind] = create_token(s, f"{kind}-{tag}", scopes=scopes, run_patterns=runs)
                self.token_ids[kind] = row.id
        self.jobs: dict[tuple[str, str], str] = {}  # (submitter, run letter) -> job id
        step = iter(range(1, 1000))
        for who, letter in (("full", "a"), ("full", "b"), ("submit", "a"), ("submit", "b"), ("limited", "a")):
            r = self.post(who, "/v1/checkpoints", json=self.checkpoint(letter, next(step)))
            assert r.status_code == 202, r.text
            self.jobs[who, letter] = r.json()["id"]
        self.step = step
        r = self.post("full", "/v1/webhooks", json={"url": "http://8.8.8.8/hook"})
        assert r.status_code == 201, r.text
        self.webhook = r.json()["id"]
        self.delivery = self.post("full", f"/v1/webhooks/{self.webhook}/test").json()["id"]
        self.source = f"src-{tag}"
        assert self.post("full", "/v1/hook-sources", json={"name": self.source}).status_code == 201
        r = self.post("full", f"/v1/runs/{self.run_a}/alerts", json={"metric": "linearity", "kind": "threshold",
                                                                      "above": 0.5})
        assert r.status_code == 201, r.text
        self.rule = r.json()["id"]

    def run(self, letter: str) -> str:
        return self.run_a if letter == "a" else self.run_b

    def checkpoint(self, letter: str, step: int, **more) -> dict:
        return {"run": self.run(letter), "step": step, "uri": str(self.ckpt),
                "config": {"max_tokens": 600, "seq_len": 64}, **more}

    def request(self, kind: str, method: str, url: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[kind]}"} if kind else {}
        return httpx.request(method, self.svc.url + url, headers=headers, timeout=30, **kw)

    def post(self, kind: str, url: str, **kw) -> httpx.Response:
        return self.request(kind, "POST", url, **kw)


@pytest.fixture(scope="module")
def world(api_service, tokenizer):
    from tiny_models import build_checkpoint

    return World(api_service, build_checkpoint(api_service.roots / "scopes" / "step-1", "llama", tokenizer))


# ------------------------------------------------------------------ the table, as expectations
def scope_expected(kind: str, rule: str) -> str | None:
    """The scope a token kind lacks for a route (None: it has what it needs), before runs
    and job ownership are looked at."""
    has = {"full": {"read", "submit", "admin"}, "read": {"read"}, "submit": {"submit"}, "admin": {"admin"},
           "limited": {"read", "submit"}}[kind]
    if rule in (OPEN, SIGNED, ANY, HOOK_SECRET):
        return None
    if rule in (READ, READ_EVERY_RUN):
        return None if "read" in has else "read"
    if rule == JOB_READ:
        return None if has & {"read", "submit"} else "read"
    if rule in (SUBMIT, JOB_CHANGE):
        return None if "submit" in has else "submit"
    return None if "admin" in has else "admin"


def cases(w: World, kind: str, method: str, path: str, rule: str):
    """(url, request body, expected) for one route and token kind; expected is "ok" (neither
    401 nor 403), ("scope", NAME), "runs" (403 naming the token's run patterns) or
    "signature" (401: the signed hook wants its signature, whatever the token) or "hook secret"
    (401: bucket notifications want the hook source's secret, whatever the token)."""
    lacking = scope_expected(kind, rule)
    limited = kind == "limited"

    def expect(outside_runs: bool = False, owner: str | None = None, job_rule: str | None = None):
        if lacking:
            return ("scope", lacking)
        if outside_runs and limited:
            return "runs"
        if job_rule == JOB_READ and kind == "submit" and owner != "submit":
            return ("scope", "read")
        if job_rule == JOB_CHANGE and kind in ("submit", "limited") and owner != kind:
            return ("scope", "admin")
        return "ok"

    body = None
    if rule == SIGNED:  # the signature is the credential: a bearer token, of any scope, changes nothing
        yield path, {}, "signature"
        return
    if rule == HOOK_SECRET:  # the source's secret is the credential: an API token, of any scope, is not it
        yield f"{path}?source={w.source}", {}, "hook secret"
        return
    if path == "/v1/checkpoints":
        for letter in "ab":
            yield path, w.checkpoint(letter, next(w.step)), expect(outside_runs=letter == "b")
        yield path, w.checkpoint("a", next(w.step), parent_run=w.run_b, parent_step=1), expect(outside_runs=True)
        return
    if path == "/metrics":
        yield path, None, ("scope", lacking) if lacking else ("runs" if limited else "ok")
        return
    if path == "/v1/jobs":
        yield path, None, expect()
        yield f"{path}?run={w.run_b}", None, expect(outside_runs=True)
        return
    if path == "/v1/compare":
        yield f"{path}?runs={w.run_a}", None, expect()
        yield f"{path}?runs={w.run_a},{w.run_b}", None, expect(outside_runs=True)
        return
    if "{job_id}" in path:
        for (owner, letter), job_id in w.jobs.items():
            yield path.replace("{job_id}", job_id), None, expect(letter == "b", owner, rule)
        return
    if method in ("POST", "PATCH"):
        body = {
            "/v1/webhooks": {"url": "http://8.8.8.8/hook"},
            "/v1/webhooks/{webhook_id}": {"active": True},
            "/v1/hook-sources": {"name": f"walk-{uuid.uuid4().hex[:8]}"},
            "/v1/runs/{run}/alerts": {"metric": "linearity", "kind": "threshold", "above": 0.5},
        }.get(path)
    if (method, path) == ("DELETE", "/v1/runs/{run}"):  # a dry run: the walk's runs and jobs must stay
        for letter in "ab":
            yield f"/v1/runs/{w.run(letter)}?dry_run=true", None, expect(outside_runs=letter == "b")
        return
    url = (path.replace("{webhook_id}", str(w.webhook)).replace("{delivery_id}", w.delivery)
           .replace("{name}", w.source).replace("{rule_id}", str(w.rule)).replace("{fmt}", "svg"))
    if "{run}" in url:
        for letter in "ab":
            yield url.replace("{run}", w.run(letter)), body, expect(outside_runs=letter == "b")
        return
    yield url, body, expect()


def test_every_route_with_every_kind_of_token(world):
    paths = httpx.get(world.svc.url + "/openapi.json").json()["paths"]
    routes = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    assert routes == set(TABLE), f"routes missing from the table: {routes - set(TABLE)}; gone: {set(TABLE) - routes}"
    failures, calls = [], 0
    for kind in KINDS:  # a route that deletes (a webhook, a rule) leaves the later calls a 404: not a 403
        for method, path in sorted(routes):
            for url, body, expected in cases(world, kind, method, path, TABLE[method, path]):
                r = world.request(kind, method, url, json=body)
                calls += 1
                detail = r.json().get("detail", "") if "json" in r.headers.get("content-type", "") and isinstance(
                    r.json(), dict) else ""
                if expected == "ok":
                    ok = r.status_code not in (401, 403)
                elif expected == "signature":
                    ok = r.status_code == 401 and "sign the request" in detail
                elif expected == "hook secret":
                    ok = r.status_code == 401 and "secret of an active hook source" in detail
                elif expected == "runs":
                    ok = r.status_code == 403 and f"limited to the runs matching {PATTERN}" in detail
                else:
                    ok = r.status_code == 403 and f"lacks the '{expected[1]}' scope" in detail
                if not ok:
                    failures.append(f"{kind} {method} {url}: expected {expected}, got {r.status_code} {detail[:200]}")
    assert not failures, f"{len(failures)} of {calls} calls:\n" + "\n".join(failures)
    assert calls > 200


def test_forbidden_answers_are_problems_that_name_what_is_missing(world):
    r = world.request("read", "POST", f"/v1/jobs/{world.jobs['full', 'a']}/cancel")
    assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["title"] == "Forbidden"
    assert "lacks the 'submit' scope" in r.json()["detail"] and "--scope submit" in r.json()["detail"]
    r = world.request("limited", "GET", f"/v1/runs/{world.run_b}/trend")
    assert r.status_code == 403
    assert r.json()["detail"] == (f"token 'limited-{world.run_a.split('/')[1]}' (scopes read, submit; runs {PATTERN}) "
                                  f"is limited to the runs matching {PATTERN}; run '{world.run_b}' is not one of them")


def test_lists_leave_out_what_a_token_may_not_see(world):
    runs = [r["name"] for r in world.request("limited", "GET", "/v1/runs").json()]
    assert world.run_a in runs and all(n.startswith("team-a/") for n in runs), runs
    assert world.run_b in [r["name"] for r in world.request("read", "GET", "/v1/runs").json()]

    jobs = world.request("limited", "GET", "/v1/jobs?limit=1000").json()
    assert {j["run"] for j in jobs} == {world.run_a}
    assert {world.jobs["full", "a"], world.jobs["submit", "a"], world.jobs["limited", "a"]} <= {j["id"] for j in jobs}

    own = world.request("submit", "GET", "/v1/jobs?limit=1000").json()
    assert {world.jobs["submit", "a"], world.jobs["submit", "b"]} <= {j["id"] for j in own}
    with session_scope(world.svc.db_url) as s:  # every job listed is one this token submitted
        assert {s.get(Job, j["id"]).token_id for j in own} == {world.token_ids["submit"]}
        assert s.get(Job, world.jobs["full", "a"]).token_id is not None
    assert world.request("submit", "GET", f"/v1/jobs?run={world.run_a}").status_code == 200

    # a fine-tune inside the pattern whose parent is outside: the parent is not shown
    ft = f"team-a/ft-{uuid.uuid4().hex[:4]}"
    r = world.post("full", "/v1/checkpoints", json={**world.checkpoint("a", 1), "run": ft, "parent_run": world.run_b,
                                                    "parent_step": 1})
    assert r.status_code == 202, r.text
    assert world.request("read", "GET", f"/v1/runs/{ft}").json()["parent_run"] == world.run_b
    assert world.request("limited", "GET", f"/v1/runs/{ft}").json()["parent_run"] is None
    compared = world.request("limited", "GET", f"/v1/compare?runs={ft}").json()["runs"]
    assert compared[0]["parent_run"] is None


def test_meta_tells_the_token_what_it_may_do(world):
    assert world.request("limited", "GET", "/v1/meta").json()["token"] == {
        "name": f"limited-{world.run_a.split('/')[1]}", "scopes": ["read", "submit"], "runs": [PATTERN]}
    assert world.request("full", "GET", "/v1/meta").json()["token"]["scopes"] == ["read", "submit", "admin"]


# ------------------------------------------------------------------ the CLI
def test_cli_creates_and_lists_scoped_tokens(tmp_path):
    env = dict(os.environ, LAYERTRACK_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}", LAYERTRACK_DATA_DIR=str(tmp_path))

    def cli(*args):
        return subprocess.run([layertrack_exe(), *args], env=env, capture_output=True, text=True, timeout=120)

    assert cli("migrate").returncode == 0
    out = cli("token", "create", "trainer-a", "--scope", "submit", "--runs", "team-a/*", "--runs", "team-c/x,shared")
    assert out.returncode == 0 and out.stdout.startswith("token 1 (trainer-a): lt_"), out.stderr
    assert "scopes submit; runs team-a/*,team-c/x,shared" in out.stderr
    out = cli("token", "create", "dash", "--scope", "read,submit", "--scope", "read")
    assert "scopes read, submit; runs every run" in out.stderr
    assert cli("token", "create", "everything").returncode == 0
    listed = cli("token", "list").stdout.splitlines()
    assert listed[0].split() == ["id", "name", "prefix", "scopes", "runs", "created", "state"]
    assert listed[1].split()[3:5] == ["submit", "team-a/*,team-c/x,shared"]
    assert listed[2].split()[3:5] == ["read,submit", "*"]
    assert listed[3].split()[3:5] == ["read,submit,admin", "*"]
    for bad, message in ((("--scope", "write"), "unknown scope 'write'; the scopes are read, submit, admin"),
                         (("--scope", "admin", "--runs", "x/*"), "an admin token cannot be limited to runs")):
        out = cli("token", "create", "bad", *bad)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert len(cli("token", "list").stdout.splitlines()) == 4  # nothing made by the refused ones


# ------------------------------------------------------------------ the dashboard
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_dashboard_with_a_read_token_and_retry_cancel_need_submit(world):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium (apt-get install chromium; .ci/run installs it)")
    queued = world.jobs["full", "a"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            for kind in ("read", "limited"):
                ctx = browser.new_context(viewport={"width": 1366, "height": 900})
                page = ctx.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e, errors=errors: errors.append(f"page error: {e}"))
                page.on("console", lambda m, errors=errors: m.type == "error" and errors.append(m.text))
                page.goto(world.svc.url + "/")
                page.fill("#token-input", world.tokens[kind])
                page.click("button[type=submit]")
                page.wait_for_selector("#runs tbody tr")
                page.goto(world.svc.url + "/jobs")
                row = f"#jobs tr[data-job='{queued}']"
                page.wait_for_selector(f"{row}[data-status='queued']")
                button = page.locator(f"{row} button[data-action=cancel]")
                if kind == "read":  # the page works; Cancel is there, disabled, saying why
                    assert button.is_disabled()
                    assert "needs a token with the submit scope; this one has: read" in button.get_attribute("title")
                    assert errors == [], errors
                else:  # submit, but another token's job: the refusal is shown, and stays
                    assert button.is_enabled()
                    button.click()
                    wait_until(lambda page=page: page.inner_text("#jobs-error"), 20, what="the refusal to be shown")
                    shown = page.inner_text("#jobs-error")
                    assert "cancel refused:" in shown and "lacks the 'admin' scope" in shown, shown
                    assert all("403" in e for e in errors), errors  # the browser logs the refused request
                    with world.svc.http() as h:
                        assert h.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
                ctx.close()
        finally:
            browser.close()


def test_the_client_with_a_submit_token_reads_its_own_jobs(world):
    """What a training job's token does: submit, then poll its own job."""
    from layertrack.service.client import ApiError, Client

    with Client(world.svc.url, world.tokens["submit"]) as c:
        job = c.submit(**world.checkpoint("b", next(world.step)))
        assert c.job(job["id"])["id"] == job["id"]
        with pytest.raises(ApiError) as e:
            c.job(world.jobs["full", "a"])
        assert e.value.status == 403 and "lacks the 'read' scope" in e.value.detail
        with pytest.raises(ApiError) as e:
            c.runs()
        assert e.value.status == 403


def test_dashboard_delete_waits_for_queued_jobs_and_shows_the_refusal(world):
    """An admin token on a run with queued jobs: the dialog says to cancel them first and
    offers no Delete; the API's refusal is what a forced click shows."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium (apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(world.svc.url + "/")
            page.fill("#token-input", world.tokens["full"])
            page.click("button[type=submit]")
            page.wait_for_selector("#runs tbody tr")
            page.goto(f"{world.svc.url}/runs/{world.run_a}")
            page.click("#delete-run")
            page.wait_for_function("() => document.getElementById('delete-what').textContent.includes('queued')")
            with world.svc.http() as h:
                active = len(h.delete(f"/v1/runs/{world.run_a}", params={"dry_run": "true"}).json()["active_jobs"])
            assert active >= 3
            assert page.inner_text("#delete-what").endswith(
                f"{active} jobs are still queued or running: cancel them on the Jobs page first.")
            assert page.locator("#delete-confirm").is_disabled()
            assert errors == [], errors
            page.evaluate("document.getElementById('delete-confirm').disabled = false")  # as if a job finished
            page.click("#delete-confirm")
            page.wait_for_function("() => document.getElementById('run-error').textContent !== ''")
            shown = page.inner_text("#run-error")
            assert shown.startswith(f"delete refused: run '{world.run_a}' has {active} queued or running job(s)"), shown
            assert all("409" in e for e in errors) and errors, errors  # the browser logs the refused request
            with world.svc.http() as h:
                assert h.get(f"/v1/runs/{world.run_a}").status_code == 200
        finally:
            browser.close()
