"""The words every part of layertrack shares: metric names and labels, job statuses and
phases, webhook events, and the scoring defaults.

Standard library only (no torch, no SQLAlchemy): the engine, the API, the CLI, the client and
the dashboard (through ``GET /v1/meta``) all take these from here, so one edit changes them
everywhere. It sits in the compute package because that package is the lowest layer: the
compute side may not import the HTTP side, while the HTTP side may import this.
"""

from __future__ import annotations

import enum

# ------------------------------------------------------------------ metrics
#: scores of the map from hidden state i to hidden state i+1, from the engine's statistics
PAIR_METRICS = ("linearity", "linearity_nores", "cosine", "norm_ratio")
#: scores of one hidden state
LAYER_METRICS = ("anisotropy", "effective_rank", "massive_activation")
#: what every job measures unless the submission names fewer
BASE_METRICS = PAIR_METRICS + LAYER_METRICS
#: the pruning experiment of "Your Transformer is Secretly Linear" (arXiv 2405.12250), per
#: block (stored under the pair's index); only measured when the job's config asks for
#: replaceability. Definitions: docs/engine.md, "Metrics"
REPLACEABILITY_METRICS = ("loss_delta_linear", "loss_delta_drop")
#: between checkpoints, per block (stored under the pair's index): the block's weights against
#: the same block of the run's previous scored checkpoint; only measured when there is one
#: (the job option ``dynamics``). Definitions: docs/engine.md, "Between checkpoints"
#: weight_update per block (stored under the pair's index), drift_cka per hidden state: 1 −
#: linear CKA of the hidden state against the same one of the earlier checkpoint, both models
#: run on the same probe tokens
DYNAMICS_METRICS = ("weight_update", "drift_cka")
#: the logit lens, per hidden state: next-token cross-entropy of h_i decoded through the final
#: norm and the LM head; only measured when the job's config asks for it (``logit_lens``)
LENS_METRICS = ("logit_lens_loss",)
#: every metric a score row can hold
KNOWN_METRICS = BASE_METRICS + REPLACEABILITY_METRICS + DYNAMICS_METRICS + LENS_METRICS
#: stored per pair (layer index i means the block i → i+1)
PER_PAIR_METRICS = (*PAIR_METRICS, *REPLACEABILITY_METRICS, "weight_update")
#: stored per hidden state (layer index i means h_i)
PER_LAYER_METRICS = (*LAYER_METRICS, "drift_cka", *LENS_METRICS)

#: the metric pages, plots and the CLI show when none is named
DEFAULT_METRIC = "linearity_nores"

#: how a metric is labelled on axes and in tables
METRIC_LABELS = {
    "linearity": "linearity (with residual)",
    "linearity_nores": "linearity, residual removed",
    "cosine": "cosine(h_i, h_i+1)",
    "norm_ratio": "‖h_i+1 − h_i‖ / ‖h_i‖",
    "anisotropy": "anisotropy (λ_max / trace)",
    "effective_rank": "effective rank (exp entropy of the spectrum)",
    "massive_activation": "massive activation (max |h| / median |h|)",
    "loss_delta_linear": "Δ loss, block → linear map (nats/token)",
    "loss_delta_drop": "Δ loss, block dropped (nats/token)",
    "weight_update": "weight update ‖W − W_prev‖ / ‖W_prev‖",
    "drift_cka": "drift since the earlier checkpoint (1 − linear CKA)",
    "logit_lens_loss": "logit-lens loss of h_i (nats/token)",
}

#: the values a metric can take, (low, high); None where it is unbounded on that side.
#: Charts clamp their axes to these, so a flat series never shows impossible values.
METRIC_RANGES: dict[str, tuple[float | None, float | None]] = {
    "linearity": (0.0, 1.0),
    "linearity_nores": (0.0, 1.0),
    "cosine": (-1.0, 1.0),
    "norm_ratio": (0.0, None),
    "anisotropy": (0.0, 1.0),
    "effective_rank": (1.0, None),
    "massive_activation": (1.0, None),
    "loss_delta_linear": (None, None),
    "loss_delta_drop": (None, None),
    "weight_update": (0.0, None),
    "drift_cka": (0.0, 1.0),
    "logit_lens_loss": (0.0, None),
}


