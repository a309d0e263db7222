"""Bad input over real HTTP, on SQLite and on PostgreSQL: every integer beyond its database
column, every string PostgreSQL cannot store, loosely typed numbers, non-finite floats,
over-long path names, and checkpoints that try to make the API read outside the roots or
read a huge file, get a 4xx problem that names the field (and the allowed range, or the
error code) and change nothing. ``ATTACKS`` lists every input."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from layertrack.service.db import session_scope
from layertrack.service.models import Checkpoint, Job, Run, Score
from layertrack.workers.checkpoint import MAX_JSON_BYTES
from sqlalchemy import func, select

INT32 = 2**31 - 1
STEP_MAX = 2**62
BIG = 2**63  # 9223372036854775808: one past PostgreSQL's bigint
PROBLEM = "application/problem+json"
#: the answer to an integer out of its column's range names the range
INT32_RANGE = f"(allowed: 1 to {INT32})"
LAYER_RANGE = f"(allowed: 0 to {INT32})"
STEP_RANGE = f"(allowed: 0 to {STEP_MAX})"
NUL = "must not contain a NUL character"
DIGITS = "Input should be a valid integer, written in digits"
JSON_INT = "Input should be a valid integer: a JSON integer such as 7"
FINITE = "Input should be a finite number"

#: (method, path, body, what the problem's detail must hold). ``{run}``: a run that exists.
#: A body given as ``bytes`` is sent as it is (JSON that json.dumps would not write).
ATTACKS: list[tuple[str, str, object, list[str]]] = [
    # ---- integers beyond the database column (Integer: 2**31 - 1, BigInteger steps)
    ("GET", "/v1/webhooks/2147483648", None, ["path.webhook_id", "less than or equal to 2147483647", INT32_RANGE]),
    ("PATCH", "/v1/webhooks/2147483648", {"active": False}, ["path.webhook_id", INT32_RANGE]),
    ("DELETE", "/v1/webhooks/99999999999999999999", None, ["path.webhook_id", INT32_RANGE]),
    ("GET", "/v1/webhooks/-1/deliveries", None, ["path.webhook_id", "greater than or equal to 1", INT32_RANGE]),
    ("POST", "/v1/webhooks/2147483648/test", None, ["path.webhook_id", INT32_RANGE]),
    ("GET", "/v1/webhooks/2147483648/deliveries/x", None, ["path.webhook_id", INT32_RANGE]),
    ("POST", "/v1/webhooks/2147483648/deliveries/x/redeliver", None, ["path.webhook_id", INT32_RANGE]),
    ("DELETE", "/v1/runs/{run}/alerts/2147483648", None, ["path.rule_id", INT32_RANGE]),
    ("GET", "/v1/runs/{run}/trend?to_step=9223372036854775808", None, ["query.to_step", STEP_RANGE]),
    ("GET", "/v1/runs/{run}/trend?from_step=-1", None, ["query.from_step", STEP_RANGE]),
    ("GET", "/v1/runs/{run}/scores?layer=2147483648", None, ["query.layer", LAYER_RANGE]),
    ("GET", "/v1/runs/{run}/scores?from_step=9223372036854775808", None, ["query.from_step", STEP_RANGE]),
    ("GET", "/v1/runs/{run}/profile?step=1&step=9223372036854775808", None, ["query.step.1", STEP_RANGE]),
    ("GET", "/v1/runs/{run}/profile/plot.svg?step=9223372036854775808", None, ["query.step.0", STEP_RANGE]),
    ("GET", "/v1/runs/{run}/scores?max_points=" + "9" * 400, None,
     ["query.max_points", "less than or equal to 100000 (allowed: 2 to 100000)"]),
    ("POST", "/v1/checkpoints", {"parent_step": BIG}, ["body.parent_step", STEP_RANGE]),
    ("POST", "/v1/checkpoints", {"step": BIG}, ["body.step", STEP_RANGE]),
    ("POST", "/v1/checkpoints", {"step": -1}, ["body.step", STEP_RANGE]),
    ("POST", "/v1/checkpoints", {"config": {"max_tokens": BIG}},
     ["body.config.max_tokens", "(allowed: 1 to 10000000)"]),
    ("POST", "/v1/runs/{run}/alerts", {"metric": "linearity", "kind": "threshold", "above": 0.5, "layer": 2**31},
     ["body.layer", LAYER_RANGE]),
    ("POST", "/v1/runs/{run}/alerts", {"metric": "linearity", "kind": "sigma", "k": 2, "window": BIG},
     ["body.window", "(allowed: 2 to 1000)"]),
    # ---- NUL characters (and a lone surrogate) in strings that would reach the database
    ("GET", "/v1/runs?name=a%00b", None, ["query.name", NUL]),
    ("GET", "/v1/runs/ab%00cd", None, ["path.run", NUL]),
    ("GET", "/v1/runs/ab%00cd/trend", None, ["path.run", NUL]),
    ("GET", "/v1/runs/ab%00cd/alerts", None, ["path.run", NUL]),
    ("GET", "/v1/runs/ab%00cd/trend/plot.png", None, ["path.run", NUL]),
    ("GET", "/v1/jobs?run=a%00b", None, ["query.run", NUL]),
    ("GET", "/v1/jobs/ab%00cd", None, ["path.job_id", NUL]),
    ("POST", "/v1/jobs/ab%00cd/cancel", None, ["path.job_id", NUL]),
    ("GET", "/v1/compare?runs=a%00b", None, ["query.runs", NUL]),
    ("GET", "/v1/webhooks/1/deliveries?event=a%00b", None, ["query.event", NUL]),
    ("GET", "/v1/webhooks/1/deliveries/a%00b", None, ["path.delivery_id", NUL]),
    ("DELETE", "/v1/hook-sources/a%00b", None, ["path.name", NUL]),
    ("POST", "/v1/checkpoints", {"parent_run": "ü\u0000"}, ["body.parent_run", NUL]),
    ("POST", "/v1/checkpoints", {"probe": "default\u0000"}, ["body.probe", NUL]),
    ("POST", "/v1/checkpoints", {"uri": "{root}/x\u0000y"}, ["body.uri", NUL]),
    ("POST", "/v1/checkpoints", b'{"run": "r", "step": 1, "uri": "/x", "parent_run": "\\ud800"}',
     ["body.parent_run", "lone surrogate"]),
    ("POST", "/v1/webhooks", {"url": "https://example.com/\u0000"}, ["body.url", NUL]),
    ("POST", "/v1/webhooks", {"url": "https://example.com/h", "run": "a\u0000"}, ["body.run", NUL]),
    ("POST", "/v1/webhooks", {"url": "https://example.com/h", "description": "\u0000"}, ["body.description", NUL]),
    ("POST", "/v1/webhooks", {"url": "https://example.com/h", "secret": "whsec_\u0000"}, ["body.secret", NUL]),
    ("PATCH", "/v1/webhooks/1", {"description": "x\u0000"}, ["body.description", NUL]),
    ("POST", "/v1/hook-sources", {"name": "src", "secret": "\u0000"}, ["body.secret", NUL]),
    ("POST", "/v1/runs/{run}/alerts", {"metric": "linearity", "kind": "sigma", "k": 2, "description": "\u0000"},
     ["body.description", NUL]),
    # ---- strictness: integers given as strings, booleans or decimals; non-finite floats
    ("POST", "/v1/checkpoints", {"step": "7"}, ["body.step", JSON_INT, '"7"']),
    ("POST", "/v1/checkpoints", {"step": True}, ["body.step", JSON_INT, "true"]),
    ("POST", "/v1/checkpoints", {"step": 7.0}, ["body.step", JSON_INT]),
    ("POST", "/v1/checkpoints", {"parent_step": "3"}, ["body.parent_step", JSON_INT]),
    ("POST", "/v1/checkpoints", {"config": {"seq_len": "64"}}, ["body.config.seq_len", JSON_INT]),
    ("POST", "/v1/checkpoints", {"config": {"replaceability": "yes"}}, ["body.config.replaceability"]),
    ("GET", "/v1/runs/{run}/profile?step=0.0", None, ["query.step.0", DIGITS]),
    ("GET", "/v1/runs/{run}/trend?to_step=1e3", None, ["query.to_step", DIGITS]),
    ("GET", "/v1/runs/{run}/scores?layer=1.0", None, ["query.layer", DIGITS]),
    ("GET", "/v1/jobs?limit=10.5", None, ["query.limit", DIGITS]),
    ("POST", "/v1/runs/{run}/alerts", b'{"metric": "linearity", "kind": "threshold", "above": NaN}',
     ["body.above", FINITE]),
    ("POST", "/v1/runs/{run}/alerts", b'{"metric": "linearity", "kind": "threshold", "below": -Infinity}',
     ["body.below", FINITE]),
    ("POST", "/v1/runs/{run}/alerts", b'{"metric": "linearity", "kind": "threshold", "above": 1e400}',
     ["body.above", FINITE]),
    ("POST", "/v1/runs/{run}/alerts", b'{"metric": "linearity", "kind": "sigma", "k": Infinity}',
     ["body.k", FINITE]),
    ("POST", "/v1/runs/{run}/alerts", {"metric": "linearity", "kind": "threshold", "above": True},
     ["body.above"]),
    ("POST", "/v1/runs/{run}/alerts", {"metric": "linearity", "kind": "sigma", "k": 2, "layer": "1"},
     ["body.layer", JSON_INT]),
    # ---- checkpoint URIs the file system cannot take
    ("POST", "/v1/checkpoints", {"uri": "{root}/" + "a" * 300}, ["path_too_long", "longer than the file system"]),
    ("POST", "/v1/checkpoints", {"uri": "{root}/" + "é" * 128 + "/step-1"}, ["path_too_long"]),  # 256 bytes
    ("POST", "/v1/checkpoints", {"uri": "~no-such-user-lt11/ckpt"}, ["invalid_uri", "no such user"]),
    ("POST", "/v1/checkpoints", {"uri": "file://[::1/ckpt"}, ["invalid_uri", "cannot parse"]),
]


def counts(svc) -> tuple[int, int, int, int]:
    with session_scope(svc.db_url) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Run, Checkpoint, Job, Score))


@pytest.fixture(scope="module")
def ckpt(api_service, tokenizer):
    from tiny_models import build_checkpoint

    return build_checkpoint(api_service.roots / "bad-input" / "step-1", "llama", tokenizer)


@pytest.fixture(scope="module")
def run(api_service, ckpt):
    """A run that exists (so that its routes get as far as the database)."""
    name = f"bad-{uuid.uuid4().hex[:8]}"
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json=body(ckpt, run=name))
    assert r.status_code == 202, r.text
    return name


def body(ckpt, **over) -> dict:
    b = {"run": f"run-{uuid.uuid4().hex[:8]}", "step": 10, "uri": str(ckpt),
         "config": {"max_tokens": 600, "seq_len": 64}}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            b[k] = {**b[k], **v}
        else:
            b[k] = v
    return b


def assert_problem(r, status: int, needles: list[str]) -> dict:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    problem = r.json()
    for needle in needles:
        assert needle in problem["detail"] or needle == problem.get("code"), (needle, problem)
    return problem


@pytest.mark.parametrize(("method", "path", "payload", "needles"), ATTACKS,
                         ids=[f"{m} {p[:60]} {str(b)[:50]}" for m, p, b, _ in ATTACKS])
def test_bad_input_is_a_4xx_that_names_the_field(api_service, ckpt, run, method, path, payload, needles):
    root = str(api_service.roots)
    url = path.replace("{run}", run)
    kwargs: dict = {}
    if isinstance(payload, bytes):
        kwargs = {"content": payload.replace(b"{run}", run.encode()), "headers": {"Content-Type": "application/json"}}
    elif isinstance(payload, dict):
        data = body(ckpt, **payload) if url == "/v1/checkpoints" else payload
        kwargs = {"content": json.dumps(data).replace("{root}", root).encode(),
                  "headers": {"Content-Type": "application/json"}}
    before = counts(api_service)
    with api_service.http() as h:
        r = h.request(method, url, **kwargs)
    assert_problem(r, 422, needles)
    assert counts(api_service) == before


def test_the_signed_hook_route_refuses_a_nul_in_its_source(api_service):
    """A signed-looking request (the three Standard Webhooks headers, a current timestamp)
    gets as far as looking its source up: a NUL in ``source`` is refused before that."""
    headers = {"Content-Type": "application/json", "webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())),
               "webhook-signature": "v1,AAAA"}
    with httpx.Client(base_url=api_service.url, timeout=30) as h:
        r = h.post("/v1/hooks/checkpoint?source=a%00b", content=b"{}", headers=headers)
    assert_problem(r, 422, ["query.source", NUL])


def test_integers_at_the_edge_of_their_column_are_accepted(api_service, ckpt, run):
    """The bounds are the columns' own: the largest values still work (no 500 either)."""
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json=body(ckpt, step=STEP_MAX, parent_run=run, parent_step=STEP_MAX))
        assert r.status_code == 202, r.text
        child = r.json()["run"]
        assert h.get(f"/v1/runs/{child}").json()["parent_step"] == STEP_MAX
        r = h.get(f"/v1/runs/{run}/trend", params={"from_step": 0, "to_step": STEP_MAX})
        assert r.status_code == 200, r.text
        r = h.get(f"/v1/runs/{run}/scores", params={"layer": INT32})
        assert r.status_code == 200 and r.json()["series"] == [], r.text
        r = h.get(f"/v1/runs/{run}/profile", params={"step": [0, STEP_MAX]})
        assert r.status_code == 200, r.text
        assert h.get(f"/v1/webhooks/{INT32}").status_code == 404
        assert h.delete(f"/v1/runs/{run}/alerts/{INT32}").status_code == 404
        r = h.post(f"/v1/runs/{run}/alerts", json={"metric": "linearity", "kind": "threshold", "above": 1e308,
                                                  "below": -1e308, "layer": INT32})
        assert r.status_code == 201, r.text
        assert r.json()["layer"] == INT32 and r.json()["above"] == 1e308


