"""A small HTTP client for the layertrack API (used by the CLI).

    from layertrack.service.client import Client
    with Client("http://127.0.0.1:8321", token="lt_...") as lt:
        job = lt.submit(run="my-run", step=100, uri="/ckpts/step-100")
        job = lt.wait(job["id"], timeout=600)
        print(lt.trend("my-run", metric="linearity_nores"))

Errors: ``ApiError`` (the server answered 4xx/5xx; ``.status`` and the server's
``.detail``), ``ServiceUnavailable`` (503 or no connection, after retries).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from .settings import get_settings

DEFAULT_URL = "http://127.0.0.1:8321"


class ApiError(Exception):
    def __init__(self, status: int, detail: str, body: Any = None):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.body = status, detail, body


class ServiceUnavailable(ApiError):
    pass


def client_file() -> Path:
    return get_settings().data_dir / "client.json"


def discover() -> tuple[str, str | None]:
    """URL and token: LAYERTRACK_URL / LAYERTRACK_TOKEN, else what ``layertrack up`` saved."""
    url, token = os.environ.get("LAYERTRACK_URL"), os.environ.get("LAYERTRACK_TOKEN")
    f = client_file()
    if (url is None or token is None) and f.is_file():
        saved = json.loads(f.read_text())
        url = url or saved.get("url")
        token = token or saved.get("token")
    return url or DEFAULT_URL, token


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
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail") or body.get("title") or r.text
            except ValueError:
                body, detail = None, r.text
            cls = ServiceUnavailable if r.status_code == 503 else ApiError
            raise cls(r.status_code, str(detail), body)
        return r

    # ---------------------------------------------------------------- API
    def submit(self, *, run: str, step: int, uri: str, idempotency_key: str | None = None, **fields) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"run": run, "step": step, "uri": uri, **{k: v for k, v in fields.items() if v is not None}}
        return self._request("POST", "/v1/checkpoints", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, *, run: str | None = None, status: str | None = None, limit: int = 100) -> list[dict]:
        params = {k: v for k, v in {"run": run, "status": status, "limit": limit}.items() if v is not None}
        return self._request("GET", "/v1/jobs", params=params).json()

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll: float = 1.0) -> dict:
        """Poll until the job has finished (succeeded, failed or cancelled); TimeoutError if not."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll)

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def retry(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/retry").json()

    def runs(self) -> list[dict]:
        return self._request("GET", "/v1/runs").json()

    def run(self, name: str) -> dict:
        return self._request("GET", f"/v1/runs/{name}").json()

    def scores(self, run: str, *, metric: str = "linearity", **params) -> dict:
        return self._request("GET", f"/v1/runs/{run}/scores", params={"metric": metric, **params}).json()

    def trend(self, run: str, *, metric: str = "linearity", **params) -> dict:
        return self._request("GET", f"/v1/runs/{run}/trend", params={"metric": metric, **params}).json()

    def heatmap(self, run: str, *, metric: str = "linearity", **params) -> dict:
        return self._request("GET", f"/v1/runs/{run}/heatmap", params={"metric": metric, **params}).json()

    def export(self, run: str, *, format: str = "csv") -> bytes:
        return self._request("GET", f"/v1/runs/{run}/export", params={"format": format}).content

    def compare(self, runs: list[str], *, metric: str = "linearity") -> dict:
        return self._request("GET", "/v1/compare", params={"runs": ",".join(runs), "metric": metric}).json()
