"""Runs and their scores: list, read, per-layer series, layer-mean trends, heatmaps,
per-layer profiles, exports, several runs compared; and deleting a run (admin).

A run's name may contain ``/`` (``org/llama-350m``): every route takes it as ``{run:path}``.
The routes with a suffix (``/trend`` ...) are declared before ``GET /runs/{run:path}``, which
would otherwise match them; run names may not contain those suffix words as a part."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse
from layertrack.workers.vocabulary import DEFAULT_METRIC

from ... import queries, run_deletion
from ...errors import Invalid
from ...schemas import (
    CompareOut,
    CompareRunOut,
    HeatmapOut,
    ProfileOut,
    RunDeletionOut,
    RunOut,
    ScoresOut,
    TrendOut,
)
from ..deps import SessionDep, admin_scope, read_scope
from ..params import LayerQ, MaxPoints, MaxSteps, MetricQ, NameContainsQ, RunPath, RunsQ, StepQ, Steps
from ..problems import problem_responses

router = APIRouter(prefix="/v1", tags=["runs"], dependencies=[Depends(read_scope)])

#: DELETE /v1/runs/{run}?dry_run=true: count what would be deleted, delete nothing
DryRunQ = Annotated[bool, Query(description="true: only count what would be deleted, and delete nothing")]
EXPORT_COLUMNS = ["run", "step", "layer", "metric", "value", "final_norm", "job_id"]


@router.get("/runs", response_model=list[RunOut])
def list_runs(session: SessionDep, name: NameContainsQ = None) -> list[RunOut]:
    """Every run (or those whose name contains ``name``), oldest first."""
    return [RunOut.of(queries.run_summary(session, r)) for r in queries.list_runs(session, name_contains=name)]


@router.get("/runs/{run:path}/scores", response_model=ScoresOut)
def run_scores(
    run: RunPath, session: SessionDep, metric: MetricQ = DEFAULT_METRIC, layer: LayerQ = None,
    from_step: StepQ = None, to_step: StepQ = None, max_points: MaxPoints = 500,
) -> ScoresOut:
    """Per-layer series, downsampled server-side to at most max_points per layer (extremes kept)."""
    r = queries.get_run(session, run)
    s = queries.series(session, run_id=r.id, metric=metric, layer=layer, from_step=from_step, to_step=to_step,
                       max_points=max_points)
    return ScoresOut(run=run, metric=metric, series=s)


@router.get("/runs/{run:path}/trend", response_model=TrendOut)
def run_trend(
    run: RunPath, session: SessionDep, metric: MetricQ = DEFAULT_METRIC,
    from_step: StepQ = None, to_step: StepQ = None, max_points: MaxPoints = 500,
) -> TrendOut:
    """Layer mean per step (the final-norm pair left out)."""
    r = queries.get_run(session, run)
    t = queries.trend(session, run_id=r.id, metric=metric, from_step=from_step, to_step=to_step,
                      max_points=max_points)
    return TrendOut(run=run, metric=metric, **t)


@router.get("/runs/{run:path}/heatmap", response_model=HeatmapOut)
def run_heatmap(
    run: RunPath, session: SessionDep, metric: MetricQ = DEFAULT_METRIC,
    max_steps: MaxSteps = 200,
) -> HeatmapOut:
    """step × layer values, at most max_steps steps (evenly spread, first and last kept)."""
    r = queries.get_run(session, run)
    return HeatmapOut(run=run, metric=metric, **queries.heatmap(session, run_id=r.id, metric=metric,
                                                                max_steps=max_steps))


@router.get("/runs/{run:path}/profile", response_model=ProfileOut)
def run_profile(run: RunPath, session: SessionDep, metric: MetricQ = DEFAULT_METRIC, step: Steps = None) -> ProfileOut:
    """Per-layer values at one or more steps (to compare); ``available_steps`` lists the rest."""
    r = queries.get_run(session, run)
    return ProfileOut(run=run, metric=metric, **queries.profile(session, run_id=r.id, metric=metric, steps=step))


@router.get("/runs/{run:path}/export", response_class=Response, responses={200: {"content": {
    "text/csv": {"schema": {"type": "string"}},
    "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
}, "description": "CSV (format=csv, the default) or Parquet (format=parquet)"}})
def run_export(
    run: RunPath, session: SessionDep, format: Literal["csv", "parquet"] = "csv", metric: MetricQ | None = None,
):
    """Every stored score of the run as CSV (streamed) or Parquet."""
    r = queries.get_run(session, run)
    rows = queries.export_rows(session, run_id=r.id, metric=metric)
    filename = run.replace("/", "_")
    if format == "csv":
        return StreamingResponse(_csv(run, rows), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'})
    return Response(_parquet(run, rows), media_type="application/vnd.apache.parquet",
                    headers={"Content-Disposition": f'attachment; filename="{filename}.parquet"'})


def _csv(run: str, rows) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(EXPORT_COLUMNS)
    for i, (step, layer, m, value, fn, job_id) in enumerate(rows):
        w.writerow([run, step, layer, m, "" if value is None else repr(value), int(fn), job_id])
        if i % 2000 == 1999:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _parquet(run: str, rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {c: [] for c in EXPORT_COLUMNS}
    for step, layer, m, value, fn, job_id in rows:
        for c, v in zip(EXPORT_COLUMNS, (run, step, layer, m, value, bool(fn), job_id), strict=True):
            cols[c].append(v)
    table = pa.table({
        "run": pa.array(cols["run"], pa.string()), "step": pa.array(cols["step"], pa.int64()),
        "layer": pa.array(cols["layer"], pa.int32()), "metric": pa.array(cols["metric"], pa.string()),
        "value": pa.array(cols["value"], pa.float64()), "final_norm": pa.array(cols["final_norm"], pa.bool_()),
        "job_id": pa.array(cols["job_id"], pa.string()),
    })
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


@router.get("/compare", response_model=CompareOut)
def compare_runs(
    session: SessionDep, runs: RunsQ,
    metric: MetricQ = DEFAULT_METRIC, max_points: MaxPoints = 500,
) -> CompareOut:
    """Layer-mean trends of several runs in one call."""
    names = [n for n in (x.strip() for x in runs.split(",")) if n]
    if not 1 <= len(names) <= 20:
        raise Invalid("give between 1 and 20 run names, comma separated")
    out = []
    for name in names:
        r = queries.get_run(session, name)
        out.append(CompareRunOut(run=name, phase=r.phase.value, parent_run=r.parent.name if r.parent else None,
                                 parent_step=r.parent_step,
                                 **queries.trend(session, run_id=r.id, metric=metric, max_points=max_points)))
    return CompareOut(metric=metric, runs=out)


def read_run(run: RunPath, session: SessionDep) -> RunOut:
    """One run: phase, parent, last step, job counts by status, last activity."""
    return RunOut.of(queries.run_summary(session, queries.get_run(session, run)))


def delete_run(run: RunPath, session: SessionDep, dry_run: DryRunQ = False) -> RunDeletionOut:
    """Delete the run with its checkpoints, jobs and scores, its alert rules and their firings,
    and the webhook subscriptions limited to it (with their deliveries); its fine-tunes are
    kept without a parent. The answer counts what was deleted; with ``dry_run=true``, what
    would be, and nothing is. 409 (``run_has_active_jobs``) while it has queued or running
    jobs: cancel them first."""
    r = queries.get_run(session, run)
    if dry_run:
        return RunDeletionOut.of(run_deletion.contents(session, r), deleted=False)
    return RunDeletionOut.of(run_deletion.delete_run(session, r), deleted=True)


#: declared by create_app after every other /v1/runs/{run:path}/... route, which it would match
last = APIRouter(prefix="/v1", tags=["runs"])
#: {run:run} (problems.RunNameConvertor): no run name has a view's word as a part, so GET on a longer
#: run path (/v1/runs/x/alerts/5, which only DELETE takes) is 405, not "no run named 'x/alerts/5'"
last.add_api_route("/runs/{run:run}", read_run, methods=["GET"], response_model=RunOut,
                   dependencies=[Depends(read_scope)])
last.add_api_route("/runs/{run:run}", delete_run, methods=["DELETE"], response_model=RunDeletionOut,
                   dependencies=[Depends(admin_scope)], responses=problem_responses(409))
