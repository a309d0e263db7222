"""The sweeper (:func:`sweep`, run every ``sweep_interval_s`` by the API process) keeps the
broker in step with the database without letting the queues grow:

- a running job whose heartbeat stopped (its worker died) is put back to ``queued`` unsent;
- an item never handed to the broker (a job with ``enqueued_at`` NULL: the broker was down
  at submission, or the job was just re-queued; a due delivery with ``sent_at`` NULL:
  sending its message failed) is sent;
- an item that was sent but not taken is re-sent only when its message is **presumed
  lost**: the broker's queue holds fewer messages (``queue_declare(passive=True)
  .message_count``: Redis, AMQP and the filesystem transport of the embedded setup all
  count) than there are items sent more than a second ago and not yet taken (queued jobs;
  pending deliveries that are due, so one whose retry message has a future ETA, or whose
  attempt is under way, is not counted), in two measurements a second apart (a worker
  that has taken a message but not yet claimed its item makes a shortfall for a few
  milliseconds; a lost message makes one for good). Only then, and at most the smaller
  shortfall, the oldest-sent of those items are re-sent, each no sooner than
  ``base · 2**resends`` (at most ``base · 64``) after its last send (and, for a delivery,
  after it fell due), where ``base`` is ``requeue_after_s`` for jobs and
  ``min(requeue_after_s, 30 s)`` for deliveries. A job merely waiting in a long queue has
  its message in the queue and is never re-sent, so with no worker running the queues hold
  one message per item. A guess that re-sends the wrong item leaves one extra message,
  which then counts towards the queue, so extra messages do not accumulate; the task runs
  once either way (the row is the truth). When the transport cannot count messages, the
  per-item back-off alone limits re-sends; when the broker cannot be reached, nothing is
  re-sent.
- Re-sends are counted per row (``jobs.resends``, ``webhook_deliveries.resends``) and shown
  in ``/metrics`` (``layertrack_job_resends_total``, ``layertrack_delivery_resends_total``).
- On PostgreSQL one sweeper runs at a time (a transaction-level advisory lock), so several
  API processes do not each re-send the same shortfall.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, text, update

from . import jobs, queue, webhooks
from .db import session_scope
from .models import Delivery, HookReceipt, Job, JobStatus
from .queue import GPU_QUEUE, WEBHOOK_QUEUE, send_job, try_send_deliveries

log = logging.getLogger("layertrack.sweeper")


def queued_messages(names: Iterable[str]) -> dict[str, int | None] | None:
    """Messages waiting in each broker queue (not those a worker has taken); None for a
    queue the transport cannot count; None instead of the dict when the broker cannot be
    reached. A queue the broker does not know (Redis drops an empty list) holds 0."""
    try:
        with queue.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
            return {name: _count(conn, name) for name in names}
    except Exception as e:
        log.warning("broker unreachable, nothing re-sent this sweep (%s: %s)", type(e).__name__, e)
        return None


def _count(conn, name: str) -> int | None:
    channel = conn.channel()
    try:
        return channel.queue_declare(queue=name, passive=True).message_count
    except conn.channel_errors as e:
        if getattr(e, "code", None) == 404 or "NOT_FOUND" in str(e):  # AMQP 404, kombu's NOT_FOUND
            return 0
        log.warning("cannot count the messages of queue %s (%s: %s)", name, type(e).__name__, e)
        return None
    finally:
        with suppress(Exception):  # AMQP has closed the channel itself after a 404
            channel.close()


#: an item sent less than this long ago may still be on its way into the broker: not counted
IN_TRANSIT_S = 1.0
#: the back-off between re-sends of one item doubles at most this many times
RESEND_MAX_DOUBLINGS = 6
#: a shortfall of messages is measured again after this long before anything is re-sent
RECHECK_S = 1.0
#: most items sent per kind and sweep
SWEEP_BATCH = 500
#: key of the PostgreSQL advisory lock that lets one sweeper run at a time
SWEEP_LOCK = 0x6C74_7377  # "ltsw"


def backed_off(t: datetime, base_s: float, resends: ColumnElement[int],
               *times: ColumnElement[datetime]) -> ColumnElement[bool]:
    """SQL: each of ``times`` lies more than ``base_s · 2**resends`` (at most
    ``2**RESEND_MAX_DOUBLINGS``) before ``t``."""
    clauses = []
    for k in range(RESEND_MAX_DOUBLINGS + 1):
        cut = t - timedelta(seconds=base_s * 2**k)
        which = resends == k if k < RESEND_MAX_DOUBLINGS else resends >= k
        clauses.append(and_(which, *(col < cut for col in times)))
    return or_(*clauses)


@contextmanager
def _one_sweeper(db_url: str) -> Iterator[bool]:
    """True when this sweep may run: on PostgreSQL, holds a transaction-level advisory lock
    for the sweep (False when another API process is sweeping); elsewhere always True."""
    if not db_url.startswith("postgresql"):
        yield True
        return
    with session_scope(db_url) as s:
        yield bool(s.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": SWEEP_LOCK}))


def _shortfalls(db_url: str) -> dict[str, int | None] | None:
    """Per queue, how many more items wait for a message than the broker holds (None: the
    transport cannot count); None when the broker cannot be reached."""
    cut = jobs.now() - timedelta(seconds=IN_TRANSIT_S)
    with session_scope(db_url) as s:
        waiting_jobs = s.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.queued, Job.enqueued_at < cut)) or 0
    waiting = {GPU_QUEUE: waiting_jobs, WEBHOOK_QUEUE: webhooks.awaiting(db_url, cut)}
    counts = queued_messages(waiting)
    if counts is None:
        return None
    return {name: None if counts[name] is None else max(n - counts[name], 0) for name, n in waiting.items()}


def _lost(db_url: str) -> dict[str, int]:
    """How many messages of each queue to presume lost (at most SWEEP_BATCH). A shortfall
    must show in two measurements RECHECK_S apart: a worker that has taken a message but
    not yet claimed its item makes one for a few milliseconds, a lost message for good."""
    first = _shortfalls(db_url)
    if first is None:
        return {GPU_QUEUE: 0, WEBHOOK_QUEUE: 0}
    if any(first.values()):
        time.sleep(RECHECK_S)
        again = _shortfalls(db_url)
        if again is None:
            return {GPU_QUEUE: 0, WEBHOOK_QUEUE: 0}
        first = {q: None if n is None or again[q] is None else min(n, again[q]) for q, n in first.items()}
    # a transport that cannot count: the per-item back-off alone limits re-sends
    return {q: SWEEP_BATCH if n is None else min(n, SWEEP_BATCH) for q, n in first.items()}


def _resend_jobs(db_url: str, t: datetime, base_s: float, limit: int) -> list[str]:
    if limit <= 0:
        return []
    with session_scope(db_url) as s:
        ids = s.scalars(
            select(Job.id)
            .where(Job.status == JobStatus.queued, Job.enqueued_at.is_not(None),
                   backed_off(t, base_s, Job.resends, Job.enqueued_at))
            .order_by(Job.enqueued_at, Job.id).limit(limit)
        ).all()
    sent = []
    for job_id in ids:
        if not send_job(db_url, job_id):
            break
        sent.append(job_id)
    if sent:
        with session_scope(db_url) as s:
            s.execute(update(Job).where(Job.id.in_(sent), Job.status == JobStatus.queued)
                      .values(enqueued_at=jobs.now(), resends=Job.resends + 1))
    return sent


def sweep(db_url: str, *, stale_after_s: float, requeue_after_s: float) -> dict[str, int]:
    """Re-queue jobs whose worker vanished; send the jobs and deliveries never sent; re-send
    those whose message is presumed lost (see the module's docstring); forget old
    inbound-hook receipts. What it did, by count."""
    with _one_sweeper(db_url) as mine:
        if not mine:
            return {"skipped": 1}
        return _sweep(db_url, stale_after_s=stale_after_s, requeue_after_s=requeue_after_s)


def _sweep(db_url: str, *, stale_after_s: float, requeue_after_s: float) -> dict[str, int]:
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
        unsent_jobs = s.scalars(
            select(Job.id).where(Job.status == JobStatus.queued, Job.enqueued_at.is_(None))
            .order_by(Job.queued_at).limit(SWEEP_BATCH)
        ).all()
    if stale:
        log.warning("re-queued %d job(s) whose worker stopped sending heartbeats: %s", len(stale), stale)
    sent = []
    for job_id in unsent_jobs:  # never sent: send now
        if not send_job(db_url, job_id):
            break
        sent.append(job_id)
    if sent:
        with session_scope(db_url) as s:
            s.execute(update(Job).where(Job.id.in_(sent), Job.status == JobStatus.queued, Job.enqueued_at.is_(None))
                      .values(enqueued_at=jobs.now()))
    first, _ = try_send_deliveries(webhooks.unsent(db_url, SWEEP_BATCH))
    webhooks.mark_sent(db_url, first)

    # sent but not taken: re-send only as many as the broker's queue is short of
    lost = _lost(db_url)
    t = jobs.now()
    resent_jobs = _resend_jobs(db_url, t, requeue_after_s, lost[GPU_QUEUE])
    base_s = min(requeue_after_s, webhooks.RESEND_AFTER_S)
    resent_deliveries, _ = try_send_deliveries(webhooks.resend_candidates(
        db_url, backed_off(t, base_s, Delivery.resends, Delivery.sent_at, Delivery.next_attempt_at),
        lost[WEBHOOK_QUEUE]))
    webhooks.mark_sent(db_url, resent_deliveries, resent=True)
    if resent_jobs or resent_deliveries:
        log.warning("re-sent %d job(s) and %d webhook deliveries whose message was presumed lost "
                    "(messages missing from the queues: %s)", len(resent_jobs), len(resent_deliveries), lost)
    with session_scope(db_url) as s:  # replays older than this fail the timestamp check anyway
        s.execute(delete(HookReceipt).where(HookReceipt.received_at < t - timedelta(hours=1)))
    return {"stale_requeued": len(stale), "sent": len(sent), "deliveries_sent": len(first),
            "jobs_resent": len(resent_jobs), "deliveries_resent": len(resent_deliveries)}
