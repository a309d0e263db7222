"""The Python client of the layertrack API (the CLI and the training callbacks use it).

    from layertrack.service.client import Client
    with Client("http://127.0.0.1:8321", token="lt_...") as lt:
        job = lt.submit(run="my-run", step=100, uri="/ckpts/step-100")
        job = lt.wait(job["id"], timeout=600)
        print(lt.trend("my-run", metric="linearity_nores"))

Every method returns plain Python data: dicts and lists, as the API's JSON (``job["id"]``,
not ``job.id``). The TypedDicts below, which the methods' annotations name, describe each
answer key for key (times are ISO 8601 strings); tests/test_client.py pins them to the API's
response models (service/schemas.py) and checks real answers against them. Run names may
contain ``/`` (``org/llama-350m``). With no URL or token given, the client reads
LAYERTRACK_URL / LAYERTRACK_TOKEN, else what ``layertrack up`` saved.

Errors: ``ApiError`` (the server refused the request: ``.status``, the server's ``.detail``
and ``.code``), ``ServiceUnavailable`` (503, or no connection, after ``retries`` tries with
exponential back-off that honours Retry-After). Pass ``transport=`` (an httpx transport,
e.g. ``httpx.ASGITransport``-backed or a mock) to drive an app in-process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import quote

import httpx
from layertrack.workers.vocabulary import DEFAULT_METRIC, FINAL_STATUSES

from .settings import get_settings

DEFAULT_URL = "http://127.0.0.1:8321"


class Job(TypedDict):
    id: str
    status: str  # queued | running | succeeded | failed | cancelled
    status_url: str
    run: str
    step: int
    phase: str
    uri: str
    probe: str
    config: dict[str, Any]
    attempts: int
    worker: str | None
    error_code: str | None
    error: str | None
    result: dict[str, Any] | None
    queued_at: str
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    run_s: float | None
    #: a remote checkpoint's progress ({"phase": "fetching" | "waiting" | "scoring",
    #: "bytes_done", "bytes_total", "seconds", "message", ...}); None for a local one
    progress: dict[str, Any] | None
    content_fingerprint: str | None
    resolved_revision: str | None


class RunInfo(TypedDict):
    name: str
    phase: str
    parent_run: str | None
    parent_step: int | None
    created_at: str
    last_step: int | None
    n_checkpoints: int
    jobs: dict[str, int]
    last_activity: str


class RunDeletion(TypedDict):
    run: str
    #: False: a dry run, nothing was deleted
    deleted: bool
    jobs: int
    checkpoints: int
    scores: int
    alert_rules: int
    alert_firings: int
    #: webhook subscriptions limited to the run, and their deliveries
    webhooks: int
    webhook_deliveries: int
    #: queued or running jobs: while there are any, the run is not deleted
    active_jobs: list[str]
    #: fine-tunes of the run: kept, without a parent
    child_runs: list[str]


class Series(TypedDict):
    layer: int
    #: the pair into the final-norm output (left out of layer means)
    final_norm: bool
    steps: list[int]
    #: None where the metric is undefined
    values: list[float | None]


class Scores(TypedDict):
    run: str
    metric: str
    series: list[Series]


class Trend(TypedDict):
    run: str
    metric: str
    steps: list[int]
    values: list[float | None]
    #: steps with scores before downsampling
    n_steps: int


class Heatmap(TypedDict):
    run: str
    metric: str
    steps: list[int]
    layers: list[int]
    #: values[i][j]: layer layers[j] at step steps[i]
    values: list[list[float | None]]
    final_norm_layers: list[int]


class Profile(Heatmap):
    #: every step with scores of the metric
    available_steps: list[int]


class CompareRun(TypedDict):
    run: str
    phase: str
    parent_run: str | None
    parent_step: int | None
    steps: list[int]
    values: list[float | None]
    n_steps: int


class Compare(TypedDict):
    metric: str
    runs: list[CompareRun]


class Webhook(TypedDict):
    id: int
    url: str
    events: list[str]
    #: None: every run's events
    run: str | None
    description: str
    active: bool
    created_at: str
    #: whsec_...: only in the answer to the creation, else None
    secret: str | None


class Attempt(TypedDict):
    attempted_at: str
    status_code: int | None
    error: str | None
    duration_ms: float


class Delivery(TypedDict):
    id: str
    webhook_id: int
    event: str
    status: str  # pending | succeeded | failed
    attempts: int
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    created_at: str
    finished_at: str | None
    payload: dict[str, Any]
    attempt_log: list[Attempt]


class HookSource(TypedDict):
    id: int
    name: str
    created_at: str
    revoked_at: str | None
    #: only in the answer to the creation, else None
    secret: str | None
    #: the object-key mapping of bucket notifications (None: signed hooks only)
    prefix: str | None
    pattern: str | None
    markers: list[str] | None


class AlertRule(TypedDict):
    id: int
    run: str
    metric: str
    #: None: the layer mean
    layer: int | None
    kind: str  # threshold | sigma
    above: float | None
    below: float | None
    k: float | None
    window: int | None
    description: str
    enabled: bool
    created_at: str


class AlertFiring(TypedDict):
    id: int
    rule_id: int
    run: str
    step: int
    value: float
    message: str
    details: dict[str, Any]
    job_id: str | None
    created_at: str


def _run(name: str) -> str:
    """A run's path under /v1/runs/ (its '/' separators kept, anything else escaped)."""
    return quote(name, safe="/")


