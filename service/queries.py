"""Read side: runs and their summaries, score series, layer-mean trends, heatmaps, profiles
and exports (keyword-only helpers)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from layertrack.workers.vocabulary import JobStatus
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import NotFound
from .models import Checkpoint, Job, Run, Score


# ------------------------------------------------------------------ runs
def get_run(session: Session, name: str) -> Run:
    run = session.scalar(select(Run).where(Run.name == name))
    if run is None:
        raise NotFound(f"no run named {name!r}", code="run_not_found")
    return run


def list_runs(session: Session, *, name_contains: str | None = None) -> list[Run]:
    stmt = select(Run).order_by(Run.created_at)
    if name_contains:
        stmt = stmt.where(Run.name.contains(name_contains, autoescape=True))
    return list(session.scalars(stmt))


@dataclass
class RunSummary:
    """A run with what the runs page shows of it."""

    run: Run
    last_step: int | None
    n_checkpoints: int
    jobs: dict[str, int]
    last_activity: datetime


def run_summary(session: Session, run: Run) -> RunSummary:
    last_step, n_ckpt = session.execute(
        select(func.max(Checkpoint.step), func.count(Checkpoint.id)).where(Checkpoint.run_id == run.id)
    ).one()
    counts = dict(session.execute(
        select(Job.status, func.count(Job.id)).where(Job.run_id == run.id).group_by(Job.status)
    ).all())
    last_activity = session.scalar(
        select(func.max(func.coalesce(Job.finished_at, Job.started_at, Job.queued_at))).where(Job.run_id == run.id)
    )
    return RunSummary(run=run, last_step=last_step, n_checkpoints=n_ckpt,
                      jobs={st.value: counts.get(st, 0) for st in JobStatus},
                      last_activity=last_activity or run.created_at)


# ------------------------------------------------------------------ scores


def downsample(points: Sequence[tuple[int, float | None]], max_points: int) -> list[tuple[int, float | None]]:
    """At most ``max_points`` points of a step-ordered series, keeping the extremes.

    The steps are cut into max_points/2 buckets of equal count; each keeps its smallest and
    largest value (in step order), so spikes survive downsampling. First and last points
    are always kept.
    """
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return list(points)
    if max_points < 4:
        return [points[0], points[-1]][:max_points]
    buckets = (max_points - 2) // 2
    out = [points[0]]
    inner = points[1:-1]
    size = len(inner) / buckets
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        real = [p for p in chunk if p[1] is not None]
        if not real:
            continue
        lo = min(real, key=lambda p: p[1])
        hi = max(real, key=lambda p: p[1])
        out.extend(sorted({lo, hi}, key=lambda p: p[0]))
    out.append(points[-1])
    return out


def _step_filter(stmt, from_step: int | None, to_step: int | None):
    if from_step is not None:
        stmt = stmt.where(Score.step >= from_step)
    if to_step is not None:
        stmt = stmt.where(Score.step <= to_step)
    return stmt


def series(
    session: Session,
    *,
    run_id: int,
    metric: str,
    layer: int | None = None,
    from_step: int | None = None,
    to_step: int | None = None,
    max_points: int = 500,
) -> list[dict]:
    """One step-ordered series per layer: [{layer, final_norm, steps, values}]."""
    stmt = select(Score.layer, Score.step, Score.value, Score.final_norm).where(
        Score.run_id == run_id, Score.metric == metric
    )
    if layer is not None:
        stmt = stmt.where(Score.layer == layer)
    stmt = _step_filter(stmt, from_step, to_step).order_by(Score.layer, Score.step)
    by_layer: dict[int, list[tuple[int, float | None]]] = defaultdict(list)
    flagged: dict[int, bool] = {}
    for lay, step, value, fn in session.execute(stmt):
        by_layer[lay].append((step, value))
        flagged[lay] = flagged.get(lay, False) or fn
    out = []
    for lay in sorted(by_layer):
        pts = downsample(by_layer[lay], max_points)
        out.append({"layer": lay, "final_norm": flagged[lay], "steps": [p[0] for p in pts],
                    "values": [p[1] for p in pts]})
    return out


def trend(
    session: Session,
    *,
    run_id: int,
    metric: str,
    from_step: int | None = None,
    to_step: int | None = None,
    max_points: int = 500,
) -> dict:
    """Layer mean per step (the pair into the final-norm output left out)."""
    stmt = (
        select(Score.step, func.avg(Score.value), func.count(Score.value))
        .where(Score.run_id == run_id, Score.metric == metric, Score.final_norm.is_(False))
        .group_by(Score.step)
        .order_by(Score.step)
    )
    rows = session.execute(_step_filter(stmt, from_step, to_step)).all()
    pts = downsample([(s, None if v is None else float(v)) for s, v, _ in rows], max_points)
    return {"steps": [p[0] for p in pts], "values": [p[1] for p in pts], "n_steps": len(rows)}


def heatmap(session: Session, *, run_id: int, metric: str, max_steps: int = 200) -> dict:
    """step × layer matrix; at most ``max_steps`` steps, evenly spread, first and last kept."""
    steps = session.scalars(
        select(Score.step).where(Score.run_id == run_id, Score.metric == metric).distinct().order_by(Score.step)
    ).all()
    if len(steps) > max_steps > 1:
        idx = sorted({round(i * (len(steps) - 1) / (max_steps - 1)) for i in range(max_steps)})
        steps = [steps[i] for i in idx]
    if not steps:
        return {"steps": [], "layers": [], "values": [], "final_norm_layers": []}
    rows = session.execute(
        select(Score.step, Score.layer, Score.value, Score.final_norm).where(
            Score.run_id == run_id, Score.metric == metric, Score.step.in_(steps)
        )
    ).all()
    layers = sorted({r[1] for r in rows})
    col = {lay: j for j, lay in enumerate(layers)}
    row_of = {s: i for i, s in enumerate(steps)}
    values: list[list[float | None]] = [[None] * len(layers) for _ in steps]
    for s, lay, v, _fn in rows:
        values[row_of[s]][col[lay]] = v
    final = sorted({lay for _s, lay, _v, fn in rows if fn})
    return {"steps": list(steps), "layers": layers, "values": values, "final_norm_layers": final}


def profile(session: Session, *, run_id: int, metric: str, steps: list[int] | None = None) -> dict:
    """Per-layer values at the given steps (default: the last step): {steps, layers,
    final_norm_layers, values: [per step, per layer]}; a step with no scores is an error."""
    known = session.scalars(
        select(Score.step).where(Score.run_id == run_id, Score.metric == metric).distinct().order_by(Score.step)
    ).all()
    if not known:
        return {"steps": [], "layers": [], "values": [], "final_norm_layers": [], "available_steps": []}
    steps = steps or [known[-1]]
    missing = [s for s in steps if s not in set(known)]
    if missing:
        raise NotFound(f"no {metric} scores at step(s) {', '.join(map(str, missing))}")
    rows = session.execute(
        select(Score.step, Score.layer, Score.value, Score.final_norm).where(
            Score.run_id == run_id, Score.metric == metric, Score.step.in_(steps))
    ).all()
    layers = sorted({r[1] for r in rows})
    col = {lay: j for j, lay in enumerate(layers)}
    values: list[list[float | None]] = [[None] * len(layers) for _ in steps]
    for s, lay, v, _fn in rows:
        values[steps.index(s)][col[lay]] = v
    return {"steps": steps, "layers": layers, "values": values,
            "final_norm_layers": sorted({lay for _s, lay, _v, fn in rows if fn}), "available_steps": list(known)}


def export_rows(session: Session, *, run_id: int, metric: str | None = None) -> Iterator[tuple]:
    stmt = select(Score.step, Score.layer, Score.metric, Score.value, Score.final_norm, Score.job_id).where(
        Score.run_id == run_id
    )
    if metric:
        stmt = stmt.where(Score.metric == metric)
    yield from session.execute(stmt.order_by(Score.step, Score.metric, Score.layer)).yield_per(5000)
