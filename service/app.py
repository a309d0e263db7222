"""The HTTP API (FastAPI). OpenAPI at /docs; every /v1 route and /metrics need a bearer token
(but /v1/hooks/checkpoint, which takes a signed webhook instead)."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from layertrack.workers import checkpoint as ckpt_files  # stdlib only: no torch
from layertrack.workers.errors import LayertrackError
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import dashboard, hooks_api, jobs, queries
from .db import get_sessionmaker
from .http import (
    Problem,
    SessionDep,
    SettingsDep,
    authed_session,
    check_metric,
    get_job,
    get_run,
    install_error_handlers,
    job_out,
    problem_response,
)
from .models import Checkpoint, Job, JobStatus, Phase, Run
from .schemas import CheckpointIn, JobOut, RunOut
from .settings import Settings, get_settings

log = logging.getLogger("layertrack.api")


# ------------------------------------------------------------------ routes
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authed_session)])


@v1.post("/checkpoints", status_code=202, response_model=JobOut,
         responses={200: {"model": JobOut, "description": "the same checkpoint was already submitted"}})
def submit_checkpoint(
    body: CheckpointIn,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Queue a checkpoint for scoring; the same checkpoint again returns the existing job (200)."""
    return accept_checkpoint(body, response, session, settings, idempotency_key)


def accept_checkpoint(
    body: CheckpointIn, response: Response, session: Session, settings: Settings, idempotency_key: str | None
) -> JobOut:
    """Store and queue a checkpoint submission (a bearer-token POST or a signed webhook)."""
    if body.probe != "default":
        raise Problem(422, "Invalid request", f"unknown probe {body.probe!r}; available: default")
    replaceable = [m for m in body.metrics or [] if m in jobs.REPLACEABILITY_METRICS]
    if replaceable and not body.config.replaceability:
        raise Problem(422, "Invalid request", f"metric(s) {', '.join(replaceable)} need config.replaceability = true")
    metrics = body.metrics or list(jobs.BASE_METRICS) + (
        list(jobs.REPLACEABILITY_METRICS) if body.config.replaceability else [])
    try:
        path = ckpt_files.resolve_checkpoint_path(body.uri, settings.roots)
        info = ckpt_files.inspect_checkpoint(path, allow_pickle=False, check_causal_lm=False)
    except LayertrackError as e:
        raise Problem(422, "Invalid checkpoint", e.message, code=e.code) from None
    sub = jobs.Submission(
        run=body.run, step=body.step, uri=str(path), fingerprint=info.fingerprint,
        phase=Phase(body.phase) if body.phase else None, parent_run=body.parent_run,
        parent_step=body.parent_step, probe=body.probe,
        config={**body.config.model_dump(), "metrics": metrics},
    )
    try:
        job, created = jobs.submit(session, sub, idempotency_key=idempotency_key)
        session.commit()
    except jobs.SubmitConflict as e:
        session.rollback()
        raise Problem(409, "Conflict", str(e)) from None
    except LookupError as e:
        session.rollback()
        raise Problem(422, "Invalid request", str(e)) from None
    except IntegrityError:  # a concurrent identical submission won the race
        session.rollback()
        job, created = jobs.submit(session, sub, idempotency_key=idempotency_key)
        session.commit()
    if created and not jobs.publish(job.id):
        # the job is stored; the sweeper sends it when the broker is back
        jobs.mark_unsent(session, job)
        session.commit()
    elif not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


@v1.get("/jobs/{job_id}", response_model=JobOut)
def read_job(job_id: str, session: SessionDep) -> JobOut:
    return job_out(get_job(session, job_id))


