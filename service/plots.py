"""Figures for papers and reports (PNG or SVG), drawn with matplotlib's object API (no pyplot
state, so concurrent requests do not share a figure). Colours: the Okabe–Ito palette for
lines (distinguishable with colour-vision deficiencies) and viridis for heatmaps."""

from __future__ import annotations

import io
import math
from typing import Any

from layertrack.workers.vocabulary import METRIC_LABELS

#: Okabe & Ito (2008), colour-blind safe
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
FORMATS = {"png": "image/png", "svg": "image/svg+xml"}


def _figure(width: float = 7.5, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _bytes(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def log_step_axis(ax) -> None:
    """Log-scale the x (step) axis of ``ax`` and label its ticks with plain step numbers
    (1, 10, 100, 1000, not 10⁰ or 1.0); an axis spanning less than about two decades also
    labels steps between the powers of ten (2, 3, 5, ...), so a short run is never left with
    one label or none."""
    from matplotlib.ticker import LogFormatter

    class PlainSteps(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):  # LogFormatter's hook for the label text
            return f"{x:.0f}" if x >= 1 else f"{x:g}"

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PlainSteps(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(PlainSteps(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def trend_figure(run: str, metric: str, trend: dict[str, Any], *, log_x: bool = False,
                 parent: dict[str, Any] | None = None, firings: list[dict[str, Any]] = (), fmt: str = "png") -> bytes:
    """Layer mean vs step; a fine-tune run continues from its parent (drawn in grey)."""
    return _bytes(trend_axes(run, metric, trend, log_x=log_x, parent=parent, firings=firings).figure, fmt)


def trend_axes(run: str, metric: str, trend: dict[str, Any], *, log_x: bool = False,
               parent: dict[str, Any] | None = None, firings: list[dict[str, Any]] = ()):
    """The axes of :func:`trend_figure`'s figure."""
    fig = _figure()
    ax = fig.add_subplot()
    offset = 0
    if parent is not None:
        offset = parent["parent_step"] or 0
        ax.plot(parent["steps"], _nan(parent["values"]), color="#999999", marker=".",
                label=f"{parent['run']} (parent)")
        ax.axvline(offset, color="#999999", linestyle=":", linewidth=1)
    xs = [s + offset for s in trend["steps"]]
    ax.plot(xs, _nan(trend["values"]), color=PALETTE[0], marker="o", markersize=4, label=run)
    if firings:
        by_step = dict(zip(trend["steps"], trend["values"], strict=True))
        fx = [f["step"] + offset for f in firings]
        fy = [by_step.get(f["step"], f["value"]) for f in firings]
        ax.scatter(fx, _nan(fy), marker="v", s=70, color=PALETTE[3], zorder=3, label="alert fired")
    if log_x:
        log_step_axis(ax)
    else:
        integer_ticks(ax.xaxis)  # a run of a few steps: 1, 2, 3, not 1.25, 1.5
    ax.set_xlabel("training step" + (f" (fine-tuning from step {offset} of the parent)" if parent else ""))
    ax.set_ylabel(f"layer mean of {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(f"{run}: {metric}, layer mean per step")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return ax


def heatmap_figure(run: str, metric: str, heat: dict[str, Any], *, fmt: str = "png") -> bytes:
    """step × layer, viridis, with a colour bar; the final-norm pair is left out."""
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    final = set(heat.get("final_norm_layers", []))
    keep = [j for j, layer in enumerate(heat["layers"]) if layer not in final]
    grid = [[_nan([row[j] for j in keep])[k] for row in heat["values"]] for k in range(len(keep))]
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    steps = heat["steps"]
    ticks = sorted({round(i * (len(steps) - 1) / 7) for i in range(8)}) if len(steps) > 8 else range(len(steps))
    ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks], rotation=45)
    layers = [heat["layers"][j] for j in keep]
    yt = range(len(layers)) if len(layers) <= 16 else range(0, len(layers), max(1, len(layers) // 12))
    ax.set_yticks(list(yt), [f"{layers[i]}→{layers[i] + 1}" for i in yt])
    ax.set_xlabel("training step")
    ax.set_ylabel("block (hidden state i → i+1)")
    ax.set_title(f"{run}: {metric} per block and step")
    fig.colorbar(im, ax=ax, label=METRIC_LABELS.get(metric, metric))
    return _bytes(fig, fmt)


def integer_ticks(axis) -> None:
    """Ticks on whole numbers only (blocks, steps): never 0.25 or 2.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def profile_figure(run: str, metric: str, prof: dict[str, Any], *, fmt: str = "png") -> bytes:
    """Per-layer values at one step (or several, to compare)."""
    return _bytes(profile_axes(run, metric, prof).figure, fmt)


def profile_axes(run: str, metric: str, prof: dict[str, Any]):
    """The axes of :func:`profile_figure`'s figure: a line per step over the blocks, the x-axis
    ticked at whole blocks."""
    fig = _figure()
    ax = fig.add_subplot()
    final = set(prof.get("final_norm_layers", []))
    for k, step in enumerate(prof["steps"]):
        pts = [(layer, v) for layer, v in zip(prof["layers"], prof["values"][k], strict=True) if layer not in final]
        ax.plot([p[0] for p in pts], _nan([p[1] for p in pts]), marker="o", color=PALETTE[k % len(PALETTE)],
                label=f"step {step}")
    integer_ticks(ax.xaxis)
    ax.set_xlabel("block i (hidden state i → i+1)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{run}: {metric} per block")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return ax
