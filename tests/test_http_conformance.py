"""HTTP conformance over a real socket, on SQLite and on PostgreSQL: bodies over the limit
are 413 however they are sent, a request without a valid token is 401 before its body is
read, every method a path does not take is 405 with the ``Allow`` of that path, and the
OpenAPI document says what the API answers (problem details for every error, the CSV,
Parquet, PNG and SVG content types, metric names as an enum, the bearer token as a security
scheme). The property-based test over the same document: tests/test_openapi_fuzz.py."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from layertrack.workers.vocabulary import KNOWN_METRICS

PROBLEM = "application/problem+json"
LIMIT = 65536  # the default max_body_bytes
#: the routes that take no API token (the signed hook: a signature instead; bucket
#: notifications: the hook source's secret as the bearer)
OPEN = {"/healthz", "/readyz", "/v1/hooks/checkpoint", "/v1/hooks/object-store"}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def scored_run(db_url: str, run: str, steps: tuple[int, ...]) -> list[str]:
    """Synthetic scores through the real completion path (submissions.submit, jobs.claim, jobs.complete), no
    worker: BASE_METRICS for two blocks and the final-norm pair at each step; the job ids."""
    from services import synthetic_run

    return synthetic_run(db_url, run, steps, fingerprint="syn", anisotropy=0.3,
                         pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.5 + step / 1000, "cosine": 0.8,
                                            "norm_ratio": 1.1})


@pytest.fixture(scope="module")
def doc(api_service) -> dict:
    r = httpx.get(api_service.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def run(api_service) -> str:
    """A run named with a '/' and scores at two steps."""
    name = f"org-{uuid.uuid4().hex[:6]}/conformance"
    scored_run(api_service.db_url, name, (10, 20))
    return name


def operations(doc: dict):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method.upper(), path, op


def concrete(path: str, run: str = "org/x") -> str:
    """A URL path for an OpenAPI path template (``{run}`` may contain '/')."""
    values = {"run": run, "fmt": "png"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], "1"), path)


def assert_problem(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and needle in body["detail"], body
    return body


# ------------------------------------------------------------------ 1. bodies and tokens
def chunks(total: int, size: int = 8192):
    """A body of ``total`` bytes as a generator: httpx sends it chunked, with no Content-Length."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


