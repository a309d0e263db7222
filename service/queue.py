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
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from layertrack.workers.errors import LayertrackError
from sqlalchemy.exc import OperationalError

from . import jobs, webhooks
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
    send_deliveries(jobs.fail(db_url, job_id, worker, code, message).deliveries, db_url=db_url)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


class Progress:
    """What a job of a remote checkpoint shows as ``progress``: ``phase`` (fetching, waiting,
    scoring), ``bytes_done``, ``bytes_total``, ``seconds`` (of the phase), ``message``, and
    ``waiting_since`` once it has waited for an incomplete upload (kept until the job ends,
    so the deadline counts from the first wait). The fetch reports to it from any thread; a
    thread of its own writes it to the job at most every ``interval_s`` (which counts as a
    heartbeat), and phase changes are written at once. A failed write is logged and tried
    again at the next change: progress never stops a fetch."""

    def __init__(self, db_url: str, job_id: str, worker: str, interval_s: float, previous: dict | None):
        self.db_url, self.job_id, self.worker, self.interval_s = db_url, job_id, worker, interval_s
        self.state: dict[str, Any] = {"phase": "fetching", "bytes_done": None, "bytes_total": None, "seconds": None,
                                      "message": None}
        if previous and previous.get("waiting_since"):
            self.state["waiting_since"] = previous["waiting_since"]
            self.state["looks"] = previous.get("looks", 0)
        self._lock = threading.Lock()
        self._dirty = False
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Progress:
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                state = self.state
                if state["phase"] == "fetching" and state.get("bytes_total") is not None:
                    self._show_fetch(state["bytes_done"] or 0, state["bytes_total"])  # the clock runs on
            self.flush()

    def _show_fetch(self, done: int, total: int) -> None:
        seconds = time.monotonic() - self._t0
        pct = f" ({100 * done / total:.0f} %)" if total else ""
        self.state.update(bytes_done=done, bytes_total=total, seconds=round(seconds, 3),
                          message=f"fetching {_size(done)} of {_size(total)}{pct}, {seconds:.1f} s")
        self._dirty = True

    def phase(self, phase: str, message: str, **fields: Any) -> None:
        """Enter a phase (its clock starts) and write it now."""
        with self._lock:
            self._t0 = time.monotonic()
            self.state.update({"phase": phase, "message": message, "seconds": 0.0, **fields})
            self._dirty = True
        self.flush()

    def fetched(self, done: int, total: int) -> None:
        """The fetch's progress callback: bytes of the checkpoint present in the cache so far."""
        with self._lock:
            self._show_fetch(done, total)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.state)

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            state, self._dirty = dict(self.state), False
        try:
            jobs.set_progress(self.db_url, self.job_id, self.worker, state)
        except Exception as e:
            log.warning("progress of job %s not written: %s", self.job_id, e)
            with self._lock:
                self._dirty = True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()


def _fetch_and_score(settings: Settings, job: jobs.ClaimedJob, worker: str, progress: Progress,
                     options: Any) -> tuple[Any, Any, Path]:
    """Resolve and list a remote checkpoint, then fetch it into the cache while scoring it
    (weights in block order, each block as soon as its file is in: workers.remote);
    (result, cache, local directory). Records the content fingerprint and the resolved
    revision on the job. Raises the store's errors (LayertrackError: checkpoint_not_found,
    access_denied, store_unreachable, checkpoint_incomplete, ...)."""
    from layertrack.workers import fetch, locations, remote, stores  # the store clients: worker side only

    jobs.check_remote(job.uri, settings.remote_roots)  # the worker's own allowed locations too
    loc = locations.parse(job.uri)
    store = stores.open_store(loc, allow_hosts=settings.fetch_allow_hosts)
    progress.phase("fetching", f"resolving {loc.uri()}")
    resolved = store.resolve()
    files = stores.checkpoint_files(store.list(), store, allow_pickle=bool(job.config.get("allow_pickle")))
    total = sum(f.size for f in files)
    jobs.record_source(settings.db_url, job.id, worker, content_fingerprint=stores.fingerprint(loc, files, resolved),
                       resolved_revision=resolved)
    progress.phase("fetching", f"fetching {len(files)} files, {_size(total)}, scoring as they arrive",
                   bytes_done=0, bytes_total=total, files=len(files))
    cache = fetch.Cache(settings.cache_root, settings.cache_max_bytes)
    before = cache.bytes_fetched

    def fetched(seconds: float) -> None:
        new = cache.bytes_fetched - before
        source = ("all from the cache" if new == 0 else "" if new >= total else
                  f"{_size(new)} from the store, the rest from the cache")
        progress.phase("scoring", f"fetched {_size(total)} in {seconds:.1f} s"
                       + (f" ({source})" if source else "") + "; scoring",
                       bytes_done=total, fetch_s=round(seconds, 3), bytes_fetched=new)

    out = remote.fetch_and_score(store, files, cache, config=options, progress=progress.fetched, on_fetched=fetched)
    return out.result, cache, Path(out.checkout)


