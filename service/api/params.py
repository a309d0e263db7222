"""Query parameters several routes share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from ..schemas import MetricName

#: query metric; the API's default is linearity (the paper's headline score)
MetricQ = Annotated[MetricName, Query(description="which metric")]
MaxPoints = Annotated[int, Query(ge=2, le=100_000, description="at most this many points per series")]
StepQ = Annotated[int | None, Query(ge=0)]
Steps = Annotated[list[int] | None, Query(description="steps (repeat); default: the last step")]
Limit = Annotated[int, Query(ge=1, le=1000)]
