"""``GET /v1/meta``: the vocabulary (metrics, statuses, events, defaults) for clients such as
the dashboard, so none of them keeps a list of its own, and what the token sent may do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from layertrack.workers import vocabulary as v

from ...auth import SCOPES
from ..deps import CurrentCaller, current_caller

router = APIRouter(prefix="/v1", tags=["meta"], dependencies=[Depends(current_caller)])


@router.get("/meta")
def meta(caller: CurrentCaller) -> dict[str, Any]:
    """Metric names, labels, kinds (pair: block i → i+1; layer: hidden state i) and value
    ranges, and whether a job measures it by default; job statuses; webhook events; scoring
    defaults; the token's name, scopes and run patterns (null: every run)."""
    return {
        "token": {"name": caller.name, "scopes": [s for s in SCOPES if caller.has(s)],
                  "runs": list(caller.run_patterns) or None},
        "metrics": [
            {"name": m, "label": v.METRIC_LABELS[m], "kind": "layer" if m in v.PER_LAYER_METRICS else "pair",
             "range": list(v.METRIC_RANGES[m]), "default": m in v.BASE_METRICS}
            for m in v.KNOWN_METRICS
        ],
        "default_metric": v.DEFAULT_METRIC,
        "job_statuses": [s.value for s in v.JobStatus],
        "phases": [p.value for p in v.Phase],
        "webhook_events": list(v.WEBHOOK_EVENTS),
        "defaults": {
            "probe": v.DEFAULT_PROBE, "seq_len": v.DEFAULT_SEQ_LEN, "min_tokens": v.DEFAULT_MIN_TOKENS,
            "holdout_tokens": v.DEFAULT_HOLDOUT_TOKENS, "min_tokens_per_dim": v.MIN_TOKENS_PER_DIM,
            "warn_tokens_per_dim": v.WARN_TOKENS_PER_DIM,
        },
    }
