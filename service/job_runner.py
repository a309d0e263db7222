"""The job runner: what a score task does with one job. Claim → score → complete.

:func:`run` claims the job, scores its checkpoint (a remote one fetched into the cache as it
is scored) with a heartbeat running, and stores the result. It never talks to the broker:
it hands back an :class:`Outcome` (the webhook deliveries to send, and whether the job is to
be sent again later), which the task (``queue.score``) sends.

Every failure is recorded with the code of an error class of ``workers/errors.py``
(:func:`job_error` maps the exceptions that are not one: the time limit, a database or
broker that stays away, a bug). Two kinds of failure are retried rather than recorded, by
re-raising the exception for the task's declared retry (``autoretry_for=RETRIED``, back-off
:func:`retry_delay`), the job first given back to the queue:

- the database or the broker briefly unreachable (:data:`TRANSIENT`): up to
  ``task_max_retries`` times;
- a remote store's transient errors (``store_unreachable``, ``checksum_mismatch``): while
  the next attempt would start within ``fetch_retry_budget_s`` of the job's first such
  failure (and at most ``fetch_max_retries`` times), the job's progress saying why and until
  when it retries (:func:`store_retry`). The first failure's time and the count are kept in
  the job's progress, so a worker restart does not start the budget again.

A remote checkpoint still being uploaded (``checkpoint_incomplete``) is neither: the job
goes back to ``queued`` (progress phase ``waiting``) and is sent again when it is due.
"""

from __future__ import annotations

import logging
import threading
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from layertrack.workers.errors import (
    CheckpointIncomplete,
    ChecksumMismatch,
    InternalError,
    LayertrackError,
    ServiceUnreachable,
    StoreUnreachable,
    TimeLimitExceeded,
)
from layertrack.workers.vocabulary import DYNAMICS_METRICS
from sqlalchemy.exc import OperationalError

from . import jobs
from .job_progress import Progress, iso, size
from .settings import Settings, get_settings

log = logging.getLogger("layertrack.job_runner")

#: failures worth another try: the database or the broker was briefly unreachable
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)
#: a remote store's errors worth another try (a store that is down, a transfer cut short)
STORE_TRANSIENT = (StoreUnreachable, ChecksumMismatch)
#: what the score task retries (its ``autoretry_for``); the runner re-raises one of these
#: only when the job is to be retried, and records it as failed once its cap is reached
RETRIED = TRANSIENT + STORE_TRANSIENT
#: the tasks' back-off: 2, 4, 8, ... seconds, at most 64 (``retry_backoff``, ``retry_backoff_max``)
RETRY_BACKOFF_S = 2
RETRY_BACKOFF_MAX_S = 64


def retry_delay(retries: int) -> int:
    """Seconds before retry number ``retries + 1``, as the tasks' declared back-off computes
    them (Celery's exponential back-off without jitter): 2, 4, 8, ... 64."""
    return get_exponential_backoff_interval(RETRY_BACKOFF_S, retries, RETRY_BACKOFF_MAX_S, full_jitter=False)


def max_retries(settings: Settings) -> int:
    """The score task's cap on retries: the larger of the two caps the runner applies."""
    return max(settings.task_max_retries, settings.fetch_max_retries)


@dataclass
class Outcome:
    """What running a job came to. ``summary``: the task's result ("succeeded", "failed:
    CODE", "waiting: CODE", "skipped: ...", "discarded: ..."); ``deliveries``: the webhook
    deliveries it stored, to send; ``send_in``: the job went back to the queue and is due in
    this many seconds (its message is to be sent with that countdown)."""

    summary: str
    deliveries: list[str] = field(default_factory=list)
    send_in: float | None = None


def job_error(e: Exception, settings: Settings) -> LayertrackError:
    """The error a failure of scoring is recorded as: a LayertrackError as it is; the time
    limit, a database or broker still unreachable, and anything else as their classes."""
    if isinstance(e, LayertrackError):
        return e
    if isinstance(e, SoftTimeLimitExceeded):
        return TimeLimitExceeded(f"the job ran longer than {settings.task_soft_time_limit} s and was stopped")
    if isinstance(e, TRANSIENT):
        return ServiceUnreachable(f"{type(e).__name__}: {e}")
    return InternalError(f"{type(e).__name__}: {e}")


def retry_cap(e: Exception, *, remote: bool, settings: Settings) -> int | None:
    """How many retries a failure gets (None: it is recorded at once)."""
    if isinstance(e, TRANSIENT):
        return settings.task_max_retries
    if remote and isinstance(e, STORE_TRANSIENT):
        return settings.fetch_max_retries
    return None


