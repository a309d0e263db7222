"""The API side of a job: accepting a submitted checkpoint (its checks, the run, checkpoint
and job rows, idempotency), and what a caller does with a job afterwards (read, list,
cancel, retry). The worker side (claim, heartbeat, progress, complete, fail) is in
:mod:`jobs`.

Functions take the request's SQLAlchemy session and commit their own transaction. The
caller sends a created or retried job to the queue (``queue.send_job``) after the commit.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from layertrack.workers import checkpoint as ckpt_files  # stdlib only: no torch
from layertrack.workers import locations  # stdlib only: no store client
from layertrack.workers.errors import (
    ArchitectureMissing,
    CheckpointNotFound,
    CheckpointOutsideRoots,
    FormatUnsupported,
    LayertrackError,
)
from layertrack.workers.formats import native  # stdlib only at import: no torch
from layertrack.workers.probe import default_probe
from layertrack.workers.vocabulary import DEFAULT_PROBE, REPLACEABILITY_METRICS, JobStatus, Phase
from sqlalchemy import and_, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from . import auth
from .errors import Conflict, Invalid, NotFound
from .jobs import check_remote, is_remote, job_metrics, now, require_roots
from .models import Checkpoint, HookReceipt, Job, Probe, Run


def canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Submission:
    run: str
    step: int
    uri: str
    fingerprint: str
    phase: Phase | None
    parent_run: str | None
    parent_step: int | None
    probe: str
    config: dict[str, Any]


class SubmitConflict(Conflict):
    """The request contradicts what is stored (a run's parent, an Idempotency-Key's body)."""


#: (database, sha256) -> the probe's row, detached; rows never change. A submission takes
#: its id and name from here without a query; accept_checkpoint forgets it when a submission
#: fails on the database (say, it was dropped and made again), and the second attempt reads
#: it again.
_probes: dict[tuple[str, str], Probe] = {}


def _cached_probe(session: Session, name: str) -> Probe:
    """The probe's row, detached (from the cache, or read once): for its id and name."""
    if name != DEFAULT_PROBE:
        raise Invalid(f"unknown probe {name!r}; available: {DEFAULT_PROBE}", code="unknown_probe")
    p = default_probe()
    key = (str(session.get_bind().url), p.sha256)
    cached = _probes.get(key)
    if cached is not None:
        return cached
    row = session.scalar(select(Probe).where(Probe.sha256 == p.sha256))
    if row is None:
        row = Probe(name=p.name, sha256=p.sha256, n_chars=p.n_chars)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            row = session.scalar(select(Probe).where(Probe.sha256 == p.sha256))
    detached = Probe(id=row.id, name=row.name, sha256=row.sha256, n_chars=row.n_chars, created_at=row.created_at)
    make_transient_to_detached(detached)
    _probes[key] = detached
    return detached


def probe_row(session: Session, name: str) -> Probe:
    """The probe's row in ``session`` (merged from the cache without a query)."""
    return session.merge(_cached_probe(session, name), load=False)


def _parent_row(session: Session, sub: Submission) -> Run | None:
    if sub.parent_run is None:
        return None
    parent = session.scalar(select(Run).where(Run.name == sub.parent_run))
    if parent is None:
        raise Invalid(f"parent run {sub.parent_run!r} does not exist; submit its checkpoints first")
    return parent


_RUNS, _CHECKPOINTS, _JOBS = Run.__table__, Checkpoint.__table__, Job.__table__

#: built once (SQLAlchemy caches its compiled form; building it again costs each
#: submission). Columns, not ORM entities: loading objects costs more than the query.
_STORED = (
    select(_RUNS.c.id, _RUNS.c.phase, _RUNS.c.parent_run_id, _CHECKPOINTS.c.id, _JOBS.c.id)
    .select_from(_RUNS)
    .outerjoin(_CHECKPOINTS, and_(_CHECKPOINTS.c.run_id == _RUNS.c.id, _CHECKPOINTS.c.step == bindparam("step"),
                                  _CHECKPOINTS.c.fingerprint == bindparam("fingerprint")))
    .outerjoin(_JOBS, and_(_JOBS.c.checkpoint_id == _CHECKPOINTS.c.id, _JOBS.c.probe_id == bindparam("probe_id"),
                           _JOBS.c.config_hash == bindparam("config_hash")))
    .where(_RUNS.c.name == bindparam("run"))
)
#: Core inserts (one statement each, no ORM flush); the defaults of the columns apply
_INSERT_RUN = _RUNS.insert().returning(_RUNS.c.id)
_INSERT_CHECKPOINT = _CHECKPOINTS.insert().returning(_CHECKPOINTS.c.id)
_INSERT_JOB = _JOBS.insert()
_JOB_COLUMNS = ("id", "checkpoint_id", "probe_id", "run_id", "config", "config_hash", "status", "attempts",
                "idempotency_key", "request_hash", "queued_at", "enqueued_at", "resends", "token_id")


