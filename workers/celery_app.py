"""The Celery application (imports no torch: the API enqueues through it by task name).

Start a worker with one process per GPU:

    celery -A layertrack.workers.celery_app worker -Q gpu -c 1 -n gpu0@%h

Scoring tasks go to the ``gpu`` queue, one at a time per worker process (prefetch 1), are
acknowledged only after they finish (acks late) and are given back to the broker when the
worker process dies (reject on worker lost). The job row in the database is the truth: a
task only says "look at job X", so running it twice is harmless.

Webhook deliveries go to the ``webhooks`` queue, served by a light worker of their own
(no GPU, no torch), so that a long scoring job never delays them:

    celery -A layertrack.workers.celery_app worker -Q webhooks -c 4 -n hooks@%h
"""

from __future__ import annotations

from celery import Celery
from layertrack.service.settings import get_settings
from layertrack.service.webhooks import DELIVER_TASK, WEBHOOK_QUEUE

SCORE_TASK = "layertrack.score"
GPU_QUEUE = "gpu"


def make_app() -> Celery:
    settings = get_settings()
    settings.ensure_dirs()
    app = Celery("layertrack", broker=settings.broker, include=["layertrack.workers.tasks"])
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
        # sweeper sends it later: see jobs.enqueue); a worker keeps reconnecting forever
        broker_connection_timeout=2,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
    )
    return app


app = make_app()