@dataclass(frozen=True)
class StoreRetry:
    """What to do after an attempt whose store could not be reached: ``since``, the job's
    first such failure; ``failures``, the attempts that failed so (this one included);
    ``deadline``, ``since`` + ``fetch_retry_budget_s``; ``delay``, seconds before the next
    attempt, or None to give up (``bound`` names the setting that stops it)."""

    since: datetime
    failures: int
    deadline: datetime
    delay: int | None
    bound: str = ""


def store_retry(previous: dict[str, Any] | None, now: datetime, retries: int, settings: Settings) -> StoreRetry:
    """Whether a job whose store just failed (a transient failure) is tried again:
    ``previous``, the job's progress (``store_failing_since``, ``store_failures`` of the
    earlier attempts); ``retries``, the task's retries so far (the next attempt comes after
    :func:`retry_delay` of it). Retried only if that attempt would start by the deadline and
    the retries are fewer than ``fetch_max_retries``."""
    previous = previous or {}
    since = datetime.fromisoformat(previous["store_failing_since"]) if previous.get("store_failing_since") else now
    failures = int(previous.get("store_failures") or 0) + 1
    deadline = since + timedelta(seconds=settings.fetch_retry_budget_s)
    delay = retry_delay(retries)
    if retries >= settings.fetch_max_retries:
        return StoreRetry(since, failures, deadline, None,
                          f"LAYERTRACK_FETCH_MAX_RETRIES is {settings.fetch_max_retries}")
    if now + timedelta(seconds=delay) > deadline:
        return StoreRetry(since, failures, deadline, None,
                          f"LAYERTRACK_FETCH_RETRY_BUDGET_S is {settings.fetch_retry_budget_s:g} s")
    return StoreRetry(since, failures, deadline, delay)


def clock(t: datetime, now: datetime) -> str:
    """A time for a message: "14:32:05 UTC", with the date when it is not today's."""
    t = t.astimezone(UTC)
    return t.strftime("%H:%M:%S UTC" if t.date() == now.astimezone(UTC).date() else "%Y-%m-%d %H:%M:%S UTC")


def run(job_id: str, *, worker: str, retries: int, settings: Settings | None = None) -> Outcome:
    """Claim the job, score its checkpoint with a heartbeat running, store the result.
    ``retries``: how many times the task was retried before this attempt. Raises one of
    :data:`RETRIED` when the job is to be tried again (the job is back in the queue).

    The job is claimed before the compute side (torch) is imported: a fresh worker takes
    seconds to import it, and a message taken but not claimed that long would look lost to
    the sweeper."""
    settings = settings or get_settings()
    db_url = settings.db_url
    try:
        job = jobs.claim(db_url, job_id, worker)
    except TRANSIENT:
        if retries < settings.task_max_retries:
            raise
        log.exception("job %s: the database stayed unreachable; the sweeper sends it again", job_id)
        return Outcome("skipped: database unreachable")
    if job is None:
        return Outcome("skipped: not queued")
    log.info("job %s: scoring %s (attempt %d)", job_id, job.uri, job.attempts)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(db_url, job_id, worker, settings.heartbeat_s, stop), daemon=True)
    beat.start()
    remote = jobs.is_remote(job.uri)
    progress = Progress(db_url, job_id, worker, settings.progress_interval_s, job.progress).start() if remote else None
    fetched: tuple[Any, Path] | None = None
    try:
        from layertrack.workers.scoring import ScoreConfig, score_checkpoint  # the compute side: torch

        earlier, absent = _earlier(settings, job)
        options = ScoreConfig(**jobs.score_options(job.config), max_memory=settings.max_memory,
                              compare_to=None if earlier is None else earlier.uri)
        if remote:
            result, cache, path = _fetch_and_score(settings, job, worker, progress, options)
            fetched = (cache, path)
        else:
            result = score_checkpoint(job.uri, config=options, roots=jobs.require_roots(settings.roots),
                                      expect_fingerprint=job.fingerprint)
    except Exception as e:
        err = job_error(e, settings)
        if remote and isinstance(err, CheckpointIncomplete):
            return _wait_for_upload(settings, job, worker, progress, err)
        cap = retry_cap(e, remote=remote, settings=settings)
        if remote and cap is not None and isinstance(e, STORE_TRANSIENT):
            plan = store_retry(progress.snapshot(), jobs.now(), retries, settings)
            if plan.delay is not None:
                _retry_store(settings, job, worker, progress, err, plan)
                raise  # the task's declared retry sends it again after retry_delay(retries)
            return _give_up_on_store(settings, job, worker, progress, err, plan)
        if cap is not None and retries < cap:
            _give_back(settings, job, worker, progress, err, retries, cap)
            raise  # the task's declared retry sends it again after retry_delay(retries)
        if isinstance(err, InternalError):
            log.exception("job %s failed", job_id)
        return _fail(db_url, job_id, worker, err,
                     err.message if cap is None else f"{err.message} (gave up after {retries} retries)")
    finally:
        if progress is not None:
            progress.close()
        stop.set()
        beat.join(timeout=5)
        if fetched is not None:
            with suppress(Exception):
                fetched[0].release(fetched[1])
    stored = result.to_dict()
    stored.pop("dynamics", None)  # recorded below when asked for, with the earlier step
    metrics = jobs.job_metrics(job.config)
    if result.dynamics is not None and "absent" not in result.dynamics:
        stored["dynamics"] = {**result.dynamics, "step": earlier.step, "same_run": earlier.run_id == job.run_id,
                              **({"named": job.config["compare_to"]} if "compare_to" in job.config else {})}
        drift = result.dynamics.get("drift_cka") or {}
        metrics += [m for m in DYNAMICS_METRICS if m != "drift_cka" or "absent" not in drift]
    elif absent is not None or result.dynamics is not None:
        stored["dynamics"] = {"absent": absent or result.dynamics["absent"]}
    done = jobs.complete(db_url, job_id, worker, stored, metrics)
    return Outcome("succeeded" if done else "discarded: job cancelled or taken over", done.deliveries)


