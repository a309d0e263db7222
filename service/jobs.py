"""The worker side of a job: claim → heartbeat → progress → complete | fail | release |
defer; and what both sides agree on about a job (its metrics and score options, where its
checkpoint may be). Accepting a submission, and reading, cancelling and retrying a job, are
the API side (:mod:`submissions`).

The database row is the truth and every transition is one conditional UPDATE, so a task
delivered twice, a sweeper racing a worker, or a worker that died mid-job all end with the
job done once and one set of scores. Functions open their own transaction on a database
URL (``db.session_scope``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from layertrack.workers import locations  # stdlib only: no store client
from layertrack.workers.errors import CheckpointOutsideRoots, InvalidCheckpointURI
from layertrack.workers.vocabulary import (
    BASE_METRICS,
    LENS_METRICS,
    PER_LAYER_METRICS,
    PER_PAIR_METRICS,
    REPLACEABILITY_METRICS,
    SCORE_OPTIONS,
    JobStatus,
)
from sqlalchemy import ColumnElement, and_, delete, select, update

from . import alerts, webhooks
from .db import session_scope
from .models import Checkpoint, Job, Run, Score

log = logging.getLogger("layertrack.jobs")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def now() -> datetime:
    return datetime.now(UTC)


def job_metrics(config: dict[str, Any]) -> list[str]:
    """The metrics a job's config asks for (what a submission without ``metrics`` gets)."""
    if config.get("metrics"):
        return list(config["metrics"])
    return (list(BASE_METRICS) + (list(REPLACEABILITY_METRICS) if config.get("replaceability") else [])
            + (list(LENS_METRICS) if config.get("logit_lens") else []))


def score_options(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the worker's ScoreConfig in a job's config (absent keys keep
    the scoring defaults); the options are the vocabulary's SCORE_OPTIONS."""
    return {k: config[k] for k in SCORE_OPTIONS if config.get(k) is not None}


def is_remote(uri: str) -> bool:
    """Whether a checkpoint URI names anything but a local directory: it has a scheme other
    than ``file`` (one letter is a Windows drive, not a scheme)."""
    m = _SCHEME.match(uri.strip()) if isinstance(uri, str) else None
    return bool(m) and len(m.group(1)) > 1 and m.group(1).lower() != "file"


def provisional_fingerprint(uri: str) -> str:
    """A remote checkpoint's fingerprint as the API stores it: ``"uri:"`` + sha256 of the
    normalized URI (the API reads no remote data; the worker records the content fingerprint
    on the job). The same URI again gives the same job."""
    return "uri:" + hashlib.sha256(uri.encode()).hexdigest()


def _roots_env_advice(example: str) -> str:
    return (f"add a prefix that holds it (e.g. {example}) to {locations.ROOTS_ENV} of the API and the workers "
            "(entries separated by ',' or ':'), or start the service with `layertrack up --roots DIR_OR_PREFIX...`")


def check_remote(uri: str, remote_roots: list[locations.Location]) -> tuple[str, str]:
    """A remote checkpoint URI, validated without reaching the store: parsed (credentials
    refused), within an allowed prefix. (normalized URI, provisional fingerprint)."""
    loc = locations.parse(uri)
    if not loc.remote:  # "file:" in another case
        raise InvalidCheckpointURI(f"{uri!r} is not a remote URI")
    if not any(locations.within(loc, root) for root in remote_roots):
        allowed = ", ".join(r.uri() for r in remote_roots) or "none"
        parent = locations.Location(loc.scheme, loc.container, "").uri() if loc.scheme != "hf" else \
            f"hf://{loc.container.split('/', 1)[0]}/"
        raise CheckpointOutsideRoots(
            f"checkpoint {loc.uri()!r} is outside the allowed remote locations ({allowed}); "
            + _roots_env_advice(parent))
    return loc.uri(), provisional_fingerprint(loc.uri())


def require_roots(roots: list) -> list:
    """The allowed directories; refused when there are none (only remote prefixes are
    allowed), since no roots would mean no check at all."""
    if not roots:
        raise CheckpointOutsideRoots(
            "local checkpoints are not allowed: the allowed locations are remote prefixes only; "
            + _roots_env_advice("/ckpts"))
    return roots


# ------------------------------------------------------------------ the worker's transitions
@dataclass
class ClaimedJob:
    id: str
    uri: str
    run_id: int
    step: int
    config: dict[str, Any]
    attempts: int
    #: what the job showed when it was claimed (a remote checkpoint's last progress: when it
    #: started waiting for an incomplete upload); None for a local checkpoint
    progress: dict[str, Any] | None = None
    #: the checkpoint's identity when it was submitted (a local one's must still be it)
    fingerprint: str | None = None


def claim(db_url: str, job_id: str, worker: str) -> ClaimedJob | None:
    """Take a queued job (atomically); None when it is not queued (done, taken, cancelled)."""
    t = now()
    with session_scope(db_url) as s:
        got = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, worker=worker, started_at=t, heartbeat_at=t,
                    attempts=Job.attempts + 1, error=None, error_code=None)
            .returning(Job.id)
        ).first()
        if got is None:
            return None
        job = s.get(Job, job_id)
        return ClaimedJob(
            id=job.id, uri=job.checkpoint.uri, run_id=job.run_id, step=job.checkpoint.step,
            config=dict(job.config), attempts=job.attempts,
            progress=dict(job.progress) if job.progress is not None else None,
            fingerprint=job.checkpoint.fingerprint,
        )


