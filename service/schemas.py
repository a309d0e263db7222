"""Request and response bodies of the HTTP API (the API never returns ORM rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .jobs import KNOWN_METRICS

RunName = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    seq_len: int = Field(default=512, ge=2, le=131_072)
    drop_first_token: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


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


class TokenOut(BaseModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
