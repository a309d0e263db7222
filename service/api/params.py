"""Query and path parameters the routes share.

Every integer is bounded by the database column it is compared with (service/models.py:
Integer ids and layers up to 2**31 - 1, BigInteger steps) and must be written in digits
(``0.0``, ``1e3`` are refused), and every string is refused when it holds what PostgreSQL
cannot store (a NUL character), so such input gets a 422 that names the parameter, never a
database error.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import AfterValidator, Field

from ..schemas import INT32_MAX, STEP_MAX, MetricName, int_between, no_nul


def query_int(lo: int, hi: int, *, optional: bool = False, **query: Any) -> Any:
    """An integer query parameter in [lo, hi] (``optional``: may be left out, None)."""
    kind = int | None if optional else int
    return Annotated[kind, Query(ge=lo, le=hi, **query), int_between(lo, hi, from_text=True)]


def path_int(lo: int, hi: int, **path: Any) -> Any:
    """An integer path parameter in [lo, hi]."""
    return Annotated[int, Path(ge=lo, le=hi, **path), int_between(lo, hi, from_text=True)]


def query_text(*, optional: bool = False, **query: Any) -> Any:
    """A string query parameter without NUL characters."""
    kind = str | None if optional else str
    return Annotated[kind, Query(**query), AfterValidator(no_nul)]


def path_text(**path: Any) -> Any:
    """A string path parameter without NUL characters."""
    return Annotated[str, Path(**path), AfterValidator(no_nul)]


#: query metric; where a route has a default it is the vocabulary's DEFAULT_METRIC (linearity_nores)
MetricQ = Annotated[MetricName, Query(description="which metric")]
MaxPoints = query_int(2, 100_000, description="at most this many points per series")
StepQ = query_int(0, STEP_MAX, optional=True)
Steps = Annotated[
    list[Annotated[int, Field(ge=0, le=STEP_MAX), int_between(0, STEP_MAX, from_text=True)]] | None,
    Query(description="steps (repeat); default: the last step"),
]
Limit = query_int(1, 1000)
#: a layer (block pair i → i+1, or hidden state i)
LayerQ = query_int(0, INT32_MAX, optional=True, description="one layer; default: every layer")

#: a run's name in a path (``{run:path}``: it may contain '/')
RunPath = path_text(description="the run's name (it may contain '/', as in org/llama-350m)")
#: a run's name in a query
RunQ = query_text(optional=True, max_length=200, description="a run's name")
JobId = path_text(description="the job's id")
DeliveryId = path_text(description="the delivery's id (its webhook-id)")
HookSourceName = path_text(description="the hook source's name")
WebhookId = path_int(1, INT32_MAX, description="the subscription's id")
AlertRuleId = path_int(1, INT32_MAX, description="the alert rule's id")
#: the runs list's filter
NameContainsQ = query_text(optional=True, max_length=200, description="only runs whose name contains this")
#: several runs' names, comma separated
RunsQ = query_text(max_length=4200, description="run names, comma separated")
MaxSteps = query_int(2, 5000, description="at most this many steps (evenly spread, first and last kept)")
FiringsLimit = query_int(1, 10_000)
EventQ = query_text(optional=True, max_length=32, description="only deliveries of this event")
HookSourceQ = query_text(optional=True, max_length=200, description="the hook source's name")