def _earlier(settings: Settings, job: jobs.ClaimedJob) -> tuple[jobs.Earlier | None, str | None]:
    """The checkpoint to measure weight_update against, or why there is none (None, None:
    not asked for). The job option ``dynamics``: None measures it when the run's previous
    scored checkpoint is on a local path, True also says why when it cannot, False never."""
    wanted = job.config.get("dynamics")
    if wanted is False:
        return None, None
    named = job.config.get("compare_to")
    if isinstance(named, int) and not isinstance(named, bool):  # a step of the run
        earlier = jobs.checkpoint_at(settings.db_url, job.run_id, named)
        if earlier is None:
            return None, f"config.compare_to names step {named}, which the run has no checkpoint at"
        wanted = True
    elif isinstance(named, str):  # a location under the checkpoint roots
        earlier, wanted = jobs.Earlier(None, None, named, None), True
    else:
        earlier = jobs.previous_checkpoint(settings.db_url, job)
    if earlier is None:
        return None, ("no earlier checkpoint to compare with: the run has no scored step before this one"
                      if wanted else None)
    what = f"step {earlier.step}" if earlier.step is not None else "config.compare_to"
    if jobs.is_remote(earlier.uri):
        return None, (f"the earlier checkpoint ({what}) is remote ({earlier.uri}); weight_update reads "
                      "earlier checkpoints from local paths only" if wanted else None)
    from layertrack.workers.checkpoint import inspect_checkpoint, resolve_checkpoint_path
    from layertrack.workers.errors import CheckpointError

    try:
        info = inspect_checkpoint(resolve_checkpoint_path(earlier.uri, jobs.require_roots(settings.roots)),
                                  check_causal_lm=False)
    except CheckpointError as e:
        return None, (f"the earlier checkpoint ({what}, {earlier.uri}) cannot be read ({e.code}): "
                      f"{e.message}")
    if earlier.fingerprint is not None and info.fingerprint != earlier.fingerprint:
        return None, (f"the earlier checkpoint ({what}, {earlier.uri}) was written again since it was "
                      "scored: its weights are no longer the ones its scores describe")
    return earlier, None


def _heartbeat(db_url: str, job_id: str, worker: str, period: float, stop: threading.Event) -> None:
    while not stop.wait(period):
        try:
            if not jobs.heartbeat(db_url, job_id, worker):
                log.info("job %s is no longer ours (cancelled or re-queued)", job_id)
        except Exception as e:  # keep beating: one missed beat is not a dead worker
            log.warning("heartbeat for job %s failed: %s", job_id, e)


def _fail(db_url: str, job_id: str, worker: str, err: LayertrackError, message: str) -> Outcome:
    return Outcome(f"failed: {err.code}", jobs.fail(db_url, job_id, worker, err.code, message).deliveries)


def _give_back(settings: Settings, job: jobs.ClaimedJob, worker: str, progress: Progress | None,
               err: LayertrackError, retries: int, cap: int) -> None:
    """Put the job back in the queue before its retry, due when the retry's message is (so
    the sweeper does not count it as waiting for one before); a remote job shows why and
    when it tries again."""
    delay = retry_delay(retries)
    shown = None
    if progress is not None:
        shown = {**progress.snapshot(), "message": f"{err.code}: {err.message}; trying again in {delay} s "
                 f"(retry {retries + 1} of {cap})"}
        progress.close()
    jobs.release(settings.db_url, job.id, worker, delay_s=delay, progress=shown)


