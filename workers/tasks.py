"""The scoring task: a thin shell around ``score_checkpoint`` and the job's row."""

from __future__ import annotations

import logging
import socket
import threading

from celery.exceptions import SoftTimeLimitExceeded
from layertrack.service import jobs, webhooks
from layertrack.service.settings import get_settings
from sqlalchemy.exc import OperationalError

from .celery_app import SCORE_TASK, app

log = logging.getLogger("layertrack.worker")

#: failures worth another try: the database or the broker was briefly unreachable
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


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


@app.task(name=SCORE_TASK, bind=True)
def score(self, job_id: str) -> str:
    from .errors import LayertrackError
    from .scoring import ScoreConfig, score_checkpoint

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
    cfg = job.config
    try:
        result = score_checkpoint(
            job.uri,
            config=ScoreConfig(
                max_tokens=cfg.get("max_tokens"),
                seq_len=cfg.get("seq_len", 512),
                drop_first_token=cfg.get("drop_first_token", False),
                dtype=cfg.get("dtype"),
                replaceability=cfg.get("replaceability", False),
                holdout_tokens=cfg.get("holdout_tokens", 4096),
            ),
            roots=settings.roots,
        )
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
    done = jobs.complete(db_url, job_id, worker, result.to_dict(), cfg.get("metrics") or list(jobs.KNOWN_METRICS))
    webhooks.publish(done.deliveries)
    return "succeeded" if done else "discarded: job cancelled or taken over"


def _failed(db_url: str, job_id: str, worker: str, code: str, message: str) -> None:
    webhooks.publish(jobs.fail(db_url, job_id, worker, code, message).deliveries)


@app.task(name=webhooks.DELIVER_TASK, bind=True)
def deliver_webhook(self, delivery_id: str) -> str:
    """One attempt of a webhook delivery; schedules the next one when it is to be retried."""
    settings = get_settings()
    try:
        delay = webhooks.attempt(settings.db_url, delivery_id, settings)
    except TRANSIENT as e:  # the database is briefly away: the sweeper re-sends it if this fails too
        raise self.retry(exc=e, countdown=_backoff(self.request.retries), max_retries=settings.task_max_retries) from e
    if delay is None:
        return "done"
    webhooks.publish([delivery_id], countdown=delay)
    return f"retry in {delay:g} s"