class ApiError(Exception):
    """The API refused a request: ``.status``, its problem's ``.detail`` and ``.code``
    (``run_not_found``, ``invalid_transition``, ... ; None when the answer was no problem
    details), and the whole answer as ``.body``."""

    def __init__(self, status: int, detail: str, body: Any = None):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.body = status, detail, body
        code = body.get("code") if isinstance(body, dict) else None
        self.code: str | None = code if isinstance(code, str) else None


class ServiceUnavailable(ApiError):
    pass


def client_file() -> Path:
    return get_settings().data_dir / "client.json"


class ClientFileError(ValueError):
    """The file ``layertrack up`` saves the URL and token in cannot be read; the message
    says which file and what to do."""


def discover() -> tuple[str, str | None]:
    """URL and token: LAYERTRACK_URL / LAYERTRACK_TOKEN, else what ``layertrack up`` saved.
    Raises ClientFileError when the saved file is needed and is not what ``up`` writes."""
    url, token = os.environ.get("LAYERTRACK_URL"), os.environ.get("LAYERTRACK_TOKEN")
    f = client_file()
    if (url is None or token is None) and f.is_file():
        try:
            saved = json.loads(f.read_text())
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ClientFileError(f"cannot read the saved client file {f} ({type(e).__name__}: {e}); delete it and "
                                  "start 'layertrack up' again (it saves a new one), or set LAYERTRACK_URL and "
                                  "LAYERTRACK_TOKEN") from None
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k, ""), str) for k in ("url", "token")):
            raise ClientFileError(f"the saved client file {f} is not what 'layertrack up' writes (a JSON object "
                                  'with "url" and "token" strings); delete it and start '
                                  "'layertrack up' again, or set LAYERTRACK_URL and LAYERTRACK_TOKEN")
        url = url or saved.get("url")
        token = token or saved.get("token")
    return url or DEFAULT_URL, token


class AppTransport(httpx.BaseTransport):
    """A synchronous httpx transport that calls an ASGI app in this process (httpx's own
    ASGITransport is async only). Requests run on an event loop in a helper thread."""

    def __init__(self, app: Any):
        import asyncio
        import threading

        self._asgi = httpx.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="layertrack-app-transport", daemon=True)
        self._thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        import asyncio

        async def call() -> httpx.Response:
            inner = httpx.Request(request.method, request.url, headers=request.headers, content=request.read())
            response = await self._asgi.handle_async_request(inner)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)


def _raise_for(r: httpx.Response) -> None:
    """ApiError (ServiceUnavailable for a 503) with the problem's detail and code, if ``r`` is an error."""
    if r.status_code < 400:
        return
    try:
        body = r.json()
        detail = body.get("detail") or body.get("title") or r.text
    except ValueError:
        body, detail = None, r.text
    cls = ServiceUnavailable if r.status_code == 503 else ApiError
    raise cls(r.status_code, str(detail), body)