def _store_fields(plan: StoreRetry) -> dict[str, Any]:
    return {"store_failing_since": iso(plan.since), "store_failures": plan.failures, "retry_until": iso(plan.deadline)}


def _retry_store(settings: Settings, job: jobs.ClaimedJob, worker: str, progress: Progress, err: LayertrackError,
                 plan: StoreRetry) -> None:
    """Put the job back in the queue, due in ``plan.delay`` seconds (when the task's retry
    message is), its progress (phase ``retrying``) saying why and until when it retries, and
    keeping when the failures began."""
    t = jobs.now()
    shown = {**progress.snapshot(), **_store_fields(plan), "phase": "retrying", "seconds": None,
             "message": f"{err.code}: {err.message}; retrying until {clock(plan.deadline, t)} "
                        f"(attempt {plan.failures + 1} in {plan.delay} s)"}
    progress.close()
    jobs.release(settings.db_url, job.id, worker, delay_s=plan.delay or 0, progress=shown)
    log.info("job %s: %s; attempt %d in %d s", job.id, err.message, plan.failures + 1, plan.delay)


def _give_up_on_store(settings: Settings, job: jobs.ClaimedJob, worker: str, progress: Progress,
                      err: LayertrackError, plan: StoreRetry) -> Outcome:
    """Fail the job: its store could not be reached by the deadline (or the retries ran out)."""
    t = jobs.now()
    message = (f"{err.message}; gave up after {plan.failures} attempt{'s' if plan.failures != 1 else ''} "
               f"over {(t - plan.since).total_seconds():.0f} s since the first failure at {clock(plan.since, t)} "
               f"({plan.bound})")
    progress.note(f"{err.code}: {message}", **_store_fields(plan))
    return _fail(settings.db_url, job.id, worker, err, message)


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
    progress.phase("fetching", f"fetching {len(files)} files, {size(total)}, scoring as they arrive",
                   bytes_done=0, bytes_total=total, files=len(files))
    cache = fetch.Cache(settings.cache_root, settings.cache_max_bytes)
    before = cache.bytes_fetched

    def fetched(seconds: float) -> None:
        new = cache.bytes_fetched - before
        source = ("all from the cache" if new == 0 else "" if new >= total else
                  f"{size(new)} from the store, the rest from the cache")
        progress.phase("scoring", f"fetched {size(total)} in {seconds:.1f} s"
                       + (f" ({source})" if source else "") + "; scoring",
                       bytes_done=total, fetch_s=round(seconds, 3), bytes_fetched=new)

    out = remote.fetch_and_score(store, files, cache, config=options, progress=progress.fetched, on_fetched=fetched)
    return out.result, cache, Path(out.checkout)


def _wait_for_upload(settings: Settings, job: jobs.ClaimedJob, worker: str, progress: Progress,
                     err: CheckpointIncomplete) -> Outcome:
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
        progress.phase("waiting", f"gave up waiting for the upload after {waited:.0f} s ({err.message})",
                       seconds=round(waited, 3), bytes_done=None, bytes_total=None, looks=looks + 1)
        return _fail(settings.db_url, job.id, worker, err,
                     f"the checkpoint was still incomplete after waiting {waited:.0f} s "
                     f"(LAYERTRACK_INCOMPLETE_DEADLINE_S is {deadline:g} s): {err.message}. "
                     "Finish the upload, then retry the job")
    delay = min(settings.incomplete_backoff_s * 2 ** min(looks, 30), settings.incomplete_backoff_max_s,
                deadline - waited)
    delay = max(delay, 0.5)
    due = t + timedelta(seconds=delay)
    waiting = {
        "phase": "waiting", "bytes_done": None, "bytes_total": None, "seconds": round(waited, 3),
        "message": f"waiting for the upload to finish ({err.message}); looking again in {delay:.0f} s, giving up at "
                   f"{iso(since + timedelta(seconds=deadline))}",
        "waiting_since": since.isoformat(), "looks": looks + 1, "next_look_at": iso(due),
    }
    if not jobs.defer(settings.db_url, job.id, worker, delay_s=delay, progress=waiting):
        return Outcome("discarded: job cancelled or taken over")
    log.info("job %s: checkpoint incomplete (%s); looking again in %.0f s", job.id, err.message, delay)
    return Outcome(f"waiting: {err.code}", send_in=delay)