def _checkpoint_and_job() -> Any:
    """PostgreSQL: the checkpoint and its job in one statement (one round trip), ``WITH c AS
    (INSERT INTO checkpoints ... RETURNING id) INSERT INTO jobs ... SELECT ... FROM c``; the
    checkpoint's values are bound as ``c_<column>``, the job's as ``j_<column>`` (a name
    that is a column of the checkpoint's insert would be taken as its value)."""
    c = (_CHECKPOINTS.insert()
         .values({k: bindparam(f"c_{k}", type_=_CHECKPOINTS.c[k].type)
                  for k in ("run_id", "step", "phase", "uri", "fingerprint", "created_at")})
         .returning(_CHECKPOINTS.c.id).cte("c"))
    values = [c.c.id if k == "checkpoint_id" else bindparam(f"j_{k}", type_=_JOBS.c[k].type) for k in _JOB_COLUMNS]
    return _JOBS.insert().from_select(list(_JOB_COLUMNS), select(*values).select_from(c), include_defaults=False)


_INSERT_CHECKPOINT_AND_JOB = _checkpoint_and_job()


@dataclass(frozen=True, slots=True)
class _Named:
    name: str


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    step: int
    phase: Phase
    uri: str


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job :func:`submit` has just stored (Core inserts: no ORM object), with what
    ``JobOut.of`` reads of a job: its run, checkpoint and probe, and a queued job's state."""

    id: str
    run: _Named
    checkpoint: _Checkpoint
    probe: _Named
    config: dict[str, Any]
    queued_at: Any
    token_id: int | None
    status: JobStatus = JobStatus.queued
    attempts: int = 0
    worker: None = None
    error_code: None = None
    error: None = None
    result: None = None
    started_at: None = None
    finished_at: None = None
    duration_s: None = None
    run_s: None = None
    progress: None = None
    content_fingerprint: None = None
    resolved_revision: None = None


def _run_id(session: Session, sub: Submission, stored: tuple[int, Phase, int | None] | None,
            parent: Run | None) -> tuple[int, Phase]:
    """The run's id and phase: the stored run (its parent recorded when it had none), or a
    new one (inserted)."""
    if stored is None:
        phase = sub.phase or (Phase.finetune if parent else Phase.pretrain)
        run_id = session.connection().execute(_INSERT_RUN, {
            "name": sub.run, "phase": phase, "parent_run_id": parent.id if parent else None,
            "parent_step": sub.parent_step, "metadata": {}, "created_at": now(),
        }).scalar_one()
        return run_id, phase
    run_id, phase, parent_id = stored
    if parent is not None and parent_id not in (None, parent.id):
        raise SubmitConflict(f"run {sub.run!r} already has another parent run")
    if parent is not None and parent_id is None:
        run = session.get(Run, run_id)
        run.parent_run_id, run.parent_step = parent.id, sub.parent_step  # flushed at commit
    return run_id, phase


