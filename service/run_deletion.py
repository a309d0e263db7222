"""Deleting a run: what belongs only to it goes, in one transaction.

Deleted with the run: its checkpoints, jobs and scores; its alert rules and their firings;
the webhook subscriptions limited to this run (``webhooks.run_id``), with their deliveries
and attempts. Kept: webhook subscriptions of every run and their delivery logs (what was sent
to a subscriber stays in its log, payloads naming the run included); probes (shared by every
run); the receipts of signed hooks and bucket notifications (so that a replayed message is
still a replay and does not make the run again); the workers' fetch cache. A fine-tune of the
run (a child run) is kept with its scores and loses its parent (``parent_run`` and
``parent_step`` become null).

A run with queued or running jobs is not deleted (``Conflict``, code ``run_has_active_jobs``):
a worker would be scoring into a run that is gone. Cancel those jobs, or wait for them to
finish, first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layertrack.workers.vocabulary import JobStatus
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from .errors import Conflict
from .models import AlertFiring, AlertRule, Checkpoint, Delivery, DeliveryAttempt, Job, Run, Score, Webhook

ACTIVE = (JobStatus.queued, JobStatus.running)


@dataclass
class RunContents:
    """What deleting a run removes (or removed), counted; the jobs that stop it; the fine-tunes
    that lose their parent."""

    run: str
    jobs: int = 0
    checkpoints: int = 0
    scores: int = 0
    alert_rules: int = 0
    alert_firings: int = 0
    webhooks: int = 0
    webhook_deliveries: int = 0
    #: queued or running jobs (while there are any, the run is not deleted)
    active_jobs: list[str] = field(default_factory=list)
    #: the runs fine-tuned from this one: kept, without a parent
    child_runs: list[str] = field(default_factory=list)


def _count(session: Session, model, *where) -> int:
    return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def contents(session: Session, run: Run) -> RunContents:
    """What :func:`delete_run` would remove, without removing anything."""
    hooks = select(Webhook.id).where(Webhook.run_id == run.id).scalar_subquery()
    return RunContents(
        run=run.name,
        jobs=_count(session, Job, Job.run_id == run.id),
        checkpoints=_count(session, Checkpoint, Checkpoint.run_id == run.id),
        scores=_count(session, Score, Score.run_id == run.id),
        alert_rules=_count(session, AlertRule, AlertRule.run_id == run.id),
        alert_firings=_count(session, AlertFiring, AlertFiring.run_id == run.id),
        webhooks=_count(session, Webhook, Webhook.run_id == run.id),
        webhook_deliveries=_count(session, Delivery, Delivery.webhook_id.in_(hooks)),
        active_jobs=list(session.scalars(select(Job.id).where(Job.run_id == run.id, Job.status.in_(ACTIVE))
                                         .order_by(Job.queued_at))),
        child_runs=list(session.scalars(select(Run.name).where(Run.parent_run_id == run.id).order_by(Run.name))),
    )


def refuse_active(run: str, active: list[str]) -> Conflict:
    shown = ", ".join(active[:5]) + (f" and {len(active) - 5} more" if len(active) > 5 else "")
    return Conflict(
        f"run {run!r} has {len(active)} queued or running job(s) ({shown}): cancel them first "
        f"(POST /v1/jobs/ID/cancel, 'layertrack cancel ID'; 'layertrack jobs --run {run} --status queued' lists "
        "them) or wait for them to finish, then delete the run", code="run_has_active_jobs")


def delete_run(session: Session, run: Run) -> RunContents:
    """Delete the run and everything that belongs only to it (the module's docstring says
    what); committed. The counts are what was deleted. ``Conflict`` while it has queued or
    running jobs."""
    active = list(session.scalars(select(Job.id).where(Job.run_id == run.id, Job.status.in_(ACTIVE))
                                  .order_by(Job.queued_at)))
    if active:
        raise refuse_active(run.name, active)
    out = RunContents(run=run.name)
    out.child_runs = list(session.scalars(select(Run.name).where(Run.parent_run_id == run.id).order_by(Run.name)))
    session.execute(update(Run).where(Run.parent_run_id == run.id).values(parent_run_id=None, parent_step=None))
    hooks = select(Webhook.id).where(Webhook.run_id == run.id).scalar_subquery()
    deliveries = select(Delivery.id).where(Delivery.webhook_id.in_(hooks)).scalar_subquery()

    def gone(stmt) -> int:  # the rows one DELETE removed
        return int(session.execute(stmt.execution_options(synchronize_session=False)).rowcount or 0)

    # children first, each table by its own key: the same on every database, whether or not
    # it enforces the foreign keys' ON DELETE CASCADE
    gone(delete(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(deliveries)))
    out.webhook_deliveries = gone(delete(Delivery).where(Delivery.webhook_id.in_(hooks)))
    out.webhooks = gone(delete(Webhook).where(Webhook.run_id == run.id))
    out.alert_firings = gone(delete(AlertFiring).where(AlertFiring.run_id == run.id))
    out.alert_rules = gone(delete(AlertRule).where(AlertRule.run_id == run.id))
    out.scores = gone(delete(Score).where(Score.run_id == run.id))
    out.jobs = gone(delete(Job).where(Job.run_id == run.id))
    out.checkpoints = gone(delete(Checkpoint).where(Checkpoint.run_id == run.id))
    gone(delete(Run).where(Run.id == run.id))
    session.commit()
    session.expunge_all()  # the run's objects loaded in this session are gone
    return out