# ------------------------------------------------------------------ jobs and runs
class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


#: statuses a job does not leave by itself
FINAL_STATUSES = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Phase(str, enum.Enum):
    pretrain = "pretrain"
    finetune = "finetune"


# ------------------------------------------------------------------ webhooks
#: events a webhook subscription can ask for
WEBHOOK_EVENTS = ("job.succeeded", "job.failed", "trend.alert")
#: the event ``POST /v1/webhooks/{id}/test`` sends
TEST_EVENT = "webhook.test"


class DeliveryStatus(str, enum.Enum):
    """A webhook delivery's status: pending until it is answered with a 2xx (succeeded) or
    its attempts run out (failed)."""

    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


# ------------------------------------------------------------------ trend alerts
class AlertKind(str, enum.Enum):
    """``threshold``: fires when the value crosses ``above`` or ``below``; ``sigma``: when it
    is more than ``k`` standard deviations from the mean of the previous ``window`` values."""

    threshold = "threshold"
    sigma = "sigma"


# ------------------------------------------------------------------ scoring defaults
#: tokens per probe sequence
DEFAULT_SEQ_LEN = 512
#: scored tokens when the job names no max_tokens: at least this many, and at least
#: WARN_TOKENS_PER_DIM · d
DEFAULT_MIN_TOKENS = 16384
#: held-out probe tokens for the replaceability losses (taken after the scored ones)
DEFAULT_HOLDOUT_TOKENS = 4096
#: scoring is refused below MIN_TOKENS_PER_DIM · d tokens (a least-squares fit of d
#: dimensions on fewer tokens is trivially good) and warns below WARN_TOKENS_PER_DIM · d
MIN_TOKENS_PER_DIM = 2.0
WARN_TOKENS_PER_DIM = 8.0
#: replaceability warns when the maps are fitted on fewer than this many tokens per
#: dimension: a least-squares map of d regressors fitted on n tokens errs on new tokens by
#: about d/(n − d − 1) of the residual variance more than on its own (docs/engine.md)
REPLACEABILITY_TOKENS_PER_DIM = 32.0
#: the built-in probe's name
DEFAULT_PROBE = "default"

#: the options of a scoring job, with their defaults (None: chosen per checkpoint or device).
#: The one list: the API's ScoreOptions, the worker's ScoreConfig, and the CLI's ``score``
#: and ``submit`` options all take these names and defaults (tests/test_vocabulary.py)
SCORE_OPTION_DEFAULTS: dict[str, object] = {
    "max_tokens": None,
    "seq_len": DEFAULT_SEQ_LEN,
    "drop_first_token": False,
    "dtype": None,
    "replaceability": False,
    "holdout_tokens": DEFAULT_HOLDOUT_TOKENS,
    #: also measure logit_lens_loss per hidden state (loads the LM head; resident only)
    "logit_lens": False,
    "allow_pickle": False,
    #: measure weight_update against the run's previous scored checkpoint: None (default)
    #: when that checkpoint is on a local path, True to ask for it, False never
    "dynamics": None,
    #: the checkpoint's layout (workers/formats/native.py: hf, nanogpt, dcp); None: detected
    "format": None,
    #: a transformers config.json (or its directory) for a checkpoint that carries no
    #: architecture (dcp), under the checkpoint roots
    "model_config": None,
    #: a tokenizer directory for a checkpoint saved without one, under the checkpoint roots
    "tokenizer": None,
}
SCORE_OPTIONS = tuple(SCORE_OPTION_DEFAULTS)
#: the formats a checkpoint may be named as (``format``)
CHECKPOINT_FORMATS = ("hf", "nanogpt", "dcp", "torchtitan", "litgpt")