def heartbeat(db_url: str, job_id: str, worker: str) -> bool:
    """Refresh the heartbeat; False when the job is no longer this worker's (cancelled...)."""
    with session_scope(db_url) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running, Job.worker == worker)
            .values(heartbeat_at=now())
        )
        return res.rowcount == 1


def _ours(job_id: str, worker: str) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.status == JobStatus.running, Job.worker == worker)


def set_progress(db_url: str, job_id: str, worker: str, progress: dict[str, Any]) -> bool:
    """Show what the worker is doing with a remote checkpoint (``progress``: phase, bytes done
    and total, seconds, message); counts as a heartbeat. False when the job is no longer this
    worker's."""
    with session_scope(db_url) as s:
        res = s.execute(update(Job).where(_ours(job_id, worker)).values(progress=progress, heartbeat_at=now()))
        return res.rowcount == 1


def record_source(db_url: str, job_id: str, worker: str, *, content_fingerprint: str,
                  resolved_revision: str | None) -> bool:
    """Record what a remote checkpoint turned out to be: its content fingerprint (from the
    store's metadata) and the revision it resolved to. False when the job is not ours."""
    with session_scope(db_url) as s:
        res = s.execute(update(Job).where(_ours(job_id, worker)).values(
            content_fingerprint=content_fingerprint, resolved_revision=resolved_revision, heartbeat_at=now()))
        return res.rowcount == 1


def defer(db_url: str, job_id: str, worker: str, *, delay_s: float, progress: dict[str, Any]) -> bool:
    """Put a running job back in the queue, due in ``delay_s`` seconds, showing ``progress``
    (a checkpoint still being uploaded: phase "waiting"). ``enqueued_at`` is set to when it is
    due (the caller sends its message with that countdown), so the sweeper counts it as
    waiting for a message only from then on. The look that found the checkpoint incomplete
    is not counted as an attempt. False when the job is not ours."""
    with session_scope(db_url) as s:
        res = s.execute(update(Job).where(_ours(job_id, worker)).values(
            status=JobStatus.queued, worker=None, enqueued_at=now() + timedelta(seconds=delay_s),
            attempts=Job.attempts - 1, progress=progress, heartbeat_at=None))
        return res.rowcount == 1


def mark_unsent(db_url: str, job_id: str) -> None:
    """The broker did not take a queued job's message: the sweeper sends it."""
    with session_scope(db_url) as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.queued).values(enqueued_at=None))


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class Finished:
    """What finishing a job did: whether it was ours to finish, and the webhook deliveries
    it stored (to publish after the commit)."""

    stored: bool
    deliveries: list[str]

    def __bool__(self) -> bool:
        return self.stored


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: layer mean, min and max (final-norm pair left out) of a job's scores."""
    by_metric: dict[str, list[float]] = {}
    for r in rows:
        if not r["final_norm"] and r["value"] is not None:
            by_metric.setdefault(r["metric"], []).append(r["value"])
    return {m: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "layers": len(v)}
            for m, v in sorted(by_metric.items())}


def job_event(job: Job, **extra: Any) -> dict[str, Any]:
    """The ``data`` of a job.* webhook event."""
    return {
        "job_id": job.id, "run": job.run.name, "step": job.checkpoint.step, "phase": job.checkpoint.phase.value,
        "status": job.status.value, "attempts": job.attempts, "worker": job.worker,
        "duration_s": job.duration_s, "run_s": job.run_s,
        "status_url": f"/v1/jobs/{job.id}", **extra,
    }


@dataclass(frozen=True)
class Earlier:
    """The checkpoint a job's ``weight_update`` is measured against: the run's previous scored
    step or, for a fine-tune's first, its parent's checkpoint at ``parent_step``."""

    run_id: int | None  # None: a checkpoint named by its location (config.compare_to), of no run
    step: int | None
    uri: str
    fingerprint: str | None  # None: named by its location, its identity taken when the job runs


def checkpoint_at(db_url: str, run_id: int, step: int) -> Earlier | None:
    """The run's checkpoint at ``step`` (``config.compare_to``: a step of the run), the one
    scored most recently when it was submitted more than once; else its latest submitted."""
    with session_scope(db_url) as s:
        scored = (Job.status == JobStatus.succeeded).desc()
        row = s.execute(
            select(Checkpoint.run_id, Checkpoint.step, Checkpoint.uri, Checkpoint.fingerprint)
            .outerjoin(Job, Job.checkpoint_id == Checkpoint.id)
            .where(Checkpoint.run_id == run_id, Checkpoint.step == step)
            .order_by(scored, Job.finished_at.desc().nulls_last(), Checkpoint.id.desc()).limit(1)).first()
    return None if row is None else Earlier(*row)