def test_the_openapi_document_gives_the_bounds(api_service):
    with api_service.http() as h:
        doc = h.get("/openapi.json").json()
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/webhooks/{webhook_id}"]["get"]["parameters"]}
    assert params["webhook_id"]["maximum"] == INT32 and params["webhook_id"]["minimum"] == 1
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/runs/{run}/scores"]["get"]["parameters"]}
    assert params["layer"]["anyOf"][0]["maximum"] == INT32
    assert params["to_step"]["anyOf"][0]["maximum"] == STEP_MAX
    step = doc["components"]["schemas"]["CheckpointIn"]["properties"]["step"]
    assert (step["minimum"], step["maximum"]) == (0, STEP_MAX)
    layer = doc["components"]["schemas"]["AlertRuleIn"]["properties"]["layer"]["anyOf"][0]
    assert layer["maximum"] == INT32


# ------------------------------------------------------------------ checkpoints the API must not read
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def submit_refused(api_service, ckpt, path: Path, code: str, *needles: str) -> dict:
    before = counts(api_service)
    with api_service.http() as h:
        r = h.post("/v1/checkpoints", json=body(ckpt, uri=str(path)))
    problem = assert_problem(r, 422, list(needles))
    assert problem["code"] == code, problem
    assert counts(api_service) == before
    return problem


