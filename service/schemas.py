"""Request and response bodies of the HTTP API. The API never returns ORM rows: each
response model has one ``of(...)`` that builds it from what the service layer returns."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from layertrack.workers.vocabulary import (
    CHECKPOINT_FORMATS,
    DEFAULT_HOLDOUT_TOKENS,
    DEFAULT_PROBE,
    DEFAULT_SEQ_LEN,
    KNOWN_METRICS,
    WEBHOOK_EVENTS,
    AlertKind,
    DeliveryStatus,
)
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import alerts
from .models import AlertFiring, AlertRule, Delivery, HookSource, Job, Webhook
from .queries import RunSummary
from .run_deletion import RunContents

#: a metric's name (an enum in the OpenAPI document)
MetricName = Literal[KNOWN_METRICS]  # type: ignore[valid-type]
WebhookEvent = Literal[WEBHOOK_EVENTS]  # type: ignore[valid-type]
#: a webhook delivery's status, an alert rule's kind (enums in the OpenAPI document)
DeliveryStatusName = Literal[tuple(s.value for s in DeliveryStatus)]  # type: ignore[valid-type]
AlertKindName = Literal[tuple(k.value for k in AlertKind)]  # type: ignore[valid-type]

# ------------------------------------------------------------------ bounds every input obeys
#: the largest value of the database's Integer columns (ids, layers); every integer a request
#: gives is bounded by its column (service/models.py), so none reaches the database out of range
INT32_MAX = 2**31 - 1
#: the largest training step accepted: steps are BigInteger (up to 2**63 - 1); 2**62 leaves
#: headroom for arithmetic on them
STEP_MAX = 2**62

#: how a number given as text must look (query and path parameters): digits, nothing else
_DIGITS = re.compile(r"[+-]?[0-9]+")


def _as_json(value: Any) -> str:
    """How the request wrote a value (a body's values come from JSON), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range_error(kind: str, bound: int, lo: int, hi: int) -> PydanticCustomError:
    relation = "greater" if kind == "greater_than_equal" else "less"
    return PydanticCustomError(kind, "Input should be {relation} than or equal to {bound} (allowed: {lo} to {hi})",
                               {"relation": relation, "bound": bound, "lo": lo, "hi": hi})


def int_between(lo: int, hi: int, *, from_text: bool = False) -> WrapValidator:
    """Validate an integer in [lo, hi] with a message that names the field's range. In a
    JSON body only a JSON integer is one (``"7"``, ``7.0`` and ``true`` are refused); in a
    query or path (``from_text``) only digits are (``0.0``, ``1e3``, ``1_000`` are refused).
    Put it after ``Field(ge=lo, le=hi)`` (or ``Query``/``Path`` with the same bounds), which
    documents the range in the OpenAPI schema."""

    def check(value: Any, handler: Any) -> int:
        if from_text and isinstance(value, str):
            if not _DIGITS.fullmatch(value):
                raise PydanticCustomError("int_parsing", "Input should be a valid integer, written in digits "
                                          "(such as 100), not {value}", {"value": repr(value)[:40]})
            if len(value.lstrip("+-").lstrip("0")) > 25:  # far beyond any column: no giant int to parse
                negative = value.startswith("-")
                raise _range_error("greater_than_equal" if negative else "less_than_equal", lo if negative else hi,
                                   lo, hi)
        elif not from_text and (isinstance(value, bool) or not isinstance(value, int)):
            raise PydanticCustomError("int_type", "Input should be a valid integer: a JSON integer such as 7, "
                                      "not {value}", {"value": _as_json(value)})
        try:
            return handler(value)
        except ValidationError as e:
            for err in e.errors():
                if err["type"] in ("greater_than_equal", "less_than_equal"):
                    bound = lo if err["type"] == "greater_than_equal" else hi
                    raise _range_error(err["type"], bound, lo, hi) from None
            raise

    return WrapValidator(check)


def bounded_int(lo: int, hi: int) -> Any:
    """A JSON body's integer in [lo, hi] (documented as minimum/maximum)."""
    return Annotated[int, Field(ge=lo, le=hi), int_between(lo, hi)]


def _finite(value: Any, handler: Any) -> float:
    try:
        return handler(value)
    except ValidationError as e:
        if any(err["type"] == "finite_number" for err in e.errors()):
            raise PydanticCustomError("finite_number", "Input should be a finite number, not {value} (a number "
                                      "beyond ±1.8e308, such as 1e400, reads as Infinity)",
                                      {"value": _as_json(value)}) from None
        raise


def finite_float(**constraints: Any) -> Any:
    """A JSON body's number that is finite (NaN, Infinity and 1e400, which parses as infinity,
    are refused); ``constraints`` are Field's (gt, le ...)."""
    return Annotated[float, Field(allow_inf_nan=False, **constraints), WrapValidator(_finite)]


def no_nul(value: Any) -> Any:
    """Refuse text PostgreSQL cannot store: a NUL character, or a lone UTF-16 surrogate
    (``"\\ud800"`` in JSON), which is not text in any encoding."""
    if isinstance(value, str):
        if "\x00" in value:
            raise PydanticCustomError("string_nul", "must not contain a NUL character (\\u0000, %00); remove it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("string_unicode", "must be valid Unicode text; it holds a lone "
                                      "surrogate (an unpaired \\ud800-\\udfff escape)") from None
    return value


def text(**constraints: Any) -> Any:
    """A request body's string that can be stored (see ``no_nul``); ``constraints`` are
    Field's (max_length, pattern, description ...)."""
    return Annotated[str, Field(**constraints), BeforeValidator(no_nul)]


#: a training step
Step = bounded_int(0, STEP_MAX)

#: the last segment of these paths under /v1/runs/{run}/ names a view of the run, so a run
#: name may not contain them as a segment (``org/trend`` would be ambiguous)
RESERVED_SEGMENTS = frozenset({"scores", "trend", "heatmap", "export", "profile", "alerts", "firings"})


def _run_name(v: str) -> str:
    segments = v.split("/")
    if any(not seg for seg in segments):
        raise ValueError("a run name may contain '/' between parts (org/model), but no empty part: "
                         "no leading, trailing or double '/'")
    if any(seg in (".", "..") for seg in segments):
        raise ValueError("a run name's parts may not be '.' or '..'")
    taken = sorted(seg for seg in segments if seg in RESERVED_SEGMENTS or seg.startswith("plot."))
    if taken:
        raise ValueError(f"a run name may not have a part named {', '.join(map(repr, taken))}: those words "
                         "name views of a run in its URLs (/v1/runs/NAME/trend ...); rename that part")
    return v


def name_chars(what: str, allowed: str, pattern: str) -> WrapValidator:
    """Say in words what ``pattern`` (a name's characters: a letter or digit, then ``allowed``)
    refused, naming the characters that are not allowed, instead of the regular expression.
    Put it after the ``pattern`` constraint, which documents it in the OpenAPI schema."""
    one = re.compile(f"[{pattern.removeprefix('^[A-Za-z0-9][').removesuffix(']*$')}]")

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            if not any(err["type"] == "string_pattern_mismatch" for err in e.errors()) or not isinstance(value, str):
                raise
            bad = sorted({c for c in value if not one.fullmatch(c)})
            if bad:
                shown = ", ".join("a space" if c == " " else repr(c) for c in bad[:8])
                why = f"{shown} {'is' if len(bad) == 1 else 'are'} not allowed"
            else:
                why = f"it starts with {value[0]!r}"
            raise PydanticCustomError(
                "name_characters", "{what} may contain only the letters A-Z and a-z, digits and {allowed}, "
                "starting with a letter or digit: {why}", {"what": what, "allowed": allowed, "why": why}) from None

    return WrapValidator(check)


_RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"
RunName = Annotated[
    text(min_length=1, max_length=200, pattern=_RUN_PATTERN,
         description="letters, digits and . _ : / @ + -; '/' separates parts, as in org/llama-350m"),
    name_chars("a run name", ". _ : / @ + - ('/' between parts, as in org/llama-350m)",
               _RUN_PATTERN),
    AfterValidator(_run_name),
]


class ScoreOptions(BaseModel):
    # ``architecture`` is ``model_config`` in JSON (pydantic keeps that name for itself)
    model_config = ConfigDict(extra="forbid", strict=True, validate_by_name=False, validate_by_alias=True,
                              serialize_by_alias=True, protected_namespaces=())

    max_tokens: bounded_int(1, 10_000_000) | None = None
    seq_len: bounded_int(2, 131_072) = DEFAULT_SEQ_LEN
    drop_first_token: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    #: also measure linear replaceability per block (metrics loss_delta_linear, loss_delta_drop)
    replaceability: bool = False
    holdout_tokens: bounded_int(16, 1_000_000) = DEFAULT_HOLDOUT_TOKENS
    #: also measure logit_lens_loss per hidden state (the LM head loaded; one decode through
    #: the final norm and the LM head per hidden state and batch)
    logit_lens: bool = False
    #: read pickle ``pytorch_model.bin`` weights (loaded with ``weights_only=True``) when the
    #: checkpoint has no safetensors
    allow_pickle: bool = False
    #: measure weight_update per block against the run's previous scored checkpoint: None
    #: (default) when that checkpoint is on a local path, True also otherwise (absent, with
    #: the reason, when it cannot be read), False never
    dynamics: bool | None = None
    #: the checkpoint's layout; None: detected from its files (config.json: hf; ckpt.pt: nanogpt;
    #: .metadata: dcp)
    format: Literal[CHECKPOINT_FORMATS] | None = None
    #: a transformers config.json, or its directory, for a checkpoint that carries no
    #: architecture (dcp); a local path under the checkpoint roots
    architecture: text(min_length=1, max_length=4096) | None = Field(
        default=None, alias="model_config",
        description="a transformers config.json (or its directory) under the checkpoint roots, for a checkpoint "
                    "that carries no architecture (format dcp)")
    #: a tokenizer directory for a checkpoint saved without one, under the checkpoint roots
    tokenizer: text(min_length=1, max_length=4096) | None = None
    #: what weight_update and drift_cka compare with instead of the run's previous scored step:
    #: a step of the run (an integer) or a checkpoint's local path under the checkpoint roots
    compare_to: bounded_int(0, 2**63 - 1) | text(min_length=1, max_length=4096) | None = Field(
        default=None,
        description="compare with this step of the run, or with the checkpoint at this local path (under the "
                    "checkpoint roots), instead of the run's previous scored step (weight_update, drift_cka)")


class CheckpointIn(BaseModel):
    """A checkpoint to score: the run it belongs to, its training step and where it is."""

    model_config = ConfigDict(extra="forbid", strict=True)

    run: RunName
    step: Step
    uri: text(min_length=1, max_length=4096, description="checkpoint directory: a path or file:// URI")
    phase: Literal["pretrain", "finetune"] | None = None
    parent_run: text(min_length=1, max_length=200) | None = None
    parent_step: Step | None = None
    probe: text(max_length=200) = DEFAULT_PROBE
    metrics: list[MetricName] | None = Field(default=None, min_length=1, max_length=16)
    config: ScoreOptions = Field(default_factory=ScoreOptions)

    @field_validator("metrics")
    @classmethod
    def _sorted(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else sorted(set(v))


class JobOut(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it."""

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
    #: seconds from submission to the end (queueing, retries and fetching included)
    duration_s: float | None
    #: seconds of the last attempt on a worker (started_at to finished_at)
    run_s: float | None = None
    #: a remote checkpoint (s3://, gs://, az://, hf://, https://): what the worker is doing,
    #: {"phase": "fetching" | "waiting" | "retrying" | "scoring", "bytes_done", "bytes_total",
    #: "seconds", "message", ...}; null for a local checkpoint and before a worker takes the job
    progress: dict[str, Any] | None = None
    #: a remote checkpoint's content fingerprint, from the store's metadata (set by the worker)
    content_fingerprint: str | None = None
    #: the revision the worker resolved a remote checkpoint to (a Hub commit sha)
    resolved_revision: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        started, finished = job.started_at, job.finished_at
        return cls(
            id=job.id, status=job.status.value, status_url=f"/v1/jobs/{job.id}", run=job.run.name,
            step=job.checkpoint.step, phase=job.checkpoint.phase.value, uri=job.checkpoint.uri, probe=job.probe.name,
            config=job.config, attempts=job.attempts, worker=job.worker, error_code=job.error_code, error=job.error,
            result=job.result, queued_at=job.queued_at, started_at=started, finished_at=finished,
            duration_s=job.duration_s, run_s=job.run_s, progress=job.progress,
            content_fingerprint=job.content_fingerprint, resolved_revision=job.resolved_revision,
        )


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

    @classmethod
    def of(cls, summary: RunSummary) -> RunOut:
        run = summary.run
        return cls(name=run.name, phase=run.phase.value, parent_run=run.parent.name if run.parent else None,
                   parent_step=run.parent_step, created_at=run.created_at, last_step=summary.last_step,
                   n_checkpoints=summary.n_checkpoints, jobs=summary.jobs, last_activity=summary.last_activity)


# ------------------------------------------------------------------ scores (the read routes)
#: a metric's value; null where it is undefined (a NaN, e.g. linearity_nores of a block that adds nothing)
Value = float | None


class SeriesOut(BaseModel):
    """One layer's values, step by step (downsampled, extremes kept)."""

    layer: int
    #: the pair into the final-norm output (left out of layer means)
    final_norm: bool
    steps: list[int]
    values: list[Value]


class ScoresOut(BaseModel):
    """``GET /v1/runs/{run}/scores``: one series per layer."""

    run: str
    metric: str
    series: list[SeriesOut]


class TrendOut(BaseModel):
    """``GET /v1/runs/{run}/trend``: the layer mean per step (the final-norm pair left out)."""

    run: str
    metric: str
    steps: list[int]
    values: list[Value]
    #: steps with scores before downsampling
    n_steps: int


class HeatmapOut(BaseModel):
    """``GET /v1/runs/{run}/heatmap``: ``values[i][j]`` is layer ``layers[j]`` at step ``steps[i]``."""

    run: str
    metric: str
    steps: list[int]
    layers: list[int]
    values: list[list[Value]]
    final_norm_layers: list[int]


class ProfileOut(HeatmapOut):
    """``GET /v1/runs/{run}/profile``: the heatmap's fields for the steps asked for, and
    ``available_steps``: every step with scores of the metric."""

    available_steps: list[int]


class CompareRunOut(BaseModel):
    """One run's layer-mean trend in ``GET /v1/compare``, with its phase and parent."""

    run: str
    phase: str
    parent_run: str | None
    parent_step: int | None
    steps: list[int]
    values: list[Value]
    n_steps: int


class CompareOut(BaseModel):
    """``GET /v1/compare``: the runs' trends of one metric, in the order asked."""

    metric: str
    runs: list[CompareRunOut]


class RunDeletionOut(BaseModel):
    """What deleting a run removed (``deleted``), or would remove (``dry_run``)."""

    run: str
    deleted: bool = Field(description="false: a dry run, nothing was deleted")
    jobs: int
    checkpoints: int
    scores: int
    alert_rules: int
    alert_firings: int
    webhooks: int = Field(description="webhook subscriptions limited to this run (every-run ones are kept)")
    webhook_deliveries: int = Field(description="the deliveries of those subscriptions")
    active_jobs: list[str] = Field(description="queued or running jobs: while there are any, the run is not deleted")
    child_runs: list[str] = Field(description="fine-tunes of the run: kept, with their scores, without a parent")

    @classmethod
    def of(cls, c: RunContents, *, deleted: bool) -> RunDeletionOut:
        return cls(run=c.run, deleted=deleted, jobs=c.jobs, checkpoints=c.checkpoints, scores=c.scores,
                   alert_rules=c.alert_rules, alert_firings=c.alert_firings, webhooks=c.webhooks,
                   webhook_deliveries=c.webhook_deliveries, active_jobs=c.active_jobs, child_runs=c.child_runs)


# ------------------------------------------------------------------ webhooks

class WebhookIn(BaseModel):
    """A subscription: where to POST which events, for one run or (no run) for every run."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: text(min_length=8, max_length=2000, description="http(s) URL of the receiver")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1)
    run: text(min_length=1, max_length=200) | None = Field(default=None, description="only this run's events")
    secret: text(max_length=200) | None = Field(
        default=None, description="whsec_<base64> signing secret; generated when left out")
    description: text(max_length=200) = ""


class WebhookPatch(BaseModel):
    """Change a subscription: pause it (``active: false``: events are not recorded for it),
    resume it, or change its events or description. The URL and secret stay."""

    model_config = ConfigDict(extra="forbid", strict=True)

    active: bool | None = None
    events: list[WebhookEvent] | None = Field(default=None, min_length=1)
    description: text(max_length=200) | None = None


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

    @classmethod
    def of(cls, w: Webhook, secret: str | None = None) -> WebhookOut:
        return cls(id=w.id, url=w.url, events=list(w.events), run=w.run.name if w.run else None,
                   description=w.description, active=w.active, created_at=w.created_at, secret=secret)


class AttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

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

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        return cls(
            id=d.id, webhook_id=d.webhook_id, event=d.event, status=d.status, attempts=d.attempts,
            next_attempt_at=d.next_attempt_at if d.status == DeliveryStatus.pending else None,
            last_status_code=d.last_status_code, last_error=d.last_error, created_at=d.created_at,
            finished_at=d.finished_at, payload=d.payload,
            attempt_log=[AttemptOut.model_validate(a) for a in d.attempt_log],
        )


_SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"


class HookSourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[text(min_length=1, max_length=200, pattern=_SOURCE_PATTERN),
                    name_chars("a hook source's name", ". _ : @ + -", _SOURCE_PATTERN)]
    secret: text(max_length=200) | None = Field(
        default=None, description="whsec_<base64> signing secret; generated when left out")
    #: bucket notifications (POST /v1/hooks/object-store): service/hooks.py check_mapping
    prefix: text(min_length=1, max_length=1024) | None = Field(
        default=None, description="s3://bucket/path/ the object keys of bucket notifications lie under; without it "
        "the source sends signed hooks only")
    pattern: text(min_length=1, max_length=1000) | None = Field(
        default=None, description="regular expression matched at the start of an object key below the prefix, with "
        "named groups 'run' and 'step', ending with '/' (the checkpoint's directory); default "
        "(?P<run>[^/]+)/checkpoint-(?P<step>[0-9]+)/")
    markers: list[text(min_length=1, max_length=200)] | None = Field(
        default=None, min_length=1, max_length=16, description="file names whose arrival submits the checkpoint; "
        "default model.safetensors.index.json and model.safetensors")


class HookSourceOut(BaseModel):
    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None
    #: only in the answer to the creation
    secret: str | None = None
    #: the object-key mapping of bucket notifications (null: signed hooks only)
    prefix: str | None = None
    pattern: str | None = None
    markers: list[str] | None = None

    @classmethod
    def of(cls, src: HookSource, secret: str | None = None) -> HookSourceOut:
        return cls(id=src.id, name=src.name, created_at=src.created_at, revoked_at=src.revoked_at, secret=secret,
                   prefix=src.prefix, pattern=src.pattern, markers=src.markers)


# ------------------------------------------------------------------ alerts
class AlertRuleIn(BaseModel):
    """``threshold``: fires when the value crosses ``above`` or ``below``. ``sigma``: fires when
    the value is more than ``k`` standard deviations from the mean of the previous ``window``
    checkpoints. ``layer`` left out: the layer mean."""

    model_config = ConfigDict(extra="forbid", strict=True)

    metric: MetricName
    layer: bounded_int(0, INT32_MAX) | None = None
    kind: AlertKindName
    #: finite numbers only: NaN, Infinity (and 1e400, which JSON parsers read as infinity) are refused
    above: finite_float() | None = None
    below: finite_float() | None = None
    k: finite_float(gt=0) | None = None
    window: bounded_int(2, 1000) | None = None
    description: text(max_length=200) = ""

    @model_validator(mode="after")
    def _consistent(self) -> AlertRuleIn:
        if self.kind == AlertKind.threshold:
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

    @classmethod
    def of(cls, rule: AlertRule, run_name: str) -> AlertRuleOut:
        return cls.model_validate(alerts.rule_out(rule, run_name))  # the same dict trend.alert events carry


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

    @classmethod
    def of(cls, f: AlertFiring, run_name: str) -> AlertFiringOut:
        return cls(id=f.id, rule_id=f.rule_id, run=run_name, step=f.step, value=f.value, message=f.message,
                   details=f.details, job_id=f.job_id, created_at=f.created_at)