def previous_checkpoint(db_url: str, job: ClaimedJob) -> Earlier | None:
    """The run's latest step before ``job.step`` whose job succeeded; else, for a run with a
    parent, the parent's checkpoint at ``parent_step`` (when that one was scored); else None."""

    def scored(s, run_id: int, *steps) -> Earlier | None:
        q = (select(Checkpoint.run_id, Checkpoint.step, Checkpoint.uri, Checkpoint.fingerprint)
             .join(Job, Job.checkpoint_id == Checkpoint.id)
             .where(Checkpoint.run_id == run_id, Job.status == JobStatus.succeeded, *steps)
             .order_by(Checkpoint.step.desc(), Job.finished_at.desc()).limit(1))
        row = s.execute(q).first()
        return None if row is None else Earlier(*row)

    with session_scope(db_url) as s:
        found = scored(s, job.run_id, Checkpoint.step < job.step)
        if found is not None:
            return found
        run = s.get(Run, job.run_id)
        if run is not None and run.parent_run_id is not None and run.parent_step is not None:
            return scored(s, run.parent_run_id, Checkpoint.step == run.parent_step)
    return None


def complete(db_url: str, job_id: str, worker: str, result: dict[str, Any], metrics: list[str]) -> Finished:
    """Store the scores and mark the job succeeded, in one transaction, with the alert
    firings and webhook deliveries that follow. Idempotent: the step's previous scores are
    replaced. Falsy (nothing written) if the job is not ours."""
    t = now()
    with session_scope(db_url) as s:
        job = s.scalar(
            select(Job).where(Job.id == job_id, Job.status == JobStatus.running, Job.worker == worker)
            .with_for_update()
        )
        if job is None:
            return Finished(False, [])
        step = job.checkpoint.step
        s.execute(delete(Score).where(Score.run_id == job.run_id, Score.step == step, Score.metric.in_(metrics)))
        rows = []
        for p in result["pairs"]:
            for m in metrics:
                if m in PER_PAIR_METRICS and m in p:
                    rows.append(dict(job_id=job_id, run_id=job.run_id, step=step, layer=p["layer"], metric=m,
                                     value=_finite(p[m]), final_norm=bool(p.get("final_norm"))))
        for layer in result["layers"]:
            for m in metrics:
                if m in PER_LAYER_METRICS and m in layer:
                    rows.append(dict(job_id=job_id, run_id=job.run_id, step=step, layer=layer["layer"],
                                     metric=m, value=_finite(layer[m]), final_norm=False))
        if rows:
            s.execute(Score.__table__.insert(), rows)
        job.status = JobStatus.succeeded
        job.finished_at = t
        job.result = {k: v for k, v in result.items() if k not in ("pairs", "layers")}
        job.error = job.error_code = None
        s.flush()
        fired = alerts.evaluate(s, run_id=job.run_id, run_name=job.run.name, step=step, job_id=job_id)
        deliveries = webhooks.emit(s, "job.succeeded", job_event(job, scores=summarize(rows),
                                                                 alerts=[f.data["alert_id"] for f in fired]),
                                   run_id=job.run_id)
        for f in fired:
            deliveries += webhooks.emit(s, "trend.alert", f.data, run_id=job.run_id)
    return Finished(True, deliveries)


def fail(db_url: str, job_id: str, worker: str, code: str, message: str) -> Finished:
    """Mark the job failed with why, and store the job.failed deliveries. Falsy if not ours."""
    with session_scope(db_url) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running, Job.worker == worker)
            .values(status=JobStatus.failed, error_code=code, error=message[:4000], finished_at=now())
        )
        if res.rowcount != 1:
            return Finished(False, [])
        job = s.get(Job, job_id)  # not loaded before in this session: read after the update
        deliveries = webhooks.emit(s, "job.failed", job_event(job, error_code=code, error=job.error),
                                   run_id=job.run_id)
    return Finished(True, deliveries)


def release(db_url: str, job_id: str, worker: str, *, delay_s: float = 0.0,
            progress: dict[str, Any] | None = None) -> bool:
    """Give a running job back to the queue (a transient failure that will be retried).
    ``delay_s``: its message is sent with that countdown, so ``enqueued_at`` is when it is
    due (the sweeper does not count it as waiting for a message before). ``progress``, when
    given, replaces what the job shows."""
    values: dict[str, Any] = dict(status=JobStatus.queued, worker=None, enqueued_at=now() + timedelta(seconds=delay_s))
    if progress is not None:
        values["progress"] = progress
    with session_scope(db_url) as s:
        res = s.execute(update(Job).where(_ours(job_id, worker)).values(**values))
        return res.rowcount == 1
