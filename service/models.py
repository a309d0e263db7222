"""SQL tables (SQLAlchemy 2.0): runs, checkpoints, probes, jobs, scores, API tokens,
webhooks and their deliveries, signed-hook sources, alert rules and firings.

PostgreSQL in production, SQLite for the embedded setup; migrations/ creates the same
schema (tests/test_migrations.py checks that the two agree).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from layertrack.workers.vocabulary import DeliveryStatus, JobStatus, Phase
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class TZDateTime(TypeDecorator):
    """A timestamp with its time zone, always read back as UTC-aware (SQLite stores no zone
    and would give naive datetimes; PostgreSQL's timestamptz gives aware ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value
BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    phase: Mapped[Phase] = mapped_column(Enum(Phase, native_enum=False, length=16))
    parent_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    parent_step: Mapped[int | None] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    parent: Mapped[Run | None] = relationship(remote_side=[id])


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step", "fingerprint", name="uq_checkpoints_run_step_fp"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(BigInteger)
    phase: Mapped[Phase] = mapped_column(Enum(Phase, native_enum=False, length=16))
    uri: Mapped[str] = mapped_column(Text)
    #: a local checkpoint: sha256 of config.json and the weight index; a remote one (s3://,
    #: hf://, ...): provisional, "uri:" + sha256 of the normalized URI (the API does not read
    #: remote data; the worker records the content fingerprint on the job)
    fingerprint: Mapped[str] = mapped_column(String(72))
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    run: Mapped[Run] = relationship()


class Probe(Base):
    __tablename__ = "probes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    n_chars: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("checkpoint_id", "probe_id", "config_hash", name="uq_jobs_dedupe"),
        Index("ix_jobs_status_queued_at", "status", "queued_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    probe_id: Mapped[int] = mapped_column(ForeignKey("probes.id"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16), default=JobStatus.queued
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    queued_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: times the sweeper sent the job again because its message was presumed lost
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: the API token that submitted it (None: a signed hook, or submitted before tokens were
    #: recorded); a token with the ``submit`` scope but not ``read`` sees only its own jobs
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"), index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: a remote checkpoint's content fingerprint, computed by the worker from the store's
    #: metadata (ETag or version and size per file; the Hub's commit and file hashes)
    content_fingerprint: Mapped[str | None] = mapped_column(String(100))
    #: the revision the worker resolved the checkpoint to (the Hub's commit sha)
    resolved_revision: Mapped[str | None] = mapped_column(String(200))
    #: a remote checkpoint's progress: {"phase": "fetching" | "waiting" | "scoring",
    #: "bytes_done", "bytes_total", "seconds", "message", ...}; None for local checkpoints
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    checkpoint: Mapped[Checkpoint] = relationship()
    probe: Mapped[Probe] = relationship()
    run: Mapped[Run] = relationship()

    def __init__(self, **kw: Any):
        # the id is known before the row is flushed, so that what is stored with the job in
        # its transaction (a signed hook's receipt) can refer to it
        kw.setdefault("id", str(uuid.uuid4()))
        super().__init__(**kw)

    @property
    def duration_s(self) -> float | None:
        """Seconds from submission (``queued_at``) to the end: the time a user waited for it,
        queueing, retries and fetching included. None while it has not finished."""
        if self.finished_at is None or self.queued_at is None:
            return None
        return (self.finished_at - self.queued_at).total_seconds()

    @property
    def run_s(self) -> float | None:
        """Seconds of the last attempt on a worker (``started_at`` to the end)."""
        if self.finished_at is None or self.started_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class Score(Base):
    """One number: a metric of one layer (or block pair) of one run at one step.

    (run, step, metric, layer) is unique: the scores of a step are those of the last job
    that succeeded for it (``job_id`` says which); writing them again replaces them.
    """

    __tablename__ = "scores"
    __table_args__ = (
        UniqueConstraint("run_id", "metric", "layer", "step", name="uq_scores_run_metric_layer_step"),
        Index("ix_scores_run_metric_step", "run_id", "metric", "step"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    layer: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)
    #: the pair into the final-norm output (left out of layer means)
    final_norm: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: what the token may do: comma-separated scopes (read, submit, admin); tokens made
    #: before scopes existed keep every right
    scopes: Mapped[str] = mapped_column(String(64), default="read,submit,admin",
                                        server_default="read,submit,admin")
    #: run-name patterns (fnmatch, comma separated) the token is limited to; None: every run
    run_patterns: Mapped[str | None] = mapped_column(String(500))


# ------------------------------------------------------------------ webhooks out
class Webhook(Base):
    """A subscription: POST these events (of one run, or of every run) to ``url``."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    #: the signing secret (``whsec_<base64>``), needed to sign; never returned by the API
    #: after creation. Stored encrypted (``fernet:...``, service/crypto.py)
    secret: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    run: Mapped[Run | None] = relationship()


class Delivery(Base):
    """One event for one subscription; ``id`` is the Standard Webhooks ``webhook-id``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: pending | succeeded | failed
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending.value)
    #: attempts in the current round (a redelivery starts a new round)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: when a message for the delivery's current attempt was last handed to the queue
    sent_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: times the sweeper sent it again because its message was presumed lost
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    webhook: Mapped[Webhook] = relationship()
    attempt_log: Mapped[list[DeliveryAttempt]] = relationship(
        order_by="DeliveryAttempt.id", cascade="all, delete-orphan", passive_deletes=True
    )


class DeliveryAttempt(Base):
    """Every POST made for a delivery: when, what came back, how long it took."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)


# ------------------------------------------------------------------ signed webhooks in
class HookSource(Base):
    """A sender allowed to post checkpoints to /v1/hooks/checkpoint, with its signing secret
    (and, with a prefix, bucket notifications to /v1/hooks/object-store)."""

    __tablename__ = "hook_sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    #: the signing secret, stored encrypted (``fernet:...``, service/crypto.py)
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(TZDateTime)
    #: bucket notifications (/v1/hooks/object-store, service/hooks.py): the s3:// prefix the
    #: object keys lie under, the pattern that maps a key below it to run and step, and the
    #: file names whose arrival submits the checkpoint; None for a source of signed hooks only
    prefix: Mapped[str | None] = mapped_column(String(1024))
    pattern: Mapped[str | None] = mapped_column(Text)
    markers: Mapped[list[str] | None] = mapped_column(JSON)


class HookReceipt(Base):
    """A webhook id already accepted from a source: the same id again is a replay."""

    __tablename__ = "hook_receipts"
    __table_args__ = (UniqueConstraint("source_id", "msg_id", name="uq_hook_receipts_source_msg"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("hook_sources.id", ondelete="CASCADE"))
    msg_id: Mapped[str] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(String(36))
    received_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow, index=True)


# ------------------------------------------------------------------ trend alerts
class AlertRule(Base):
    """Watch one metric of a run (one layer, or the layer mean) as its jobs succeed.

    ``kind`` "threshold": fires when the value moves beyond ``above`` / ``below`` (from
    inside the band, or at the first value). ``kind`` "sigma": fires when the value is more
    than ``k`` standard deviations from the mean of the previous ``window`` checkpoints.
    """

    __tablename__ = "alert_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(32))
    #: None: the layer mean (final-norm pair left out)
    layer: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    above: Mapped[float | None] = mapped_column(Float)
    below: Mapped[float | None] = mapped_column(Float)
    k: Mapped[float | None] = mapped_column(Float)
    window: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(200), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    run: Mapped[Run] = relationship()


class AlertFiring(Base):
    __tablename__ = "alert_firings"
    __table_args__ = (
        UniqueConstraint("rule_id", "step", name="uq_alert_firings_rule_step"),
        Index("ix_alert_firings_run_step", "run_id", "step"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_id: Mapped[int] = mapped_column(ForeignKey("alert_rules.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(String(36))
    step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    rule: Mapped[AlertRule] = relationship()