def test_a_symlinked_weight_file_outside_the_roots_is_refused(api_service, ckpt, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"  # tmp_path is not under the service's root
    outside.write_bytes((ckpt / "model.safetensors").read_bytes())
    linked = _copy(ckpt, api_service.roots / f"link-{uuid.uuid4().hex[:6]}")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside)
    submit_refused(api_service, ckpt, linked, "checkpoint_outside_roots", "'model.safetensors'", str(outside),
                   "outside the allowed checkpoint roots")
    # the same file linked from inside the root (a Hugging Face cache's blobs/) is fine
    blob = api_service.roots / f"blobs-{uuid.uuid4().hex[:6]}"
    blob.mkdir()
    (blob / "weights").write_bytes(outside.read_bytes())
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(blob / "weights")
    with api_service.http() as h:
        assert h.post("/v1/checkpoints", json=body(ckpt, uri=str(linked))).status_code == 202


def test_a_symlinked_config_outside_the_roots_is_refused(api_service, ckpt, tmp_path):
    outside = tmp_path / "config.json"
    outside.write_bytes((ckpt / "config.json").read_bytes())
    linked = _copy(ckpt, api_service.roots / f"cfglink-{uuid.uuid4().hex[:6]}")
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(outside)
    submit_refused(api_service, ckpt, linked, "checkpoint_outside_roots", "'config.json'")


