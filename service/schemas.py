"""Request and response bodies of the HTTP API (the API never returns ORM rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .jobs import KNOWN_METRICS

RunName = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    seq_len: int = Field(default=512, ge=2, le=131_072)
    drop_first_token: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: also measure linear replaceability per block (metrics loss_delta_linear, loss_delta_drop)
    replaceability: bool = False
    holdout_tokens: int = Field(default=4096, ge=16, le=1_000_000)


class CheckpointIn(BaseModel):
    """A checkpoint to score: the run it belongs to, its training step and where it is."""

    model_config = ConfigDict(extra="forbid")

    run: str = RunName
    step: int = Field(ge=0, le=2**62)
    uri: str = Field(min_length=1, max_length=4096, description="checkpoint directory: a path or file:// URI")
    phase: Literal["pretrain", "finetune"] | None = None
    parent_run: str | None = Field(default=None, min_length=1, max_length=200)
    parent_step: int | None = Field(default=None, ge=0)
    probe: str = Field(default="default", max_length=200)
    metrics: list[str] | None = Field(default=None, max_length=16)
    config: ScoreOptions = Field(default_factory=ScoreOptions)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        unknown = [m for m in v if m not in KNOWN_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(KNOWN_METRICS)}")
        if not v:
            raise ValueError("metrics, when given, must name at least one metric")
        return sorted(set(v))


class JobOut(BaseModel):
    id: str
    status: str
    status_url: str
    run: str
    step: int
    phase: str
    uri: str
    probe: str
    config: dict[str, Any]
    attempts: int
    worker: str | None
    error_code: str | None
    error: str | None
    result: dict[str, Any] | None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None


class RunOut(BaseModel):
    name: str
    phase: str
    parent_run: str | None
    parent_step: int | None
    created_at: datetime
    last_step: int | None
    n_checkpoints: int
    jobs: dict[str, int]
    #: the latest time one of its jobs was queued, started or finished
    last_activity: datetime


class TokenOut(BaseModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


# ------------------------------------------------------------------ webhooks
WebhookEvent = Literal["job.succeeded", "job.failed", "trend.alert"]


class WebhookIn(BaseModel):
    """A subscription: where to POST which events, for one run or (no run) for every run."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2000, description="http(s) URL of the receiver")
    events: list[WebhookEvent] = Field(default_factory=lambda: ["job.succeeded", "job.failed", "trend.alert"],
                                       min_length=1)
    run: str | None = Field(default=None, min_length=1, max_length=200, description="only this run's events")
    secret: str | None = Field(default=None, max_length=200,
                               description="whsec_<base64> signing secret; generated when left out")
    description: str = Field(default="", max_length=200)


class WebhookPatch(BaseModel):
    """Change a subscription: pause it (``active: false``: events are not recorded for it),
    resume it, or change its events or description. The URL and secret stay."""

    model_config = ConfigDict(extra="forbid")

    active: bool | None = None
    events: list[WebhookEvent] | None = Field(default=None, min_length=1)
    description: str | None = Field(default=None, max_length=200)


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    run: str | None
    description: str
    active: bool
    created_at: datetime
    #: only in the answer to the creation
    secret: str | None = None


class AttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float


class DeliveryOut(BaseModel):
    id: str
    webhook_id: int
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    payload: dict[str, Any]
    attempt_log: list[AttemptOut]


class HookSourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = RunName
    secret: str | None = Field(default=None, max_length=200,
                               description="whsec_<base64> signing secret; generated when left out")


class HookSourceOut(BaseModel):
    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None
    secret: str | None = None


# ------------------------------------------------------------------ alerts
class AlertRuleIn(BaseModel):
    """``threshold``: fires when the value crosses ``above`` or ``below``. ``sigma``: fires when
    the value is more than ``k`` standard deviations from the mean of the previous ``window``
    checkpoints. ``layer`` left out: the layer mean."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    layer: int | None = Field(default=None, ge=0)
    kind: Literal["threshold", "sigma"]
    above: float | None = None
    below: float | None = None
    k: float | None = Field(default=None, gt=0)
    window: int | None = Field(default=None, ge=2, le=1000)
    description: str = Field(default="", max_length=200)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in KNOWN_METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(KNOWN_METRICS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AlertRuleIn:
        if self.kind == "threshold":
            if self.above is None and self.below is None:
                raise ValueError("a threshold rule needs 'above', 'below' or both")
            if self.k is not None or self.window is not None:
                raise ValueError("'k' and 'window' belong to sigma rules; a threshold rule takes 'above'/'below'")
            if self.above is not None and self.below is not None and self.below >= self.above:
                raise ValueError("'below' must be smaller than 'above' (the rule fires outside [below, above])")
        else:
            if self.k is None:
                raise ValueError("a sigma rule needs 'k' (how many standard deviations)")
            if self.above is not None or self.below is not None:
                raise ValueError("'above'/'below' belong to threshold rules; a sigma rule takes 'k' and 'window'")
            if self.window is None:
                self.window = 5
        return self


class AlertRuleOut(BaseModel):
    id: int
    run: str
    metric: str
    layer: int | None
    kind: str
    above: float | None
    below: float | None
    k: float | None
    window: int | None
    description: str
    enabled: bool
    created_at: datetime


class AlertFiringOut(BaseModel):
    id: int
    rule_id: int
    run: str
    step: int
    value: float
    message: str
    details: dict[str, Any]
    job_id: str | None
    created_at: datetime
