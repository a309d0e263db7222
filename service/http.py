"""Shared pieces of the HTTP layer: problem-details errors, settings and authenticated
session dependencies, and lookups that answer 404/422 with a clear message."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import auth, jobs
from .db import get_sessionmaker
from .models import Job, Run
from .schemas import JobOut
from .settings import Settings, get_settings

log = logging.getLogger("layertrack.api")
PROBLEM = "application/problem+json"


# ------------------------------------------------------------------ errors as problem details
class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra):
        self.status, self.title, self.detail, self.headers, self.extra = status, title, detail, headers, extra


def problem_response(status: int, title: str, detail: str, headers=None, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_req, exc: Problem):
        return problem_response(exc.status, exc.title, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return problem_response(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return problem_response(exc.status_code, "HTTP error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_req, exc: OperationalError):
        log.warning("database unavailable: %s", exc)
        s = get_settings()
        return problem_response(
            503, "Database unavailable", "the database cannot be reached; try again shortly",
            {"Retry-After": str(s.retry_after_s)},
        )


# ------------------------------------------------------------------ dependencies
async def settings_dep(request: Request) -> Settings:  # async: no thread hop
    """The app's settings (create_app's argument). Not a dependency override: FastAPI
    re-analyses overrides on every request, which cost ~3 ms per call."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_dep)]


def authed_session(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> Iterator[Session]:
    """A database session for a request that carries a valid bearer token (one thread hop)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization:
        raise Problem(401, "Unauthorized", "missing API token: send 'Authorization: Bearer <token>' "
                      "(create one with 'layertrack token create')", challenge)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "Unauthorized", "the Authorization header must be 'Bearer <token>'", challenge)
    session = get_sessionmaker(settings.db_url)()
    try:
        if not auth.verify(session, token.strip()):
            raise Problem(401, "Unauthorized", "unknown or revoked API token", challenge)
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(authed_session)]


# ------------------------------------------------------------------ helpers
def job_out(job: Job) -> JobOut:
    started, finished = job.started_at, job.finished_at
    duration = (finished - started).total_seconds() if started and finished else None
    return JobOut(
        id=job.id,
        status=job.status.value,
        status_url=f"/v1/jobs/{job.id}",
        run=job.run.name,
        step=job.checkpoint.step,
        phase=job.checkpoint.phase.value,
        uri=job.checkpoint.uri,
        probe=job.probe.name,
        config=job.config,
        attempts=job.attempts,
        worker=job.worker,
        error_code=job.error_code,
        error=job.error,
        result=job.result,
        queued_at=job.queued_at,
        started_at=started,
        finished_at=finished,
        duration_s=duration,
    )


def get_run(session: Session, name: str) -> Run:
    run = session.scalar(select(Run).where(Run.name == name))
    if run is None:
        raise Problem(404, "Not found", f"no run named {name!r}")
    return run


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id) if len(job_id) <= 36 else None
    if job is None:
        raise Problem(404, "Not found", f"no job with id {job_id!r}")
    return job


def check_metric(metric: str) -> str:
    if metric not in jobs.KNOWN_METRICS:
        raise Problem(422, "Invalid request", f"unknown metric {metric!r}; known: {', '.join(jobs.KNOWN_METRICS)}")
    return metric
