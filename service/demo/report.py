"""What the demo shows: the trend table, the per-block replaceability table with Spearman's
rank correlations, ``summary.json``, and the figures, drawn by ``layertrack.service.plots``
(the service's own figure functions: matplotlib's object API, no pyplot state)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: the linearity scores the demo follows (the trend table adds cosine)
METRICS = ("linearity", "linearity_nores")
TABLE_METRICS = (*METRICS, "cosine")
#: the replaceability metrics, per block
LOSSES = ("loss_delta_linear", "loss_delta_drop")
#: the metric of the figures: the paper's residual-removed linearity
FIGURE_METRIC = "linearity_nores"


def spearman(a: list[float | None], b: list[float | None]) -> float | None:
    """Spearman's rank correlation of the pairs where both values are known (average ranks
    for ties); None when it is undefined (fewer than 3 pairs, or one side constant)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if _known(x) and _known(y)]
    if len(pairs) < 3:
        return None
    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def _known(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def _num(v: float | None, width: int, precision: int = 6, sign: str = "") -> str:
    """``v`` right-aligned in ``width``; ``-`` when it is unknown."""
    return f"{v:>{sign}{width}.{precision}f}" if _known(v) else f"{'-':>{width}}"


def trend_table(trends: dict[str, dict[str, dict]]) -> str:
    """One row per scored step of each run (run → metric → trend), one column per metric."""
    lines = [f"{'run':<34} {'step':>6} " + " ".join(f"{m:>16}" for m in TABLE_METRICS)]
    for run, by_metric in trends.items():
        first = by_metric[TABLE_METRICS[0]]
        for i, step in enumerate(first["steps"]):
            lines.append(f"{run:<34} {step:>6} "
                         + " ".join(_num(by_metric[m]["values"][i], 16) for m in TABLE_METRICS))
    return "\n".join(lines)


def replaceability_table(phase: str, r: dict[str, Any]) -> str:
    """Per block at the phase's last step: the linearities and the loss changes; then
    Spearman's ρ between them over the blocks ("n/a" below 3 blocks, where it means nothing)."""
    cols = (*METRICS, *LOSSES)
    lines = [f"{phase} step {r['step']}, per block (Δloss: nats/token on held-out probe tokens)",
             f"  {'block':>5}  " + " ".join(f"{m:>17}" for m in cols)]
    for i, layer in enumerate(r["layers"]):
        lines.append(f"  {layer:>5}  " + " ".join(_num(r[m][i], 17) for m in cols))
    n = len(r["layers"])
    lines.append(f"  {f'Spearman ρ over {n} blocks':<43}" + " ".join(f"{m:>17}" for m in LOSSES))
    for a in METRICS:
        lines.append(f"  {a:<43}" + " ".join(
            _num(r["spearman"][f"{a}~{b}"], 17, 3, "+") if n >= 3 else f"{'n/a':>17}" for b in LOSSES))
    if n < 3:
        lines.append("  (a rank correlation needs at least 3 blocks besides the one into the final norm: --layers 4+)")
    return "\n".join(lines)


def replaceability(step: int, per_block: dict[int, dict[str, float | None]]) -> dict[str, Any]:
    """The summary of one phase's replaceability: per block values and their correlations."""
    layers = sorted(per_block)
    col = {m: [per_block[i].get(m) for i in layers] for m in (*METRICS, *LOSSES)}
    return {"step": step, "layers": layers, **col,
            "spearman": {f"{a}~{b}": spearman(col[a], col[b]) for a in METRICS for b in LOSSES}}


#: the metrics between checkpoints the demo reports (each step against the previous one)
DYNAMICS = ("drift_cka", "weight_update")


def dynamics(heat: dict[str, Any]) -> dict[str, Any]:
    """The summary of one run's ``drift_cka`` (a heatmap answer: steps × hidden states): per
    step the mean over the hidden states, whether it falls with training (Spearman's ρ of the
    mean against the step), and whether lower layers settle earlier (Spearman's ρ of the
    hidden state's index against its mean drift over the later half of the steps: positive
    when the upper layers still move more)."""
    steps, layers, values = heat["steps"], heat["layers"], heat["values"]
    means = [(sum(v for v in row if _known(v)) / max(1, sum(_known(v) for v in row))) if row else None
             for row in values]
    late = values[len(values) // 2:]
    per_layer = [(sum(row[j] for row in late if _known(row[j])) / max(1, sum(_known(row[j]) for row in late)))
                 if late else None for j in range(len(layers))]
    return {"steps": steps, "layers": layers, "values": values, "mean_per_step": means,
            "late_mean_per_layer": per_layer,
            "spearman": {"step~mean_drift": spearman(steps, means), "layer~late_drift": spearman(layers, per_layer)}}


def dynamics_table(run: str, d: dict[str, Any]) -> str:
    """drift_cka per hidden state (columns) at each measured step (rows), the mean, then the
    two correlations."""
    if not d["steps"]:
        return f"{run}: no drift_cka measured (no step had a previous checkpoint to compare with)"
    lines = [f"drift_cka (1 − linear CKA against the previous checkpoint) of run {run}",
             f"{'step':>6} " + " ".join(f"{'h' + str(h):>7}" for h in d["layers"]) + f" {'mean':>7}"]
    for step, row, mean in zip(d["steps"], d["values"], d["mean_per_step"], strict=True):
        lines.append(f"{step:>6} " + " ".join(_num(v, 7, 4) for v in row) + f" {_num(mean, 7, 4)}")

    def rho(key: str) -> str:
        v = d["spearman"][key]
        return "n/a" if v is None else f"{v:+.3f}"

    lines.append(f"Spearman ρ(step, mean drift) {rho('step~mean_drift')} (negative: drift falls with training); "
                 f"ρ(layer, drift over the later half) {rho('layer~late_drift')} (positive: upper layers still move "
                 "more, lower ones settled)")
    return "\n".join(lines)


def figures(out: Path, *, runs: dict[str, str], trends: dict[str, dict], heatmaps: dict[str, dict],
            parent_step: int, fmt: str = "png") -> list[Path]:
    """trend.FMT (pretraining, log-scaled steps), trend_finetune.FMT (the fine-tune continuing
    from its parent's step), heatmap_pretrain.FMT and heatmap_finetune.FMT."""
    from layertrack.service import plots

    pre, ft = runs["pretrain"], runs["finetune"]
    pre_trend = trends["pretrain"][FIGURE_METRIC]
    files = {
        f"trend.{fmt}": plots.trend_figure(pre, FIGURE_METRIC, pre_trend, log_x=True, fmt=fmt),
        f"trend_finetune.{fmt}": plots.trend_figure(
            ft, FIGURE_METRIC, trends["finetune"][FIGURE_METRIC], fmt=fmt,
            parent={**pre_trend, "run": pre, "parent_step": parent_step}),
        **{f"heatmap_{phase}.{fmt}": plots.heatmap_figure(runs[phase], heat["metric"], heat, fmt=fmt)
           for phase, heat in heatmaps.items()},
    }
    paths = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    return paths


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """``summary.json``: the plan, the runs, the trends and the replaceability (NaN → null)."""
    path = out / "summary.json"
    path.write_text(json.dumps(_finite(summary), indent=2, allow_nan=False))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
