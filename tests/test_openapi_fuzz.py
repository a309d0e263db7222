"""Property-based test over the live OpenAPI document: schemathesis (its ``run`` command, as a
developer runs it) generates requests for every operation the API server documents, from the
schema (the coverage phase: boundary values, missing, wrong-typed and out-of-range values,
methods the path does not take) and at random (the fuzzing phase: valid and invalid data,
NUL bytes included), once without a token and once with one, against the real API server on
PostgreSQL (where NUL bytes and integer overflow fail) and on SQLite. Every answer is
checked: no 5xx, a documented status code, content type, headers and body schema, invalid
data refused, missing required headers refused, 405 with ``Allow`` for other methods, no
data without the token.

Path parameters are drawn half of the time from what is stored (a run with scores, its jobs,
a webhook with a delivery, a hook source, an alert rule), so that the routes are reached
beyond their 404s. Generation is derandomized (``deterministic``), and answers do not feed
later requests (no error feedback, no ids taken from responses): the same requests every
run. The figures of each run are printed (``pytest -s``).

Not checked: ``positive_data_acceptance`` (that every schema-valid request is accepted).
The API refuses some schema-valid requests by rules a JSON schema does not express: a
checkpoint outside the roots, a sigma rule without ``k``, a webhook URL that is not
http(s), a secret that is not ``whsec_`` base64; they are 422 with a detail saying so."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from services import Service, create_pg_database, drop_pg_database
from test_http_conformance import scored_run

#: examples per operation in the fuzzing phase, each of positive and negative data
MAX_EXAMPLES = 25
MIN_CASES = 500
RUN = "org/fuzz"


def schemathesis_exe() -> str:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return exe


@pytest.fixture(scope="module")
def fuzzed(request, tmp_path_factory, redis_server):
    """An API server (no worker) with something stored for every kind of path parameter; the
    names and ids of what is stored. Webhook targets on 127.0.0.1 are allowed (nothing is
    delivered: no worker runs)."""
    from layertrack.service import jobs, submissions
    from layertrack.service.db import session_scope
    from layertrack.workers.vocabulary import Phase

    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    roots = tmp / "ckpts"
    roots.mkdir()
    pg = create_pg_database() if request.param == "postgresql" else None
    svc = Service(tmp=tmp, db_url=pg or f"sqlite:///{tmp / 'lt.db'}",
                  broker_url=redis_server.new_url() if pg else "filesystem://", roots=roots,
                  extra_env={"LAYERTRACK_SWEEP_INTERVAL_S": "0", "LAYERTRACK_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
    try:
        svc.migrate_and_token()
        svc.start_api()
        stored = {"job_id": scored_run(svc.db_url, RUN, (10, 20, 30))}
        for step, fail in ((40, True), (50, False)):  # a failed job (retry) and a queued one (cancel)
            sub = submissions.Submission(run=RUN, step=step, uri=f"/synthetic/{step}", fingerprint=f"syn{step}",
                                         phase=Phase.pretrain, parent_run=None, parent_step=None, probe="default",
                                         config={})
            with session_scope(svc.db_url) as s:
                job, _ = submissions.submit(s, sub)
                s.flush()
                stored["job_id"].append(job.id)
            if fail:
                assert jobs.claim(svc.db_url, job.id, "test") is not None
                assert jobs.fail(svc.db_url, job.id, "test", "synthetic", "failed on purpose")
        with svc.http() as h:
            rule = h.post(f"/v1/runs/{RUN}/alerts", json={"metric": "linearity", "kind": "threshold", "above": 0.5})
            hook = h.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/layertrack-fuzz"})
            source = h.post("/v1/hook-sources", json={"name": "fuzz-source"})
            assert rule.status_code == hook.status_code == source.status_code == 201, (rule.text, hook.text)
            delivery = h.post(f"/v1/webhooks/{hook.json()['id']}/test")
            assert delivery.status_code == 202, delivery.text
        stored |= {"rule_id": [rule.json()["id"]], "webhook_id": [hook.json()["id"]],
                   "delivery_id": [delivery.json()["id"]], "name": ["fuzz-source"]}
        svc.backend, svc.stored = request.param, stored
        yield svc
    finally:
        svc.stop()
        if pg:
            drop_pg_database(pg)


#: values the attacks of issue 11 used, drawn now and then for the parameters that reached
#: PostgreSQL or the file system with them: NUL bytes, integers beyond their column, a path
#: component longer than a file name may be
NUL_RUN, NUL_TEXT, TOO_LONG = "ab\x00cd", "\u00fc\x00", "x" * 300
HOSTILE = {
    "query.name": ["fuzz", "a\x00b"], "query.runs": [RUN, f"{RUN},{NUL_RUN}", NUL_RUN],
    "query.to_step": [20, 2**63], "query.from_step": [10, 2**63], "query.layer": [1, 2**31],
    "body.parent_run": [RUN, NUL_TEXT], "body.parent_step": [10, 2**63], "body.layer": [1, 2**31],
    "body.uri": ["/{roots}/" + TOO_LONG + "/ckpt", "/{roots}/org/fuzz"],
}


def config(stored: dict[str, list], roots: Path) -> str:
    """schemathesis.toml: generation, the stored values path parameters are drawn from (half
    of the time), and the attacks' values (a fifth of the time)."""
    lines = ["[generation]", "deterministic = true", 'database = "none"', "",
             "[phases.examples]", "enabled = false", "[phases.stateful]", "enabled = false",
             "[phases.fuzzing.error-feedback]", "enabled = false",
             "[phases.fuzzing.extra-data-sources]", "responses = false",
             "[phases.coverage.extra-data-sources]", "responses = false", ""]
    values = {**stored, "run": [RUN, f"{RUN}-none", NUL_RUN], "fmt": ["png", "svg"],
              "webhook_id": [*stored["webhook_id"], 2**31]}
    hostile = {key: [v.replace("/{roots}", str(roots)) if isinstance(v, str) else v for v in vals]
               for key, vals in HOSTILE.items()}
    for name, vals in [*values.items(), *hostile.items()]:
        lines += [f'[dictionaries."{name}"]', f"values = {json.dumps(vals)}"]
    lines += ["", "[parameters]"]
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}' for name in values]
    lines += ['"query.run" = { dictionary = "run", probability = 0.5 }']
    lines += [f'"{key}" = {{ dictionary = "{key}", probability = 0.2 }}' for key in hostile]
    return "\n".join(lines) + "\n"