class Client:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ):
        if url is None or token is None:
            found_url, found_token = discover()
            url, token = url or found_url, token or found_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def for_app(cls, app: Any, token: str | None = None, **options: Any) -> Client:
        """A client that drives an ASGI app (``create_app(settings)``) in this process, with
        no server and no network; its lifespan (the sweeper) is not started."""
        return cls("http://testserver", token or "", transport=AppTransport(app), **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise ServiceUnavailable(0, f"cannot reach layertrack at {self.url}: {e}") from None
            else:
                if r.status_code != 503 or attempt == self.retries:
                    break
                delay = float(r.headers.get("Retry-After", delay))
            time.sleep(min(delay, 30))
            delay *= 2
        _raise_for(r)
        return r

    # ---------------------------------------------------------------- jobs
    def submit(self, *, run: str, step: int, uri: str, idempotency_key: str | None = None, **fields) -> Job:
        """Queue a checkpoint (fields: phase, parent_run, parent_step, probe, metrics, config).
        The same checkpoint again returns the existing job."""
        return self.submit_checked(run=run, step=step, uri=uri, idempotency_key=idempotency_key, **fields)[0]

    def submit_checked(self, *, run: str, step: int, uri: str, idempotency_key: str | None = None,
                       **fields) -> tuple[Job, bool]:
        """As :meth:`submit`, and whether the service made a new job (202: True) or answered
        with the job it already had for this checkpoint (200: False)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"run": run, "step": step, "uri": uri, **{k: v for k, v in fields.items() if v is not None}}
        r = self._request("POST", "/v1/checkpoints", json=body, headers=headers)
        return r.json(), r.status_code == 202

    def job(self, job_id: str) -> Job:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, *, run: str | None = None, status: str | None = None, limit: int = 100) -> list[Job]:
        params = {k: v for k, v in {"run": run, "status": status, "limit": limit}.items() if v is not None}
        return self._request("GET", "/v1/jobs", params=params).json()

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll: float = 1.0,
             on_poll: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job has finished (succeeded, failed or cancelled); TimeoutError if not.
        ``on_poll`` is called with the job as each poll finds it (its ``progress`` shows a
        remote checkpoint's fetch)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job["status"] in FINAL_STATUSES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s of waiting; it goes "
                                   f"on without you (wait for it again, or cancel it)")
            time.sleep(poll)

    def cancel(self, job_id: str) -> Job:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def retry(self, job_id: str) -> Job:
        return self._request("POST", f"/v1/jobs/{job_id}/retry").json()

    # ---------------------------------------------------------------- runs and scores
    def runs(self, *, name: str | None = None) -> list[RunInfo]:
        """Every run (or those whose name contains ``name``)."""
        return self._request("GET", "/v1/runs", params={"name": name} if name else None).json()

    def run(self, name: str) -> RunInfo:
        return self._request("GET", f"/v1/runs/{_run(name)}").json()

    def delete_run(self, name: str, *, dry_run: bool = False) -> RunDeletion:
        """Delete a run with its checkpoints, jobs, scores, alert rules and firings and the
        webhooks limited to it (admin scope); ``dry_run``: only count what would go. ApiError
        409 (code ``run_has_active_jobs``) while it has queued or running jobs."""
        params = {"dry_run": "true"} if dry_run else None
        return self._request("DELETE", f"/v1/runs/{_run(name)}", params=params).json()

    def scores(self, run: str, *, metric: str = DEFAULT_METRIC, **params) -> Scores:
        """One Series per layer; params: layer, from_step, to_step, max_points."""
        return self._request("GET", f"/v1/runs/{_run(run)}/scores", params={"metric": metric, **params}).json()

    def trend(self, run: str, *, metric: str = DEFAULT_METRIC, **params) -> Trend:
        """Layer mean per step; params: from_step, to_step, max_points."""
        return self._request("GET", f"/v1/runs/{_run(run)}/trend", params={"metric": metric, **params}).json()

    def heatmap(self, run: str, *, metric: str = DEFAULT_METRIC, **params) -> Heatmap:
        """steps × layers values; params: max_steps."""
        return self._request("GET", f"/v1/runs/{_run(run)}/heatmap", params={"metric": metric, **params}).json()

    def export(self, run: str, *, format: str = "csv", metric: str | None = None) -> bytes:
        """Every stored score of the run (of one metric), as CSV or Parquet bytes."""
        params = {"format": format, **({"metric": metric} if metric else {})}
        return self._request("GET", f"/v1/runs/{_run(run)}/export", params=params).content

    def export_to(self, run: str, path: str | os.PathLike, *, format: str = "csv", metric: str | None = None) -> int:
        """As :meth:`export`, streamed into the file ``path`` (written whole or not at all: a
        temporary file beside it is renamed once complete); the bytes written."""
        params = {"format": format, **({"metric": metric} if metric else {})}
        target = Path(path)
        tmp = target.with_name(f".{target.name}.part")
        n = 0
        try:
            with self._http.stream("GET", f"/v1/runs/{_run(run)}/export", params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                try:
                    with open(tmp, "wb") as f:
                        for chunk in r.iter_bytes():
                            f.write(chunk)
                            n += len(chunk)
                    tmp.replace(target)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
        except httpx.TransportError as e:
            raise ServiceUnavailable(0, f"cannot reach layertrack at {self.url}: {e}") from None
        return n

    def profile(self, run: str, *, metric: str = DEFAULT_METRIC, steps: list[int] | None = None) -> Profile:
        """Per-layer values at the given steps (default: the last); lists ``available_steps``."""
        params = {"metric": metric, "step": steps or []}
        return self._request("GET", f"/v1/runs/{_run(run)}/profile", params=params).json()

    def plot(self, run: str, kind: str = "trend", *, format: str = "png", metric: str = DEFAULT_METRIC,
             steps: list[int] | None = None, log_x: bool = False) -> bytes:
        """A figure (PNG or SVG bytes): kind "trend", "heatmap" or "profile" (at ``steps``)."""
        params: dict[str, Any] = {"metric": metric}
        if kind == "profile" and steps:
            params["step"] = steps
        if kind == "trend" and log_x:
            params["log_x"] = "true"
        return self._request("GET", f"/v1/runs/{_run(run)}/{kind}/plot.{format}", params=params).content

    def compare(self, runs: list[str], *, metric: str = DEFAULT_METRIC) -> Compare:
        return self._request("GET", "/v1/compare", params={"runs": ",".join(runs), "metric": metric}).json()

    # ---------------------------------------------------------------- webhooks out
    def create_webhook(self, url: str, *, events: list[str] | None = None, run: str | None = None,
                       secret: str | None = None, description: str = "") -> Webhook:
        """Subscribe ``url``; the answer's ``secret`` (whsec_...) is shown only this once."""
        body = {"url": url, "run": run, "secret": secret, "description": description, "events": events}
        return self._request("POST", "/v1/webhooks", json={k: v for k, v in body.items() if v is not None}).json()

    def webhooks(self) -> list[Webhook]:
        return self._request("GET", "/v1/webhooks").json()

    def update_webhook(self, webhook_id: int, *, active: bool | None = None, events: list[str] | None = None,
                       description: str | None = None) -> Webhook:
        """Pause (``active=False``) or resume a subscription, or change its events or description."""
        body = {k: v for k, v in {"active": active, "events": events, "description": description}.items()
                if v is not None}
        return self._request("PATCH", f"/v1/webhooks/{webhook_id}", json=body).json()

    def delete_webhook(self, webhook_id: int) -> None:
        self._request("DELETE", f"/v1/webhooks/{webhook_id}")

    def deliveries(self, webhook_id: int, *, status: str | None = None, event: str | None = None,
                   limit: int = 100) -> list[Delivery]:
        """Deliveries, newest first, each with ``attempt_log`` (status code, error, duration)."""
        params = {k: v for k, v in {"status": status, "event": event, "limit": limit}.items() if v is not None}
        return self._request("GET", f"/v1/webhooks/{webhook_id}/deliveries", params=params).json()

    def delivery(self, webhook_id: int, delivery_id: str) -> Delivery:
        return self._request("GET", f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}").json()

    def redeliver(self, webhook_id: int, delivery_id: str) -> Delivery:
        return self._request("POST", f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver").json()

    def test_webhook(self, webhook_id: int) -> Delivery:
        """Send a ``webhook.test`` event; returns its delivery."""
        return self._request("POST", f"/v1/webhooks/{webhook_id}/test").json()

    # ---------------------------------------------------------------- signed hooks in
    def create_hook_source(self, name: str, *, secret: str | None = None, prefix: str | None = None,
                           pattern: str | None = None, markers: list[str] | None = None) -> HookSource:
        """A sender of signed POST /v1/hooks/checkpoint requests; ``secret`` shown only once.
        With ``prefix`` (``s3://bucket/path/``), and optionally ``pattern`` (named groups
        ``run`` and ``step``) and ``markers`` (file names), it may also post bucket
        notifications to POST /v1/hooks/object-store (docs/integrations.md)."""
        body = {"name": name, "secret": secret, "prefix": prefix, "pattern": pattern, "markers": markers}
        return self._request("POST", "/v1/hook-sources", json={k: v for k, v in body.items() if v}).json()

    def hook_sources(self) -> list[HookSource]:
        return self._request("GET", "/v1/hook-sources").json()

    def revoke_hook_source(self, name: str) -> HookSource:
        return self._request("DELETE", f"/v1/hook-sources/{quote(name, safe='')}").json()

    # ---------------------------------------------------------------- trend alerts
    def create_alert(self, run: str, *, metric: str, kind: str, layer: int | None = None,
                     above: float | None = None, below: float | None = None, k: float | None = None,
                     window: int | None = None, description: str = "") -> AlertRule:
        """kind "threshold" (above/below) or "sigma" (k, window); layer None = the layer mean."""
        body = {"metric": metric, "kind": kind, "layer": layer, "above": above, "below": below, "k": k,
                "window": window, "description": description}
        return self._request("POST", f"/v1/runs/{_run(run)}/alerts",
                             json={k_: v for k_, v in body.items() if v is not None}).json()

    def alerts(self, run: str) -> list[AlertRule]:
        return self._request("GET", f"/v1/runs/{_run(run)}/alerts").json()

    def delete_alert(self, run: str, rule_id: int) -> None:
        self._request("DELETE", f"/v1/runs/{_run(run)}/alerts/{rule_id}")

    def firings(self, run: str) -> list[AlertFiring]:
        """Every firing of the run's alert rules, in step order."""
        return self._request("GET", f"/v1/runs/{_run(run)}/alerts/firings").json()
