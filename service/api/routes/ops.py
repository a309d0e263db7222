"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from layertrack.workers.vocabulary import JobStatus
from sqlalchemy import func, select, text

from ... import queue
from ...db import get_sessionmaker
from ...models import Delivery, Job, Run
from ..deps import SessionDep, SettingsDep, read_every_run

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (no dependency checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the database or the broker is unreachable; retry after "
                                         "`Retry-After` seconds", "content": {"application/json": {}}}})
def readyz(settings: SettingsDep) -> JSONResponse:
    """The database and the broker are reachable (503 with Retry-After otherwise)."""
    checks: dict[str, str] = {}
    try:
        with get_sessionmaker(settings.db_url)() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"unreachable: {type(e).__name__}"
    try:
        queue.broker_reachable()
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"unreachable: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    headers = None if ok else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503, headers=headers)


@router.get("/metrics", dependencies=[Depends(read_every_run)], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
def metrics(session: SessionDep) -> Response:
    """Prometheus text format: jobs by status, runs, and the messages the sweeper re-sent
    because it presumed them lost (jobs, webhook deliveries; summed over the stored rows)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
    from prometheus_client.core import CounterMetricFamily

    reg = CollectorRegistry()
    g = Gauge("layertrack_jobs", "jobs by status", ["status"], registry=reg)
    counts = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
    for s in JobStatus:
        g.labels(s.value).set(counts.get(s, 0))
    Gauge("layertrack_runs", "runs", registry=reg).set(session.scalar(select(func.count(Run.id))) or 0)
    resends = [
        CounterMetricFamily("layertrack_job_resends", "job messages re-sent by the sweeper (presumed lost)",
                            value=session.scalar(select(func.coalesce(func.sum(Job.resends), 0)))),
        CounterMetricFamily("layertrack_delivery_resends",
                            "webhook delivery messages re-sent by the sweeper (presumed lost)",
                            value=session.scalar(select(func.coalesce(func.sum(Delivery.resends), 0)))),
    ]
    reg.register(_Fixed(resends))
    return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)


class _Fixed:
    """A collector of metric families read once (from the database) for one scrape."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)
