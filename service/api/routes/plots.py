"""Figures for papers and reports: ``GET /v1/runs/{run}/{trend|heatmap|profile}/plot.png|svg``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from layertrack.workers.vocabulary import DEFAULT_METRIC

from ... import alerts, plots, queries
from ...errors import NotFound
from ..deps import SessionDep, read_scope
from ..params import MetricQ, RunPath, Steps

router = APIRouter(prefix="/v1", tags=["plots"], dependencies=[Depends(read_scope)])

Format = Annotated[str, Path(description="png or svg")]
IMAGE = {200: {"content": {media: {} for media in plots.FORMATS.values()}}}


def _check_format(fmt: str) -> None:
    if fmt not in plots.FORMATS:
        raise NotFound(f"plots come as plot.png or plot.svg, not plot.{fmt}")


def _image(data: bytes, fmt: str, name: str) -> Response:
    filename = name.replace("/", "_")
    return Response(data, media_type=plots.FORMATS[fmt],
                    headers={"Content-Disposition": f'inline; filename="{filename}.{fmt}"'})


def _has_scores(data: dict, run: str, metric: str) -> None:
    if not data["steps"]:
        raise NotFound(f"run {run!r} has no {metric} scores yet")


@router.get("/runs/{run:path}/trend/plot.{fmt}", response_class=Response, responses=IMAGE)
def trend_plot(run: RunPath, fmt: Format, session: SessionDep, metric: MetricQ = DEFAULT_METRIC,
               log_x: bool = False) -> Response:
    """The layer-mean trend as a figure; a fine-tune run continues from its parent's curve;
    firings of layer-mean alert rules are marked."""
    _check_format(fmt)
    r = queries.get_run(session, run)
    t = queries.trend(session, run_id=r.id, metric=metric, max_points=2000)
    _has_scores(t, run, metric)
    parent = None
    if r.parent is not None:
        pt = queries.trend(session, run_id=r.parent.id, metric=metric, to_step=r.parent_step, max_points=2000)
        parent = {"run": r.parent.name, "parent_step": r.parent_step, **pt}
    firings = [{"step": f.step, "value": f.value, "message": f.message}
               for f in alerts.firings(session, r, metric=metric, layer_mean_only=True)]
    data = plots.trend_figure(run, metric, t, log_x=log_x, parent=parent, firings=firings, fmt=fmt)
    return _image(data, fmt, f"{run}-{metric}-trend")


@router.get("/runs/{run:path}/heatmap/plot.{fmt}", response_class=Response, responses=IMAGE)
def heatmap_plot(run: RunPath, fmt: Format, session: SessionDep, metric: MetricQ = DEFAULT_METRIC) -> Response:
    """The step × layer heatmap as a figure."""
    _check_format(fmt)
    r = queries.get_run(session, run)
    h = queries.heatmap(session, run_id=r.id, metric=metric, max_steps=400)
    _has_scores(h, run, metric)
    return _image(plots.heatmap_figure(run, metric, h, fmt=fmt), fmt, f"{run}-{metric}-heatmap")


@router.get("/runs/{run:path}/profile/plot.{fmt}", response_class=Response, responses=IMAGE)
def profile_plot(run: RunPath, fmt: Format, session: SessionDep, metric: MetricQ = DEFAULT_METRIC,
                 step: Steps = None) -> Response:
    """Per-layer values at one or more steps as a figure."""
    _check_format(fmt)
    r = queries.get_run(session, run)
    prof = queries.profile(session, run_id=r.id, metric=metric, steps=step)
    _has_scores(prof, run, metric)
    return _image(plots.profile_figure(run, metric, prof, fmt=fmt), fmt, f"{run}-{metric}-profile")
