"""The queue: the Celery application, its two tasks, sending to it, and the sweeper.

Both sides import this module: the API sends jobs and webhook deliveries through it (by task
name, without importing torch), and workers run its tasks. Start a scoring worker with one
process per GPU, and a light worker for webhook deliveries:

    celery -A layertrack.service.queue worker -Q gpu -c 1 -n gpu0@%h
    celery -A layertrack.service.queue worker -Q webhooks -P threads -c 4 -n hooks@%h

Scoring tasks go to the ``gpu`` queue, one at a time per worker process (prefetch 1), are
acknowledged only after they finish (acks late) and are given back to the broker when the
worker process dies (reject on worker lost). The job row in the database is the truth: a
task only says "look at job X", so running it twice is harmless. Webhook deliveries go to
the ``webhooks`` queue (no GPU, no torch), so a long scoring job never delays them.

The score task imports the compute side (torch) when it runs, never at import time.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from datetime import timedelta

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from layertrack.workers.errors import LayertrackError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from . import jobs, webhooks
from .db import session_scope
from .models import HookReceipt, Job, JobStatus
from .settings import Settings, get_settings

log = logging.getLogger("layertrack.queue")

SCORE_TASK = "layertrack.score"
DELIVER_TASK = "layertrack.deliver_webhook"
GPU_QUEUE = "gpu"
WEBHOOK_QUEUE = "webhooks"

#: failures worth another try: the database or the broker was briefly unreachable
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    settings.ensure_dirs()
    app = Celery("layertrack", broker=settings.broker)
    app.conf.update(
        broker_transport_options=settings.broker_transport_options,
        broker_connection_retry_on_startup=True,
        task_routes={SCORE_TASK: {"queue": GPU_QUEUE}, DELIVER_TASK: {"queue": WEBHOOK_QUEUE}},
        task_default_queue=GPU_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # publishing fails fast when the broker is down (the job is already committed and the
        # sweeper sends it later); a worker keeps reconnecting forever
        broker_connection_timeout=2,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
    )
    return app


app = make_app()


# ------------------------------------------------------------------ sending
def send_job(job_id: str) -> bool:
    """Send the job to the broker; False when the broker cannot be reached (the job stays
    queued and the sweeper sends it later)."""
    try:
        app.send_task(SCORE_TASK, args=[job_id], queue=GPU_QUEUE, retry=False)
    except Exception as e:
        log.warning("could not enqueue job %s (%s: %s); the sweeper will retry", job_id, type(e).__name__, e)
        return False
    return True


def dispatch(session: Session, job: Job) -> None:
    """Send a job just committed; when the broker is down, mark it unsent for the sweeper."""
    if not send_job(job.id):
        jobs.mark_unsent(session, job)


def enqueue(db_url: str, job_id: str) -> bool:
    """Send the job and record when; False (and the job stays unsent) on failure."""
    if not send_job(job_id):
        return False
    with session_scope(db_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued).values(enqueued_at=jobs.now())
        )
    return True


def send_deliveries(ids: Iterable[str], *, countdown: float = 0.0) -> int:
    """Hand webhook deliveries to their queue; how many were sent (the rest: the sweeper)."""
    sent = 0
    for delivery_id in ids:
        try:
            app.send_task(DELIVER_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE,
                          countdown=countdown or None, retry=False)
            sent += 1
        except Exception as e:
            log.warning("could not queue webhook delivery %s (%s: %s)", delivery_id, type(e).__name__, e)
    return sent


def broker_reachable() -> bool:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    return True


# ------------------------------------------------------------------ the sweeper
def sweep(db_url: str, *, stale_after_s: float, requeue_after_s: float) -> dict[str, int]:
    """Re-queue jobs whose worker vanished; (re-)send queued jobs never or long ago sent;
    re-send webhook deliveries whose task was lost; forget old inbound-hook receipts."""
    t = jobs.now()
    with session_scope(db_url) as s:
        stale = s.execute(
            update(Job)
            .where(
                Job.status == JobStatus.running,
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < t - timedelta(seconds=stale_after_s)),
                or_(Job.started_at.is_(None), Job.started_at < t - timedelta(seconds=stale_after_s)),
            )
            .values(status=JobStatus.queued, worker=None, enqueued_at=None)
            .returning(Job.id)
        ).scalars().all()
        pending = s.scalars(
            select(Job.id).where(
                Job.status == JobStatus.queued,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < t - timedelta(seconds=requeue_after_s)),
            )
        ).all()
    if stale:
        log.warning("re-queued %d job(s) whose worker stopped sending heartbeats: %s", len(stale), stale)
    sent = sum(enqueue(db_url, job_id) for job_id in pending)
    lost = webhooks.overdue(db_url)
    if lost:
        log.warning("re-sending %d webhook deliveries whose task was lost", len(lost))
        send_deliveries(lost)
    with session_scope(db_url) as s:  # replays older than this fail the timestamp check anyway
        s.execute(delete(HookReceipt).where(HookReceipt.received_at < t - timedelta(hours=1)))
    return {"stale_requeued": len(stale), "pending": len(pending), "sent": sent, "deliveries_resent": len(lost)}


# ------------------------------------------------------------------ the tasks
def _backoff(retries: int) -> int:
    """Seconds before retry number ``retries + 1``: 2, 4, 8, ... capped at 64."""
    return 2 ** min(retries + 1, 6)


def _heartbeat(db_url: str, job_id: str, worker: str, period: float, stop: threading.Event) -> None:
    while not stop.wait(period):
        try:
            if not jobs.heartbeat(db_url, job_id, worker):
                log.info("job %s is no longer ours (cancelled or re-queued)", job_id)
        except Exception as e:  # keep beating: one missed beat is not a dead worker
            log.warning("heartbeat for job %s failed: %s", job_id, e)


def _failed(db_url: str, job_id: str, worker: str, code: str, message: str) -> None:
    send_deliveries(jobs.fail(db_url, job_id, worker, code, message).deliveries)


@app.task(name=SCORE_TASK, bind=True)
def score(self, job_id: str) -> str:
    """Claim the job, score its checkpoint with a heartbeat running, store the result."""
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint  # the compute side: torch

    settings = get_settings()
    db_url = settings.db_url
    worker = self.request.hostname or socket.gethostname()
    try:
        job = jobs.claim(db_url, job_id, worker)
    except TRANSIENT as e:
        raise self.retry(exc=e, countdown=_backoff(self.request.retries),
                         max_retries=settings.task_max_retries) from e
    if job is None:
        return "skipped: not queued"
    log.info("job %s: scoring %s (attempt %d)", job_id, job.uri, job.attempts)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(db_url, job_id, worker, settings.heartbeat_s, stop), daemon=True
    )
    beat.start()
    try:
        result = score_checkpoint(job.uri, config=ScoreConfig(**jobs.score_options(job.config)), roots=settings.roots)
    except LayertrackError as e:
        _failed(db_url, job_id, worker, e.code, e.message)
        return f"failed: {e.code}"
    except SoftTimeLimitExceeded:
        _failed(db_url, job_id, worker, "time_limit",
                f"the job ran longer than {settings.task_soft_time_limit} s and was stopped")
        return "failed: time_limit"
    except TRANSIENT as e:
        if self.request.retries < settings.task_max_retries:
            jobs.release(db_url, job_id, worker)
            raise self.retry(exc=e, countdown=_backoff(self.request.retries),
                             max_retries=settings.task_max_retries) from e
        _failed(db_url, job_id, worker, "transient_error", f"{type(e).__name__}: {e}")
        return "failed: transient_error"
    except Exception as e:
        log.exception("job %s failed", job_id)
        _failed(db_url, job_id, worker, "internal_error", f"{type(e).__name__}: {e}")
        return "failed: internal_error"
    finally:
        stop.set()
        beat.join(timeout=5)
    done = jobs.complete(db_url, job_id, worker, result.to_dict(), jobs.job_metrics(job.config))
    send_deliveries(done.deliveries)
    return "succeeded" if done else "discarded: job cancelled or taken over"


@app.task(name=DELIVER_TASK, bind=True)
def deliver_webhook(self, delivery_id: str) -> str:
    """One attempt of a webhook delivery; schedules the next one when it is to be retried."""
    settings = get_settings()
    try:
        delay = webhooks.attempt(settings.db_url, delivery_id, settings)
    except TRANSIENT as e:  # the database is briefly away: the sweeper re-sends it if this fails too
        raise self.retry(exc=e, countdown=_backoff(self.request.retries), max_retries=settings.task_max_retries) from e
    if delay is None:
        return "done"
    send_deliveries([delivery_id], countdown=delay)
    return f"retry in {delay:g} s"