def submit(
    session: Session, sub: Submission, *, idempotency_key: str | None = None
) -> tuple[Job | NewJob, bool]:
    """Store a job for this checkpoint, or return the existing one; (job, created). Reads
    the run, the checkpoint and the job in one query (and the parent run, when one is
    named; the probe comes from a cache), and writes what is new with one Core insert per
    row (the run's, the checkpoint's, the job's). A new job is a :class:`NewJob`, a stored
    one the ORM row."""
    request_hash = canonical_hash(vars(sub))
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request_hash != request_hash:
                raise SubmitConflict(
                    "this Idempotency-Key was already used with a different request; "
                    "use a new key for a new submission"
                )
            return existing, False
    parent = _parent_row(session, sub)
    probe = _cached_probe(session, sub.probe)
    config_hash = canonical_hash(sub.config)
    conn = session.connection()
    row = conn.execute(_STORED, {"run": sub.run, "step": sub.step, "fingerprint": sub.fingerprint,
                                 "probe_id": probe.id, "config_hash": config_hash}).first()
    # at most one row: a run's checkpoint is unique by (step, fingerprint), a checkpoint's
    # job by (probe, config hash)
    run_id, run_phase = _run_id(session, sub, None if row is None else (row[0], row[1], row[2]), parent)
    if row is not None and row[4] is not None:
        return session.get(Job, row[4]), False
    phase = sub.phase or run_phase
    ckpt_id = row[3] if row is not None else None
    caller = session.info.get(auth.CALLER_KEY)
    queued = now()
    values = {
        "id": str(uuid.uuid4()), "checkpoint_id": ckpt_id, "probe_id": probe.id, "run_id": run_id,
        "config": sub.config, "config_hash": config_hash, "status": JobStatus.queued, "attempts": 0,
        "idempotency_key": idempotency_key, "request_hash": request_hash, "queued_at": queued,
        # set before it is sent (after the commit): one transaction less per submission. If
        # sending fails the API clears it; if the API dies first, the sweeper re-sends the
        # job after requeue_after_s.
        "enqueued_at": queued, "resends": 0, "token_id": caller.token_id if caller is not None else None,
    }
    # a race with a twin raises IntegrityError in these inserts (the caller takes the twin's job)
    if ckpt_id is not None:  # stored before, for another probe or config: as stored
        stored = session.get(Checkpoint, ckpt_id)
        ckpt = _Checkpoint(stored.step, stored.phase, stored.uri)
        conn.execute(_INSERT_JOB, values)
    else:
        ckpt = _Checkpoint(sub.step, phase, sub.uri)
        checkpoint = {"run_id": run_id, "step": sub.step, "phase": phase, "uri": sub.uri,
                      "fingerprint": sub.fingerprint, "created_at": queued}
        if conn.dialect.name == "postgresql":  # one round trip for both rows
            conn.execute(_INSERT_CHECKPOINT_AND_JOB, {f"j_{k}": v for k, v in values.items()}
                         | {f"c_{k}": v for k, v in checkpoint.items()})
        else:
            values["checkpoint_id"] = conn.execute(_INSERT_CHECKPOINT, checkpoint).scalar_one()
            conn.execute(_INSERT_JOB, values)
    job = NewJob(id=values["id"], run=_Named(sub.run), checkpoint=ckpt, probe=_Named(probe.name),
                 config=sub.config, queued_at=queued, token_id=values["token_id"])
    return job, True


def accept_checkpoint(
    session: Session, body: Any, *, roots: list, idempotency_key: str | None = None, receipt: Any = None,
    remote_roots: list[locations.Location] | None = None,
) -> tuple[Job | NewJob, bool]:
    """Check a submitted checkpoint (``schemas.CheckpointIn``), store its job and commit;
    (job, created). The same checkpoint again (run, step, content fingerprint, probe and
    config) gives the stored job. ``receipt`` (a signed hook's HookReceipt) is committed in
    the same transaction, so a failure leaves neither. The caller sends a created job to the
    queue after this returns.

    A local checkpoint (a path or file:// URI) must lie under one of ``roots`` and is
    inspected here (config.json, the weight index: its fingerprint). A remote one (s3://,
    gs://, az://, hf://, http(s)://) is not read: its URI is parsed (credentials refused)
    and must lie within one of ``remote_roots`` (default: the session's settings'), and its
    fingerprint is provisional (:func:`provisional_fingerprint`)."""
    replaceable = [m for m in body.metrics or [] if m in REPLACEABILITY_METRICS]
    if replaceable and not body.config.replaceability:
        raise Invalid(f"metric(s) {', '.join(replaceable)} need config.replaceability = true")
    config = body.config.model_dump()
    # not given: left out, so a job's identity (its config's hash) is what it was before these
    # options existed
    for key, absent in (("format", None), ("model_config", None), ("tokenizer", None), ("logit_lens", False),
                        ("compare_to", None)):
        if config[key] is absent:
            del config[key]
    config["metrics"] = body.metrics or job_metrics(config)
    if remote_roots is None:
        settings = session.info.get("settings")
        remote_roots = settings.remote_roots if settings is not None else []
    try:
        for key in ("model_config", "tokenizer"):  # local files the worker reads beside the checkpoint
            if key in config:
                config[key] = str(_local_beside(config[key], roots, key))
        if isinstance(config.get("compare_to"), str):  # a checkpoint named by its path
            config["compare_to"] = str(_local_beside(config["compare_to"], roots, "compare_to"))
        fmt = config.get("format")
        if is_remote(body.uri):
            if fmt not in (None, "hf"):
                raise FormatUnsupported(f"{fmt} checkpoints are read from local paths only, so far; copy it under a "
                                        "checkpoint root, or convert it to a transformers checkpoint in the store")
            uri, fingerprint = check_remote(body.uri, remote_roots)
        else:
            path = ckpt_files.resolve_checkpoint_path(body.uri, require_roots(roots))
            if fmt is None:  # a few stat()s: litgpt copies a config.json beside its own files
                fmt = native.detect(path)
            if fmt not in (None, "hf"):  # a training framework's layout: its identity from its files
                if fmt in native.DCP_FORMATS and config.get("model_config") is None:
                    raise ArchitectureMissing(
                        f"the DCP checkpoint {str(path)!r} carries no architecture: give config.model_config, a "
                        "transformers config.json under the checkpoint roots (--model-config)")
                if (fmt == "litgpt" and config.get("model_config") is None
                        and not (path / native.litgpt.MODEL_CONFIG).is_file()):
                    raise ArchitectureMissing(
                        f"the litgpt checkpoint {str(path)!r} has no {native.litgpt.MODEL_CONFIG} (litgpt writes it "
                        "last: is the save finished?); give config.model_config (--model-config) otherwise")
                fingerprint = native.identity(path, fmt, config.get("model_config"))
            else:
                info = ckpt_files.inspect_checkpoint(path, allow_pickle=body.config.allow_pickle,
                                                     check_causal_lm=False)
                fingerprint = info.fingerprint
            uri = str(path)
    except OSError as e:
        raise Invalid(f"checkpoint {body.uri!r} cannot be read ({e.strerror or e})", code="checkpoint_unreadable",
                      title="Invalid checkpoint") from None
    except LayertrackError as e:
        raise Invalid(e.message, code=e.code, title="Invalid checkpoint") from None
    sub = Submission(
        run=body.run, step=body.step, uri=uri, fingerprint=fingerprint,
        phase=Phase(body.phase) if body.phase else None, parent_run=body.parent_run,
        parent_step=body.parent_step, probe=body.probe, config=config,
    )
    for attempt in (1, 2):
        try:
            job, created = submit(session, sub, idempotency_key=idempotency_key)
            if receipt is not None:
                receipt.job_id = job.id
                session.add(receipt)
            session.commit()
            return job, created
        except IntegrityError:  # a concurrent identical submission won the race: take its job
            session.rollback()
            _probes.clear()  # or the cached probe row is not the database's: read it again
            if receipt is not None and _receipt_taken(session, receipt):
                raise Conflict(f"webhook id {receipt.msg_id!r} was already accepted; send a new webhook-id for "
                               "a new submission", title="Replayed webhook") from None
            if attempt == 2:
                raise
        except Exception:
            session.rollback()
            raise
    raise AssertionError("unreachable")