def _wait_for_upload(settings: Settings, job: jobs.ClaimedJob, worker: str, progress: Progress,
                     e: LayertrackError) -> str:
    """The checkpoint is still being uploaded: put the job back in the queue (status
    ``queued``, progress phase ``waiting`` saying why and when it looks again), due after a
    back-off that doubles with each look; past ``incomplete_deadline_s`` since the first
    look that found it incomplete, fail it (``checkpoint_incomplete``)."""
    t = jobs.now()
    state = progress.snapshot()
    since = datetime.fromisoformat(state["waiting_since"]) if state.get("waiting_since") else t
    waited = (t - since).total_seconds()
    deadline = settings.incomplete_deadline_s
    looks = int(state.get("looks") or 0)
    if waited >= deadline:
        progress.phase("waiting", f"gave up waiting for the upload after {waited:.0f} s ({e.message})",
                       seconds=round(waited, 3), bytes_done=None, bytes_total=None, looks=looks + 1)
        _failed(settings.db_url, job.id, worker, e.code,
                f"the checkpoint was still incomplete after waiting {waited:.0f} s (LAYERTRACK_INCOMPLETE_DEADLINE_S "
                f"is {deadline:g} s): {e.message}. Finish the upload, then retry the job")
        return f"failed: {e.code}"
    delay = min(settings.incomplete_backoff_s * 2 ** min(looks, 30), settings.incomplete_backoff_max_s,
                deadline - waited)
    delay = max(delay, 0.5)
    due = t + timedelta(seconds=delay)
    waiting = {
        "phase": "waiting", "bytes_done": None, "bytes_total": None, "seconds": round(waited, 3),
        "message": f"waiting for the upload to finish ({e.message}); looking again in {delay:.0f} s, giving up at "
                   f"{_iso(since + timedelta(seconds=deadline))}",
        "waiting_since": since.isoformat(), "looks": looks + 1, "next_look_at": _iso(due),
    }
    if not jobs.defer(settings.db_url, job.id, worker, delay_s=delay, progress=waiting):
        return "discarded: job cancelled or taken over"
    send_job(settings.db_url, job.id, countdown=delay)  # if it fails, the sweeper sends it sooner: harmless
    log.info("job %s: checkpoint incomplete (%s); looking again in %.0f s", job.id, e.message, delay)
    return f"waiting: {e.code}"


@app.task(name=SCORE_TASK, bind=True)
def score(self, job_id: str) -> str:
    """Claim the job, score its checkpoint with a heartbeat running, store the result.

    The job is claimed before the compute side (torch) is imported: a fresh worker takes
    seconds to import it, and a message taken but not claimed that long would look lost to
    the sweeper.

    A remote checkpoint (s3://, gs://, az://, hf://, http(s)://) is first resolved, listed
    and fetched into the cache (``LAYERTRACK_CACHE_DIR``), with its progress written to the
    job; the fetched directory is then scored like a local one. Its store's errors fail the
    job with their code, except the transient ones: ``checkpoint_incomplete`` (an upload in
    progress) puts the job back to ``queued`` with progress phase ``waiting`` until
    ``incomplete_deadline_s``, and ``store_unreachable`` (and ``checksum_mismatch``) is
    retried with back-off (2, 4, ... 64 s) up to ``fetch_max_retries`` times."""
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
    remote = jobs.is_remote(job.uri)
    progress = Progress(db_url, job_id, worker, settings.progress_interval_s, job.progress).start() if remote else None
    fetched: tuple[Any, Path] | None = None
    try:
        from layertrack.workers.scoring import ScoreConfig, score_checkpoint  # the compute side: torch

        options = ScoreConfig(**jobs.score_options(job.config), max_memory=settings.max_memory)
        if remote:
            result, cache, path = _fetch_and_score(settings, job, worker, progress, options)
            fetched = (cache, path)
        else:
            result = score_checkpoint(job.uri, config=options, roots=jobs.require_roots(settings.roots))
    except LayertrackError as e:
        if remote and e.code == "checkpoint_incomplete":
            return _wait_for_upload(settings, job, worker, progress, e)
        if remote and e.transient:
            if self.request.retries < settings.fetch_max_retries:
                delay = _backoff(self.request.retries)
                shown = {**progress.snapshot(), "message": f"{e.code}: {e.message}; trying again in {delay} s "
                         f"(retry {self.request.retries + 1} of {settings.fetch_max_retries})"}
                progress.close()
                jobs.release(db_url, job_id, worker, delay_s=delay, progress=shown)
                raise self.retry(exc=e, countdown=delay, max_retries=settings.fetch_max_retries) from e
            _failed(db_url, job_id, worker, e.code, f"{e.message} (gave up after {self.request.retries} retries)")
            return f"failed: {e.code}"
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
        if progress is not None:
            progress.close()
        stop.set()
        beat.join(timeout=5)
        if fetched is not None:
            with suppress(Exception):
                fetched[0].release(fetched[1])
    done = jobs.complete(db_url, job_id, worker, result.to_dict(), jobs.job_metrics(job.config))
    send_deliveries(done.deliveries, db_url=db_url)
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
    send_deliveries([delivery_id], countdown=delay, db_url=settings.db_url)
    return f"retry in {delay:g} s"