def test_chunked_bodies_over_the_limit_are_413_like_declared_ones(api_service):
    with api_service.http() as h:
        for path in ("/v1/checkpoints", "/v1/webhooks", "/v1/hook-sources", "/v1/runs/org/x/alerts"):
            r = h.post(path, content=chunks(LIMIT + 1), headers={"Content-Type": "application/json"})
            assert "content-length" not in {k.lower() for k in r.request.headers}
            assert_problem(r, 413, f"larger than {LIMIT} bytes")
            r = h.post(path, content=b" " * (LIMIT + 1), headers={"Content-Type": "application/json"})
            assert_problem(r, 413, f"larger than {LIMIT} bytes")
        # a chunked body within the limit reaches the route
        name = f"chunked-{uuid.uuid4().hex[:6]}"
        body = f'{{"name": "{name}"}}'.encode() + b" " * (LIMIT - 100)
        r = h.post("/v1/hook-sources", content=(part for part in (body[:5000], body[5000:])),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        assert r.json()["name"] == name


def test_requests_without_a_valid_token_are_401_before_their_body_is_read(api_service, doc):
    with_body = [(m, p) for m, p, op in operations(doc) if "requestBody" in op and p not in OPEN]
    assert {("POST", "/v1/checkpoints"), ("POST", "/v1/webhooks"), ("PATCH", "/v1/webhooks/{webhook_id}"),
            ("POST", "/v1/hook-sources"), ("POST", "/v1/runs/{run}/alerts")} <= set(with_body)
    bodies = {"malformed JSON": {"content": b"{not json"}, "too large": {"content": b"{" * (LIMIT + 1)},
              "chunked, too large": {"content": chunks(LIMIT + 1)}, "not UTF-8": {"content": b'{"run": "\xff"}'}}
    for headers, needle in [
        ({}, "missing API token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "must be 'Bearer <token>'"),
        ({"Authorization": "Bearer"}, "must be 'Bearer <token>'"),
        ({"Authorization": "Bearer lt_not-a-real-token"}, "unknown or revoked API token"),
    ]:
        for method, path in with_body:
            for what, body in bodies.items():
                r = httpx.request(method, api_service.url + concrete(path), **body,
                                  headers={**headers, "Content-Type": "application/json"})
                assert_problem(r, 401, needle)
                assert r.headers["www-authenticate"] == "Bearer", (what, r.headers)
    # and without a body, every other route too (the full list: test_api.py)
    for method, path, _op in operations(doc):
        if path not in OPEN:
            assert_problem(httpx.request(method, api_service.url + concrete(path)), 401, "missing API token")


def test_open_routes_stay_open(api_service):
    for path in ("/healthz", "/readyz", "/", "/jobs", "/compare", "/runs/org/x", "/docs", "/openapi.json",
                 "/favicon.ico", "/static/app.js"):
        assert httpx.get(api_service.url + path).status_code == 200, path
    # the signed hook answers for its signature, not for a token
    r = httpx.post(api_service.url + "/v1/hooks/checkpoint", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    body = assert_problem(r, 401)
    assert "token" not in body["detail"] and "webhook-" in body["detail"], body


def test_a_body_that_is_not_utf8_is_a_clear_400(api_service):
    with api_service.http() as h:
        r = h.post("/v1/hook-sources", content=b'{"name": "\xff"}', headers={"Content-Type": "application/json"})
    assert_problem(r, 400, "UTF-8 JSON")


# ------------------------------------------------------------------ 2. methods
def documented_methods(doc: dict) -> dict[str, set[str]]:
    return {path: {m.upper() for m in ops} for path, ops in doc["paths"].items()}


def test_every_method_a_path_does_not_take_is_405_with_its_allow(api_service, doc):
    """Starlette named only the first route matching the path in ``Allow`` (PUT
    /v1/webhooks/1: ``GET``, not ``DELETE, GET, PATCH``), and DELETE /v1/runs/x/alerts/firings
    reached the rule deletion (422: 'firings' is not an integer)."""
    seen = 0
    with api_service.http() as h:
        for path, methods in documented_methods(doc).items():
            for run in ("x", "org/x"):
                url = concrete(path, run)
                for method in sorted(set(METHODS) - methods):
                    r = h.request(method, url)
                    assert_problem(r, 405, f"{method} is not allowed")
                    assert r.headers["allow"] == ", ".join(sorted(methods)), (method, url, r.headers["allow"])
                    seen += 1
        # the read-only run routes named in the issue
        for method, url, allow in [("PUT", "/v1/runs/x", "DELETE, GET"), ("POST", "/v1/runs/org/x", "DELETE, GET"),
                                   ("DELETE", "/v1/runs/x/trend", "GET"), ("POST", "/v1/runs/x/export", "GET"),
                                   ("DELETE", "/v1/runs/x/alerts/firings", "GET"),
                                   ("PUT", "/v1/runs/x/alerts", "GET, POST"),
                                   ("PUT", "/v1/webhooks/1", "DELETE, GET, PATCH")]:
            r = h.request(method, url)
            assert_problem(r, 405)
            assert r.headers["allow"] == allow, (method, url)
        # a rule id that is no integer is no rule: 404, as for any path nothing is at
        assert_problem(h.delete("/v1/runs/x/alerts/abc"), 404, "nothing at")
    assert seen > 80


# ------------------------------------------------------------------ 2. the OpenAPI document
def test_every_error_is_documented_as_problem_details(doc):
    schemas = doc["components"]["schemas"]
    problem = schemas["ProblemDetails"]
    assert set(problem["required"]) == {"title", "status", "detail"}
    assert {"type", "title", "status", "detail", "code", "errors"} <= set(problem["properties"])
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API token ('layertrack token create')"}
    for method, path, op in operations(doc):
        codes = {int(c) for c in op["responses"]}
        label = f"{method} {path}"
        for code, response in op["responses"].items():
            if int(code) >= 400 and (path, code) != ("/readyz", "503"):
                assert response["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}, \
                    (label, code)
        if path not in OPEN:
            assert op["security"] == [{"bearer": []}], label
            assert {401, 403, 503} <= codes, label
            assert not [p for p in op.get("parameters", ()) if p["name"].lower() == "authorization"], label
        if op.get("parameters") or "requestBody" in op:
            assert 422 in codes, label
        else:
            assert 422 not in codes, label
        if "requestBody" in op:
            assert {400, 413} <= codes, label
        if "{" in path and path not in OPEN:
            assert 404 in codes, label
    assert doc["paths"]["/readyz"]["get"]["responses"]["503"]["content"] == {"application/json": {}}
    hook = doc["paths"]["/v1/hooks/checkpoint"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CheckpointIn"}
    assert {401, 409, 413, 422} <= {int(c) for c in hook["responses"]} and "security" not in hook


def test_content_types_are_documented_and_served(api_service, doc, run):
    export = doc["paths"]["/v1/runs/{run}/export"]["get"]["responses"]["200"]["content"]
    assert set(export) == {"text/csv", "application/vnd.apache.parquet"}
    for kind in ("trend", "heatmap", "profile"):
        assert set(doc["paths"][f"/v1/runs/{{run}}/{kind}/plot.{{fmt}}"]["get"]["responses"]["200"]["content"]) == {
            "image/png", "image/svg+xml"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    with api_service.http() as h:
        for fmt, media in (("csv", "text/csv"), ("parquet", "application/vnd.apache.parquet")):
            r = h.get(f"/v1/runs/{run}/export", params={"format": fmt})
            assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == media, r.headers
        assert h.get(f"/v1/runs/{run}/export").text.startswith("run,step,layer,metric")
        for kind in ("trend", "heatmap", "profile"):
            for fmt, media in (("png", "image/png"), ("svg", "image/svg+xml")):
                r = h.get(f"/v1/runs/{run}/{kind}/plot.{fmt}", params={"metric": "linearity"})
                assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == media, (kind, r.text[:200])
        assert h.get("/metrics").headers["content-type"].startswith("text/plain")


def test_metric_names_are_an_enum_wherever_they_are_validated_as_one(doc):
    known = sorted(KNOWN_METRICS)

    def enum_of(schema: dict) -> list[str]:
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        for alt in schema.get("anyOf", ()):
            if alt.get("type") != "null":
                return enum_of(alt)
        return sorted(schema["enum"])

    seen = 0
    for method, path, op in operations(doc):
        for p in op.get("parameters", ()):
            if p["name"] == "metric":
                assert enum_of(p["schema"]) == known, (method, path)
                seen += 1
    assert seen >= 9  # scores, trend, heatmap, profile, export, compare and the three plots
    schemas = doc["components"]["schemas"]
    assert enum_of(schemas["AlertRuleIn"]["properties"]["metric"]) == known
    metrics = next(a for a in schemas["CheckpointIn"]["properties"]["metrics"]["anyOf"] if a.get("type") == "array")
    assert enum_of(metrics["items"]) == known


#: the read routes and the response model each answers with (service/schemas.py)
READ_MODELS = {"/v1/runs/{run}/scores": "ScoresOut", "/v1/runs/{run}/trend": "TrendOut",
               "/v1/runs/{run}/heatmap": "HeatmapOut", "/v1/runs/{run}/profile": "ProfileOut",
               "/v1/compare": "CompareOut"}


def test_the_read_routes_document_their_answers_and_answer_so(api_service, doc, run):
    """Each read route's 200 names its response model, whose properties are the answer's keys."""
    schemas = doc["components"]["schemas"]
    with api_service.http() as h:
        for path, model in READ_MODELS.items():
            ok = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            assert ok == {"$ref": f"#/components/schemas/{model}"}, path
            props = schemas[model]["properties"]
            assert set(schemas[model]["required"]) == set(props), model  # every key is in every answer
            r = h.get(concrete(path, run), params={"runs": run} if path == "/v1/compare" else None)
            assert r.status_code == 200, (path, r.text)
            assert list(r.json()) == list(props), path  # the keys, in the documented order
    assert set(schemas["CompareRunOut"]["properties"]) == {"run", "phase", "parent_run", "parent_step", "steps",
                                                           "values", "n_steps"}
    assert set(schemas["SeriesOut"]["properties"]) == {"layer", "final_norm", "steps", "values"}