@dataclass
class Outcome:
    generated: int
    responses: collections.Counter
    failures: list
    errors: list
    tested: int
    operations: int
    seconds: float
    output: str

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.responses.items() if status and status >= 500)


def run_schemathesis(svc, tmp: Path, *, token: str | None) -> Outcome:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "schemathesis.toml").write_text(config(svc.stored, svc.roots))
    report, events = tmp / "report.json", tmp / "events.ndjson"
    cmd = [schemathesis_exe(), "--config-file", str(tmp / "schemathesis.toml"), "run", f"{svc.url}/openapi.json",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--phases", "coverage,fuzzing",
           "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--continue-on-failure", "--no-color",
           "--request-timeout", "30", "--report", "json,ndjson", "--report-json-path", str(report),
           "--report-ndjson-path", str(events)]
    if token:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert report.exists(), f"schemathesis wrote no report (exit {proc.returncode}):\n{output[-4000:]}"
    data = json.loads(report.read_text())
    statuses: collections.Counter = collections.Counter()
    for line in events.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            for interaction in (event["ScenarioFinished"]["recorder"].get("interactions") or {}).values():
                response = interaction.get("response")
                statuses[response["status_code"] if response else None] += 1
    return Outcome(generated=data["test_cases"]["generated"], responses=statuses, failures=data["failures"],
                   errors=data["errors"], tested=data["operations"]["tested"], operations=data["operations"]["total"],
                   seconds=seconds, output=output)


def failure_text(output: str) -> str:
    """The FAILURES section of schemathesis' output (what failed, with a curl to replay it)."""
    start = output.find("FAILURES")
    return output[start:start + 12000] if start >= 0 else output[-6000:]


# With a token on both databases; without one (every route but the public ones answers 401
# before it reaches the database) on one.
@pytest.mark.parametrize(("fuzzed", "with_token"), [("postgresql", True), ("sqlite", True), ("sqlite", False)],
                         ids=["postgresql-token", "sqlite-token", "sqlite-no-token"], indirect=["fuzzed"])
def test_every_generated_request_gets_a_documented_answer_and_no_5xx(fuzzed, with_token, tmp_path):
    doc = httpx.get(fuzzed.url + "/openapi.json").json()
    n_operations = sum(len(ops) for ops in doc["paths"].values())
    out = run_schemathesis(fuzzed, tmp_path, token=fuzzed.token if with_token else None)
    print(f"\nschemathesis [{fuzzed.backend}, {'token' if with_token else 'no token'}]: {out.generated} cases "
          f"generated over {out.tested}/{out.operations} operations, {sum(out.responses.values())} requests, "
          f"{out.server_errors} 5xx, {len(out.failures)} kinds of failure, {out.seconds:.1f} s; "
          f"status codes {dict(sorted(out.responses.items(), key=lambda kv: kv[0] or 0))}")
    assert out.operations == out.tested == n_operations, out.output[-3000:]
    assert not out.errors, out.errors
    assert out.server_errors == 0 and not out.failures, failure_text(out.output)
    assert out.generated >= MIN_CASES, out.generated
    if with_token:  # the stored things were reached, not only their 404s
        assert out.responses[200] >= 50 and out.responses[404] > 0, out.responses
    else:
        assert set(out.responses) <= {200, 401, 405, 409, 413, 422, 400}, out.responses
