"""The dashboard (HTML pages under /, charts drawn in the browser by the bundled ECharts) and
the plot files for papers and reports (``GET /v1/runs/{run}/{trend|heatmap|profile}/plot.png|svg``).

The pages are static shells: every number they show comes from the /v1 API, with the same
bearer token (entered once on the page and kept in the browser's local storage). Nothing is
loaded from a CDN: ECharts ships inside the package (service/static/vendor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select

from . import plots, queries
from .http import Problem, SessionDep, authed_session, check_metric, get_run
from .models import AlertFiring, AlertRule

STATIC = Path(__file__).parent / "static"

api = APIRouter(prefix="/v1", dependencies=[Depends(authed_session)])
pages = APIRouter(include_in_schema=False)

Steps = Annotated[list[int] | None, Query(description="steps (repeat); default: the last step")]


def _fmt(fmt: str) -> str:
    if fmt not in plots.FORMATS:
        raise Problem(404, "Not found", f"plots come as plot.png or plot.svg, not plot.{fmt}")
    return fmt


def _profile(session, run: str, metric: str, steps: list[int] | None) -> dict:
    r = get_run(session, run)
    try:
        return queries.profile(session, run_id=r.id, metric=check_metric(metric), steps=steps)
    except LookupError as e:
        raise Problem(404, "Not found", f"run {run!r} has {e}") from None


@api.get("/runs/{run}/profile")
def run_profile(run: str, session: SessionDep, metric: str = "linearity", step: Steps = None) -> dict:
    """Per-layer values at one or more steps (to compare); ``available_steps`` lists the rest."""
    return {"run": run, "metric": metric, **_profile(session, run, metric, step)}


def _firings(session, run_id: int, metric: str) -> list[dict]:
    rows = session.execute(
        select(AlertFiring.step, AlertFiring.value, AlertFiring.message)
        .join(AlertRule, AlertRule.id == AlertFiring.rule_id)
        .where(AlertFiring.run_id == run_id, AlertRule.metric == metric, AlertRule.layer.is_(None))
        .order_by(AlertFiring.step)
    ).all()
    return [{"step": s, "value": v, "message": m} for s, v, m in rows]


def _image(data: bytes, fmt: str, name: str) -> Response:
    return Response(data, media_type=plots.FORMATS[fmt],
                    headers={"Content-Disposition": f'inline; filename="{name}.{fmt}"'})


def _has_scores(data: dict, run: str, metric: str) -> None:
    if not data["steps"]:
        raise Problem(404, "Not found", f"run {run!r} has no {metric} scores yet")


@api.get("/runs/{run}/trend/plot.{fmt}", response_class=Response,
         responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}})
def trend_plot(run: str, fmt: str, session: SessionDep, metric: str = "linearity", log_x: bool = False) -> Response:
    """The layer-mean trend as a figure; a fine-tune run continues from its parent's curve;
    firings of layer-mean alert rules are marked."""
    fmt, r = _fmt(fmt), get_run(session, run)
    t = queries.trend(session, run_id=r.id, metric=check_metric(metric), max_points=2000)
    _has_scores(t, run, metric)
    parent = None
    if r.parent is not None:
        pt = queries.trend(session, run_id=r.parent.id, metric=metric, to_step=r.parent_step, max_points=2000)
        parent = {"run": r.parent.name, "parent_step": r.parent_step, **pt}
    data = plots.trend_figure(run, metric, t, log_x=log_x, parent=parent,
                              firings=_firings(session, r.id, metric), fmt=fmt)
    return _image(data, fmt, f"{run}-{metric}-trend")


@api.get("/runs/{run}/heatmap/plot.{fmt}", response_class=Response,
         responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}})
def heatmap_plot(run: str, fmt: str, session: SessionDep, metric: str = "linearity") -> Response:
    fmt, r = _fmt(fmt), get_run(session, run)
    h = queries.heatmap(session, run_id=r.id, metric=check_metric(metric), max_steps=400)
    _has_scores(h, run, metric)
    return _image(plots.heatmap_figure(run, metric, h, fmt=fmt), fmt, f"{run}-{metric}-heatmap")


@api.get("/runs/{run}/profile/plot.{fmt}", response_class=Response,
         responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}})
def profile_plot(run: str, fmt: str, session: SessionDep, metric: str = "linearity", step: Steps = None) -> Response:
    fmt = _fmt(fmt)
    prof = _profile(session, run, metric, step)
    _has_scores(prof, run, metric)
    return _image(plots.profile_figure(run, metric, prof, fmt=fmt), fmt, f"{run}-{metric}-profile")


# ------------------------------------------------------------------ pages
def _page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@pages.get("/")
def runs_page() -> FileResponse:
    return _page()


@pages.get("/runs/{run:path}")
def run_page(run: str) -> FileResponse:
    return _page()


@pages.get("/jobs")
def jobs_page() -> FileResponse:
    return _page()


@pages.get("/compare")
def compare_page() -> FileResponse:
    return _page()


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)