def _local_beside(value: str, roots: list, what: str):
    """A local file or directory a job reads beside its checkpoint (``model_config``,
    ``tokenizer``), resolved, which must lie under the checkpoint roots."""
    import os
    from pathlib import Path

    if is_remote(value):
        raise Invalid(f"config.{what} {value!r} must be a local path under the checkpoint roots", code="invalid_uri")
    real = Path(os.path.realpath(Path(value.removeprefix("file://")).expanduser().absolute()))
    real_roots = [Path(os.path.realpath(Path(r).expanduser().absolute())) for r in require_roots(roots)]
    if not ckpt_files._inside(real, real_roots):
        raise CheckpointOutsideRoots(f"config.{what} {value!r} resolves to {str(real)!r}, outside the checkpoint roots "
                                     f"({', '.join(map(str, real_roots))}); put it under one")
    if not real.exists():
        raise CheckpointNotFound(f"config.{what} {value!r} does not exist")
    return real


def _receipt_taken(session: Session, receipt: Any) -> bool:
    return session.scalar(select(HookReceipt.id).where(
        HookReceipt.source_id == receipt.source_id, HookReceipt.msg_id == receipt.msg_id)) is not None


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id) if len(job_id) <= 36 else None
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", code="job_not_found")
    return job


def list_jobs(session: Session, *, run_id: int | None, status: JobStatus | None, limit: int) -> list[Job]:
    stmt = select(Job).order_by(Job.queued_at.desc()).limit(limit)
    if run_id is not None:
        stmt = stmt.where(Job.run_id == run_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return list(session.scalars(stmt))


class InvalidTransition(Conflict):
    """The job's state does not allow the change asked for."""


def _require(job: Job, allowed: tuple[JobStatus, ...], action: str) -> None:
    if job.status not in allowed:
        names = " or ".join(s.value for s in allowed)
        raise InvalidTransition(f"job {job.id} is {job.status.value}; only {names} jobs can be {action}",
                                code="invalid_transition")


def cancel(session: Session, job: Job) -> Job:
    """Cancel a queued or running job (a running one's worker discards its result); committed."""
    _require(job, (JobStatus.queued, JobStatus.running), "cancelled")
    job.status = JobStatus.cancelled
    job.finished_at = now()
    session.commit()
    return job


def retry(session: Session, job: Job) -> Job:
    """Queue a failed or cancelled job again; committed. The caller sends it to the queue."""
    _require(job, (JobStatus.failed, JobStatus.cancelled), "retried")
    job.status = JobStatus.queued
    job.error = job.error_code = None
    job.worker = None
    job.enqueued_at = now()  # set before it is sent, as at submission (the sender clears it on failure)
    job.started_at = job.finished_at = job.heartbeat_at = None
    job.progress = None  # a new wait for an incomplete checkpoint starts from now
    job.queued_at = now()
    session.commit()
    return job
