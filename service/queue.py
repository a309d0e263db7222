"""The queue: the Celery application, its two tasks, and sending to it.

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

The sweeper (``sweeper.py``, run by the API process) sends what never reached the broker and
re-sends what it presumes lost.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from contextlib import contextmanager

from celery import Celery
from kombu.transport import redis as kombu_redis

from . import job_runner, jobs, webhooks
from .settings import Settings, get_settings

log = logging.getLogger("layertrack.queue")

SCORE_TASK = "layertrack.score"
DELIVER_TASK = "layertrack.deliver_webhook"
GPU_QUEUE = "gpu"
WEBHOOK_QUEUE = "webhooks"


class _RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, with one client for the commands it sends outside a consumer's
    loop (publishing among them) instead of a new ``redis.Redis`` for each message: building
    one costs about a fifth of a send. A ``redis.Redis`` is thread safe (each command takes a
    connection from the channel's pool), as kombu's fresh clients on that pool were."""

    _shared_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()
        yield self._shared_client


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above (``redis://`` and ``rediss://`` brokers)."""

    Channel = _RedisChannel


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    settings.ensure_dirs()
    app = Celery("layertrack", broker=settings.broker)
    if settings.broker.split("://", 1)[0] in ("redis", "rediss"):
        app.conf.broker_transport = f"{__name__}:RedisTransport"
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


SETTINGS = get_settings()  # the tasks' retry caps; each run reads the settings again
app = make_app(SETTINGS)


# ------------------------------------------------------------------ sending
def send_job(db_url: str, job_id: str, *, countdown: float = 0.0) -> bool:
    """The one way a job is sent to the broker: "score job X" on the ``gpu`` queue, to run
    ``countdown`` seconds from now. The caller has committed the job as queued with
    ``enqueued_at`` set (to when it is due). When the broker cannot be reached, ``enqueued_at``
    is cleared, so the sweeper sends the job once the broker is back, and False is returned."""
    try:
        app.send_task(SCORE_TASK, args=[job_id], queue=GPU_QUEUE, countdown=countdown or None, retry=False)
    except Exception as e:
        log.warning("could not enqueue job %s (%s: %s); the sweeper will retry", job_id, type(e).__name__, e)
        jobs.mark_unsent(db_url, job_id)
        return False
    return True


def try_send_deliveries(ids: Iterable[str], countdown: float = 0.0) -> tuple[list[str], list[str]]:
    """Hand webhook deliveries to their queue; (sent, not sent). Stops at the first failure
    (the broker is away: the rest would fail too, each after a timeout)."""
    sent: list[str] = []
    failed: list[str] = []
    for delivery_id in ids:
        if failed:
            failed.append(delivery_id)
            continue
        try:
            app.send_task(DELIVER_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE,
                          countdown=countdown or None, retry=False)
            sent.append(delivery_id)
        except Exception as e:
            log.warning("could not queue webhook delivery %s (%s: %s)", delivery_id, type(e).__name__, e)
            failed.append(delivery_id)
    return sent, failed


def send_deliveries(ids: Iterable[str], *, countdown: float = 0.0, db_url: str | None = None) -> int:
    """Hand webhook deliveries to their queue; how many were sent. With ``db_url``, those
    that could not be sent are marked unsent, and the sweeper sends them once the broker is
    back; without it (an API route), their message counts as lost and the sweeper re-sends
    it after the back-off."""
    sent, failed = try_send_deliveries(ids, countdown)
    if failed and db_url:
        webhooks.mark_unsent(db_url, failed)
    return len(sent)


def broker_reachable() -> bool:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    return True

# ------------------------------------------------------------------ the tasks
#: the retries the tasks declare: exponential back-off 2, 4, 8, ... 64 s, no jitter
_RETRIES = dict(retry_backoff=job_runner.RETRY_BACKOFF_S, retry_backoff_max=job_runner.RETRY_BACKOFF_MAX_S,
                retry_jitter=False)


@app.task(name=SCORE_TASK, bind=True, autoretry_for=job_runner.RETRIED, max_retries=job_runner.max_retries(SETTINGS),
          **_RETRIES)
def score(self, job_id: str) -> str:
    """Run the job (``job_runner.run``: claim, score, complete) and send what it hands back:
    its webhook deliveries, and the job itself when it went back to the queue to wait for an
    upload. A database or broker briefly away (up to ``task_max_retries`` times) and a remote
    store's transient errors (within ``fetch_retry_budget_s`` of the first, at most
    ``fetch_max_retries`` times) are retried with back-off 2, 4, ... 64 s; the runner fails
    the job when its budget or cap is reached."""
    settings = get_settings()
    out = job_runner.run(job_id, worker=self.request.hostname or socket.gethostname(), retries=self.request.retries,
                         settings=settings)
    send_deliveries(out.deliveries, db_url=settings.db_url)
    if out.send_in is not None:
        send_job(settings.db_url, job_id, countdown=out.send_in)  # if it fails, the sweeper sends it sooner: harmless
    return out.summary


@app.task(name=DELIVER_TASK, bind=True, autoretry_for=job_runner.TRANSIENT, max_retries=SETTINGS.task_max_retries,
          **_RETRIES)
def deliver_webhook(self, delivery_id: str) -> str:
    """One attempt of a webhook delivery; schedules the next one when it is to be retried.
    The database briefly away is retried (the sweeper re-sends it if every retry fails)."""
    settings = get_settings()
    delay = webhooks.attempt(settings.db_url, delivery_id, settings)
    if delay is None:
        return "done"
    send_deliveries([delivery_id], countdown=delay, db_url=settings.db_url)
    return f"retry in {delay:g} s"