@v1.get("/jobs", response_model=list[JobOut])
def list_jobs(
    session: SessionDep,
    run: str | None = None,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobOut]:
    stmt = select(Job).order_by(Job.queued_at.desc()).limit(limit)
    if run is not None:
        stmt = stmt.where(Job.run_id == get_run(session, run).id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return [job_out(j) for j in session.scalars(stmt)]


@v1.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    try:
        job = jobs.cancel(session, get_job(session, job_id))
    except jobs.InvalidTransition as e:
        raise Problem(409, "Conflict", str(e)) from None
    session.commit()
    return job_out(job)


@v1.post("/jobs/{job_id}/retry", response_model=JobOut)
def retry_job(job_id: str, session: SessionDep, settings: SettingsDep) -> JobOut:
    try:
        job = jobs.retry(session, get_job(session, job_id))
    except jobs.InvalidTransition as e:
        raise Problem(409, "Conflict", str(e)) from None
    session.commit()
    jobs.enqueue(settings.db_url, job.id)
    session.refresh(job)
    return job_out(job)


def run_out(session: Session, run: Run) -> RunOut:
    last_step, n_ckpt = session.execute(
        select(func.max(Checkpoint.step), func.count(Checkpoint.id)).where(Checkpoint.run_id == run.id)
    ).one()
    counts = dict(session.execute(
        select(Job.status, func.count(Job.id)).where(Job.run_id == run.id).group_by(Job.status)
    ).all())
    last_activity = session.scalar(
        select(func.max(func.coalesce(Job.finished_at, Job.started_at, Job.queued_at))).where(Job.run_id == run.id)
    )
    return RunOut(
        name=run.name, phase=run.phase.value, parent_run=run.parent.name if run.parent else None,
        parent_step=run.parent_step, created_at=run.created_at, last_step=last_step, n_checkpoints=n_ckpt,
        jobs={s.value: counts.get(s, 0) for s in JobStatus}, last_activity=last_activity or run.created_at,
    )


@v1.get("/runs", response_model=list[RunOut])
def list_runs(session: SessionDep, name: str | None = Query(default=None, max_length=200)) -> list[RunOut]:
    stmt = select(Run).order_by(Run.created_at)
    if name:
        stmt = stmt.where(Run.name.contains(name, autoescape=True))
    return [run_out(session, r) for r in session.scalars(stmt)]


@v1.get("/runs/{run}", response_model=RunOut)
def read_run(run: str, session: SessionDep) -> RunOut:
    return run_out(session, get_run(session, run))


MaxPoints = Annotated[int, Query(ge=2, le=100_000)]
StepQ = Annotated[int | None, Query(ge=0)]


@v1.get("/runs/{run}/scores")
def run_scores(
    run: str, session: SessionDep, metric: str = "linearity", layer: Annotated[int | None, Query(ge=0)] = None,
    from_step: StepQ = None, to_step: StepQ = None, max_points: MaxPoints = 500,
) -> dict[str, Any]:
    """Per-layer series, downsampled server-side to at most max_points per layer (extremes kept)."""
    r = get_run(session, run)
    s = queries.series(session, run_id=r.id, metric=check_metric(metric), layer=layer,
                       from_step=from_step, to_step=to_step, max_points=max_points)
    return {"run": run, "metric": metric, "series": s}


@v1.get("/runs/{run}/trend")
def run_trend(
    run: str, session: SessionDep, metric: str = "linearity",
    from_step: StepQ = None, to_step: StepQ = None, max_points: MaxPoints = 500,
) -> dict[str, Any]:
    """Layer mean per step (the final-norm pair left out)."""
    r = get_run(session, run)
    t = queries.trend(session, run_id=r.id, metric=check_metric(metric), from_step=from_step,
                      to_step=to_step, max_points=max_points)
    return {"run": run, "metric": metric, **t}


@v1.get("/runs/{run}/heatmap")
def run_heatmap(
    run: str, session: SessionDep, metric: str = "linearity",
    max_steps: Annotated[int, Query(ge=2, le=5000)] = 200,
) -> dict[str, Any]:
    r = get_run(session, run)
    return {"run": run, "metric": metric,
            **queries.heatmap(session, run_id=r.id, metric=check_metric(metric), max_steps=max_steps)}


EXPORT_COLUMNS = ["run", "step", "layer", "metric", "value", "final_norm", "job_id"]


@v1.get("/runs/{run}/export")
def run_export(
    run: str, session: SessionDep, format: Annotated[str, Query(pattern="^(csv|parquet)$")] = "csv",
    metric: str | None = None,
):
    """Every stored score of the run as CSV (streamed) or Parquet."""
    r = get_run(session, run)
    if metric is not None:
        check_metric(metric)
    rows = queries.export_rows(session, run_id=r.id, metric=metric)
    if format == "csv":
        def gen() -> Iterator[str]:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(EXPORT_COLUMNS)
            for i, (step, layer, m, value, fn, job_id) in enumerate(rows):
                w.writerow([run, step, layer, m, "" if value is None else repr(value), int(fn), job_id])
                if i % 2000 == 1999:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
            yield buf.getvalue()

        return StreamingResponse(gen(), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{run}.csv"'})
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {c: [] for c in EXPORT_COLUMNS}
    for step, layer, m, value, fn, job_id in rows:
        for c, v in zip(EXPORT_COLUMNS, (run, step, layer, m, value, bool(fn), job_id), strict=True):
            cols[c].append(v)
    table = pa.table({
        "run": pa.array(cols["run"], pa.string()), "step": pa.array(cols["step"], pa.int64()),
        "layer": pa.array(cols["layer"], pa.int32()), "metric": pa.array(cols["metric"], pa.string()),
        "value": pa.array(cols["value"], pa.float64()), "final_norm": pa.array(cols["final_norm"], pa.bool_()),
        "job_id": pa.array(cols["job_id"], pa.string()),
    })
    out = io.BytesIO()
    pq.write_table(table, out)
    return Response(out.getvalue(), media_type="application/vnd.apache.parquet",
                    headers={"Content-Disposition": f'attachment; filename="{run}.parquet"'})


@v1.get("/compare")
def compare_runs(
    session: SessionDep, runs: Annotated[str, Query(description="run names, comma separated")],
    metric: str = "linearity", max_points: MaxPoints = 500,
) -> dict[str, Any]:
    """Layer-mean trends of several runs in one call."""
    names = [n for n in (x.strip() for x in runs.split(",")) if n]
    if not 1 <= len(names) <= 20:
        raise Problem(422, "Invalid request", "give between 1 and 20 run names, comma separated")
    check_metric(metric)
    out = []
    for name in names:
        r = get_run(session, name)
        out.append({"run": name, "phase": r.phase.value,
                    "parent_run": r.parent.name if r.parent else None, "parent_step": r.parent_step,
                    **queries.trend(session, run_id=r.id, metric=metric, max_points=max_points)})
    return {"metric": metric, "runs": out}


# ------------------------------------------------------------------ health, readiness, metrics
ops = APIRouter()


@ops.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz")
def readyz(settings: SettingsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with get_sessionmaker(settings.db_url)() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"unreachable: {type(e).__name__}"
    try:
        from layertrack.workers.celery_app import app as celery_app

        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"unreachable: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    headers = None if ok else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503, headers=headers)


@ops.get("/metrics")
def metrics(session: SessionDep) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    g = Gauge("layertrack_jobs", "jobs by status", ["status"], registry=reg)
    counts = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
    for s in JobStatus:
        g.labels(s.value).set(counts.get(s, 0))
    Gauge("layertrack_runs", "runs", registry=reg).set(session.scalar(select(func.count(Run.id))) or 0)
    return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------ the app
class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (pure ASGI: no per-request overhead)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = problem_response(413, "Request too large", f"the request body is larger than {self.max_bytes} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    return await too_big(scope, receive, send)
                return await self.app(scope, receive, send)
        seen = 0

        async def limited_receive():  # chunked upload: count as it arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise Problem(413, "Request too large", f"the request body is larger than {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)



async def _sweeper(settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            await asyncio.to_thread(jobs.sweep, settings.db_url, stale_after_s=settings.stale_after_s,
                                    requeue_after_s=settings.requeue_after_s)
        except Exception as e:  # a dependency is down: try again next round
            log.warning("sweep failed: %s: %s", type(e).__name__, e)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = asyncio.create_task(_sweeper(settings)) if settings.sweep_interval_s > 0 else None
        yield
        if task:
            task.cancel()

    app = FastAPI(
        title="layertrack",
        version="0.1.0",
        description="Track how the layers of a transformer language model change while it trains.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    install_error_handlers(app)
    app.include_router(ops)
    app.include_router(v1)
    app.include_router(hooks_api.authed)
    app.include_router(hooks_api.signed)
    app.include_router(dashboard.api)
    app.include_router(dashboard.pages)
    app.mount("/static", dashboard.static_files(), name="static")
    return app
