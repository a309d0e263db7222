"""The figures of service/plots.py (the PNG/SVG routes and the demo draw them): their axes."""

from __future__ import annotations

import pytest
from layertrack.service import plots


def visible_ticks(axis, lim: tuple[float, float]) -> list[float]:
    lo, hi = sorted(lim)
    return [t for t in axis.get_ticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


@pytest.mark.parametrize("n_blocks", [2, 3, 5, 12, 40])
def test_the_profile_x_axis_has_whole_block_ticks_only(n_blocks):
    layers = list(range(n_blocks + 1))  # the last is the final-norm pair, left out
    prof = {"steps": [100, 200], "layers": layers, "final_norm_layers": [n_blocks],
            "values": [[0.1 * (i % 4) for i in layers], [0.2 + 0.01 * i for i in layers]]}
    ax = plots.profile_axes("r", "linearity_nores", prof)
    ax.figure.canvas.draw()
    ticks = visible_ticks(ax.xaxis, ax.get_xlim())
    assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks
    labels = [t.get_text().replace("−", "-") for t in ax.get_xticklabels() if t.get_position()[0] in ticks]
    assert labels == [str(int(t)) for t in ticks], labels  # "1", not "1.0" or "0.25"
    assert plots.profile_figure("r", "linearity_nores", prof, fmt="png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_short_trend_on_a_linear_axis_has_whole_step_ticks_only():
    ax = plots.trend_axes("r", "linearity", {"steps": [1, 2, 3], "values": [0.5, 0.6, 0.55]})
    ax.figure.canvas.draw()
    assert visible_ticks(ax.xaxis, ax.get_xlim()) == [1.0, 2.0, 3.0]
    assert plots.trend_figure("r", "linearity", {"steps": [1, 2, 3], "values": [0.5, 0.6, 0.55]},
                              fmt="svg").startswith(b"<?xml")