def api_peak_rss(api_service) -> int:
    for line in Path(f"/proc/{api_service.api.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_huge_config_is_refused_without_being_read(api_service, ckpt):
    big = _copy(ckpt, api_service.roots / f"bigcfg-{uuid.uuid4().hex[:6]}")
    cfg = big / "config.json"
    with open(cfg, "r+b") as f:  # the real config, then 300 MB of (sparse) zeros: no disk used
        f.truncate(300 * 2**20)
    peak = api_peak_rss(api_service)
    submit_refused(api_service, ckpt, big, "file_too_large", "config.json", f"at most {MAX_JSON_BYTES:,} bytes")
    assert api_peak_rss(api_service) - peak < 100 * 2**20  # the 300 MB were not read


def test_a_huge_shard_index_and_generation_config_are_refused(api_service, ckpt):
    big = _copy(ckpt, api_service.roots / f"bigidx-{uuid.uuid4().hex[:6]}")
    index = big / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    os.truncate(index, MAX_JSON_BYTES + 1)
    submit_refused(api_service, ckpt, big, "file_too_large", "model.safetensors.index.json")
    index.unlink()
    os.truncate(big / "generation_config.json", 64 * 2**20)
    submit_refused(api_service, ckpt, big, "file_too_large", "generation_config.json")


def test_a_config_nested_deeper_than_the_json_parser_goes_is_refused(api_service, ckpt):
    deep = _copy(ckpt, api_service.roots / f"deep-{uuid.uuid4().hex[:6]}")
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    submit_refused(api_service, ckpt, deep, "not_a_model_directory", "is not a valid config")


def test_a_shard_index_that_points_out_of_the_directory_is_refused(api_service, ckpt):
    odd = _copy(ckpt, api_service.roots / f"odd-{uuid.uuid4().hex[:6]}")
    (odd / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": f"../{ckpt.parent.name}/{ckpt.name}/model.safetensors"}}))
    submit_refused(api_service, ckpt, odd, "not_a_model_directory", "which is not a file name")


def test_malformed_safetensors_are_refused_at_submission(api_service, ckpt):
    bad = _copy(ckpt, api_service.roots / f"trunc-{uuid.uuid4().hex[:6]}")
    weights = bad / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    submit_refused(api_service, ckpt, bad, "malformed_weights", "not a valid safetensors file", "truncated")
    weights.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    submit_refused(api_service, ckpt, bad, "malformed_weights", "-byte header")
