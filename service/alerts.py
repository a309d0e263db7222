"""Trend alerts: per-run rules evaluated when a job's scores are stored.

A rule watches one metric of a run, at one layer or as the layer mean (the final-norm pair
left out, as in trends). Two kinds:

* ``threshold``: fires at a step whose value is beyond ``above`` (greater) or ``below``
  (smaller) while the previous scored step's value was not, or when the first value is
  already beyond. It fires on the crossing, not on every step that stays beyond.
* ``sigma``: fires when the value is more than ``k`` standard deviations (sample standard
  deviation) from the mean of the previous ``window`` scored steps; it needs at least two
  previous values. With a standard deviation of zero, any change fires.

"Previous" means smaller steps of the same run, whatever order jobs finish in. A step fires
a rule at most once (re-scoring it does not fire again).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from layertrack.workers.vocabulary import AlertKind
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import NotFound
from .models import AlertFiring, AlertRule, Run, Score


@dataclass
class Fired:
    firing: AlertFiring
    data: dict[str, Any]


def _values(session: Session, rule: AlertRule, step: int, n_before: int) -> list[tuple[int, float]]:
    """(step, value) for ``step`` and up to ``n_before`` smaller steps, newest first."""
    base = [Score.run_id == rule.run_id, Score.metric == rule.metric, Score.step <= step, Score.value.is_not(None)]
    if rule.layer is None:
        stmt = (select(Score.step, func.avg(Score.value)).where(*base, Score.final_norm.is_(False))
                .group_by(Score.step))
    else:
        stmt = select(Score.step, Score.value).where(*base, Score.layer == rule.layer)
    rows = session.execute(stmt.order_by(Score.step.desc()).limit(n_before + 1)).all()
    return [(int(s), float(v)) for s, v in rows]


def _beyond(rule: AlertRule, v: float) -> str | None:
    if rule.above is not None and v > rule.above:
        return f"above {rule.above:g}"
    if rule.below is not None and v < rule.below:
        return f"below {rule.below:g}"
    return None


def check(rule: AlertRule, values: list[tuple[int, float]], step: int) -> tuple[str, dict[str, Any]] | None:
    """(message, details) if the rule fires at ``step`` given the values (newest first)."""
    if not values or values[0][0] != step or not math.isfinite(values[0][1]):
        return None
    v = values[0][1]
    prev = values[1:]
    what = f"{rule.metric} " + ("layer mean" if rule.layer is None else f"layer {rule.layer}")
    if rule.kind == AlertKind.threshold:
        side = _beyond(rule, v)
        if side is None or (prev and _beyond(rule, prev[0][1]) is not None):
            return None
        before = f" (was {prev[0][1]:.6g} at step {prev[0][0]})" if prev else ""
        return (f"{what} is {v:.6g} at step {step}, {side}{before}",
                {"previous_step": prev[0][0] if prev else None, "previous_value": prev[0][1] if prev else None})
    if len(prev) < 2:
        return None
    past = [p[1] for p in prev]
    mean, std = statistics.fmean(past), statistics.stdev(past)
    dev = abs(v - mean)
    if not (dev > rule.k * std and dev > 0):
        return None
    sigmas = dev / std if std > 0 else math.inf
    return (f"{what} is {v:.6g} at step {step}, {sigmas:.3g} standard deviations from the mean "
            f"{mean:.6g} of the previous {len(past)} checkpoints (limit {rule.k:g})",
            {"baseline_mean": mean, "baseline_std": std, "baseline_steps": [p[0] for p in prev],
             "sigmas": None if math.isinf(sigmas) else sigmas})


def evaluate(session: Session, *, run_id: int, run_name: str, step: int, job_id: str) -> list[Fired]:
    """Check every enabled rule of the run at ``step``; store and return the firings."""
    rules = session.scalars(
        select(AlertRule).where(AlertRule.run_id == run_id, AlertRule.enabled.is_(True)).order_by(AlertRule.id)
    ).all()
    fired = []
    for rule in rules:
        n_before = 1 if rule.kind == AlertKind.threshold else int(rule.window or 5)
        values = _values(session, rule, step, n_before)
        hit = check(rule, values, step)
        if hit is None:
            continue
        if session.scalar(select(AlertFiring.id).where(AlertFiring.rule_id == rule.id, AlertFiring.step == step)):
            continue  # this step already fired this rule (it was scored again)
        message, details = hit
        value = values[0][1]
        firing = AlertFiring(rule_id=rule.id, run_id=run_id, job_id=job_id, step=step, value=value,
                             details=details, message=message)
        session.add(firing)
        session.flush()
        fired.append(Fired(firing, {
            "alert_id": firing.id, "rule": rule_out(rule, run_name), "run": run_name, "step": step,
            "job_id": job_id, "metric": rule.metric, "layer": rule.layer, "value": value,
            "message": message, **details,
        }))
    return fired


def rule_out(rule: AlertRule, run_name: str) -> dict[str, Any]:
    return {"id": rule.id, "run": run_name, "metric": rule.metric, "layer": rule.layer, "kind": rule.kind,
            "above": rule.above, "below": rule.below, "k": rule.k, "window": rule.window,
            "description": rule.description, "enabled": rule.enabled,
            "created_at": rule.created_at.isoformat() if rule.created_at else None}


# ------------------------------------------------------------------ rules
def create_rule(session: Session, run: Run, *, metric: str, layer: int | None, kind: str, above: float | None,
                below: float | None, k: float | None, window: int | None, description: str) -> AlertRule:
    """Store a rule for the run (committed)."""
    rule = AlertRule(run_id=run.id, metric=metric, layer=layer, kind=kind, above=above, below=below, k=k,
                     window=window, description=description, enabled=True, created_at=datetime.now(UTC))
    session.add(rule)
    session.commit()
    return rule


def list_rules(session: Session, run: Run) -> list[AlertRule]:
    return list(session.scalars(select(AlertRule).where(AlertRule.run_id == run.id).order_by(AlertRule.id)))


def delete_rule(session: Session, run: Run, rule_id: int) -> None:
    """Remove one of the run's rules (committed); its firings go with it."""
    rule = session.get(AlertRule, rule_id)
    if rule is None or rule.run_id != run.id:
        raise NotFound(f"run {run.name!r} has no alert rule {rule_id}")
    session.delete(rule)
    session.commit()


def firings(session: Session, run: Run, *, metric: str | None = None, layer_mean_only: bool = False,
            limit: int = 10_000) -> list[AlertFiring]:
    """The run's firings in step order (of one metric's rules, or of layer-mean rules only)."""
    stmt = select(AlertFiring).where(AlertFiring.run_id == run.id)
    if metric is not None or layer_mean_only:
        stmt = stmt.join(AlertRule, AlertRule.id == AlertFiring.rule_id)
    if metric is not None:
        stmt = stmt.where(AlertRule.metric == metric)
    if layer_mean_only:
        stmt = stmt.where(AlertRule.layer.is_(None))
    return list(session.scalars(stmt.order_by(AlertFiring.step, AlertFiring.id).limit(limit)))
