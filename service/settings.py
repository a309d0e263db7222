"""Settings, from environment variables prefixed ``LAYERTRACK_`` (see docs/deploy.md).

The defaults are the embedded, server-less setup of ``layertrack up``: an SQLite file and a
filesystem Celery broker under the data directory. Point ``LAYERTRACK_DATABASE_URL`` at
PostgreSQL and ``LAYERTRACK_BROKER_URL`` at Redis for production; nothing else changes.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from layertrack.workers import locations  # stdlib only: no store client
from layertrack.workers.errors import LayertrackError
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "layertrack"


class Settings(BaseSettings):
    # a refused value (a root URI with credentials, a secret key) is not repeated in the error
    model_config = SettingsConfigDict(env_prefix="LAYERTRACK_", extra="ignore", hide_input_in_errors=True)

    #: where the embedded database, broker folders and the first API token live
    data_dir: Path = Field(default_factory=_default_data_dir)
    #: SQLAlchemy URL; default sqlite:///<data_dir>/layertrack.db
    database_url: str = ""
    #: Celery broker URL; default: kombu's filesystem transport under <data_dir>/broker
    broker_url: str = ""
    #: where checkpoints may be read from: directories and remote URI prefixes
    #: (``s3://ml-ckpts/runs/``, ``hf://EleutherAI/``, ``https://host/ckpts/``), separated by
    #: "," or ":" (a URI's "://" and host:port are kept whole). A checkpoint outside them is
    #: refused; a prefix matches on path-segment boundaries. Default: the working directory
    #: the service starts in.
    checkpoint_roots: str = ""
    #: where workers keep the files of remote checkpoints (default: <data_dir>/cache); may be
    #: shared by the workers of one machine
    cache_dir: Path | None = None
    #: the most bytes the fetch cache holds; least recently used checkpoints are evicted to
    #: make room. At least the largest checkpoint scored (default 50 GiB)
    cache_max_bytes: int = Field(default=50 * 2**30, gt=0)
    #: memory a worker's job may use for weights and activations on its device(s): bytes or
    #: a size such as "24GiB", "512MB". The memory plan keeps within it, streaming the weights
    #: block by block when they do not fit (docs/engine.md, "Memory plan"). Empty: 80 % of
    #: the memory free when the job starts
    max_memory: int | None = None
    #: http(s) checkpoints on private, loopback or link-local addresses are refused unless
    #: they match one of these (comma separated host names, addresses or CIDR networks, as
    #: webhook_allow_hosts). Object stores (s3, gs, az, hf) reach the endpoint their own
    #: configuration names and are not checked against it.
    fetch_allow_hosts: str = ""
    #: how long a job waits for a checkpoint still being uploaded (an index without all its
    #: shards, sizes still changing) before it fails with checkpoint_incomplete, seconds
    incomplete_deadline_s: float = Field(default=3600.0, ge=0)
    #: the first wait before looking at an incomplete checkpoint again; it doubles with each
    #: look, up to incomplete_backoff_max_s
    incomplete_backoff_s: float = Field(default=5.0, gt=0)
    incomplete_backoff_max_s: float = Field(default=300.0, gt=0)
    #: how long a job keeps retrying a store that cannot be reached (connection refused,
    #: timeouts, 5xx: store_unreachable; checksum_mismatch), seconds from its first such
    #: failure: an attempt is made only if it starts within it, after back-off 2, 4, 8, ...
    #: 64 s. The default, 120, allows 6 attempts (at about 0, 2, 6, 14, 30 and 62 s); then the
    #: job fails with store_unreachable. Each attempt is itself bounded (workers/stores.py)
    fetch_retry_budget_s: float = Field(default=120.0, ge=0)
    #: the most retries of such a job, whatever the budget leaves
    fetch_max_retries: int = Field(default=8, ge=0)
    #: how often a fetching job's progress is written to the database, seconds
    progress_interval_s: float = Field(default=1.0, gt=0)
    #: largest request body accepted, bytes
    max_body_bytes: int = 64 * 1024
    #: a scoring task is interrupted after this many seconds (soft), killed after hard
    task_soft_time_limit: int = 3 * 3600
    task_time_limit: int = 3 * 3600 + 300
    #: retries of a job that failed for a transient reason (database or broker unreachable)
    task_max_retries: int = 3
    #: a running job whose worker has not sent a heartbeat for this long is re-queued
    stale_after_s: float = 60.0
    #: heartbeat period of a running job
    heartbeat_s: float = 5.0
    #: a queued job not picked up for this long is sent to the broker again
    requeue_after_s: float = 300.0
    #: how often the API process sweeps for such jobs (0 disables the in-process sweeper)
    sweep_interval_s: float = 10.0
    #: seconds a client is told to wait (Retry-After) when a dependency is down
    retry_after_s: int = 5
    #: webhook targets on private, loopback or link-local addresses are refused unless they
    #: match one of these (comma separated host names, addresses or CIDR networks, e.g.
    #: "127.0.0.0/8,::1,hooks.internal")
    webhook_allow_hosts: str = ""
    #: seconds to wait for a webhook receiver's answer
    webhook_timeout_s: float = 10.0
    #: attempts per delivery before it is marked failed (timeouts, 429 and 5xx are retried)
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    #: delay before the second attempt; it doubles with every further attempt
    webhook_backoff_s: float = Field(default=10.0, gt=0)
    #: longest delay between two attempts
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)

    #: keys that encrypt webhook and hook-source signing secrets at rest: Fernet keys (URL-safe
    #: base64 of 32 bytes), comma separated, newest first (the newest encrypts, every one
    #: decrypts). Empty: the key in <data_dir>/secret.key, created (mode 600) when needed
    secret_keys: str = Field(default="", repr=False)

    @field_validator("database_url", "broker_url", "checkpoint_roots", "webhook_allow_hosts", "fetch_allow_hosts",
                     "secret_keys", mode="before")
    @classmethod
    def _strip(cls, v: str | None) -> str:
        return (v or "").strip()

    @field_validator("checkpoint_roots")
    @classmethod
    def _parsable_roots(cls, v: str) -> str:
        try:
            locations.parse_roots(v)
        except LayertrackError as e:
            raise ValueError(f"LAYERTRACK_CHECKPOINT_ROOTS: {e.message}") from None
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        from layertrack.workers.planner import parse_bytes  # stdlib only

        if v is None or isinstance(v, int):
            return v
        if isinstance(v, str):
            if not v.strip():
                return None
            try:
                value = parse_bytes(v)
            except ValueError as e:
                raise ValueError(f"LAYERTRACK_MAX_MEMORY: {e}") from None
            if value <= 0:
                raise ValueError("LAYERTRACK_MAX_MEMORY must be more than 0 bytes")
            return value
        return v

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _no_empty_path(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'layertrack.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_transport_options(self) -> dict:
        if not self.broker.startswith("filesystem://"):
            # a scoring job may run for hours: do not redeliver it while it is running
            return {
                "visibility_timeout": self.task_time_limit + 600,
                "socket_connect_timeout": 2,
                "socket_timeout": 10,
            }
        folder = self.data_dir / "broker"
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }

    @property
    def root_locations(self) -> list[locations.Location]:
        """Every allowed location: directories (scheme ``file``) and remote prefixes."""
        if not self.checkpoint_roots:
            return [locations.parse(str(Path.cwd()))]
        return locations.parse_roots(self.checkpoint_roots)

    @property
    def roots(self) -> list[Path]:
        """The allowed directories (may be empty when only remote prefixes are allowed: then
        no local checkpoint is)."""
        return [Path(loc.path) for loc in self.root_locations if not loc.remote]

    @property
    def remote_roots(self) -> list[locations.Location]:
        """The allowed remote prefixes (s3://, gs://, az://, hf://, http(s)://)."""
        return [loc for loc in self.root_locations if loc.remote]

    @property
    def cache_root(self) -> Path:
        return self.cache_dir.expanduser() if self.cache_dir is not None else self.data_dir / "cache"

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.broker.startswith("filesystem://"):
            for key in ("data_folder_in", "control_folder"):
                Path(self.broker_transport_options[key]).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def describe_settings_error(e: Exception) -> str | None:
    """One line naming each LAYERTRACK_ variable whose value ``Settings`` refused, and why;
    None when ``e`` is not a refusal of the settings."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError) or e.title != Settings.__name__:
        return None
    parts = []
    for err in e.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        name = f"LAYERTRACK_{field.upper()}" if field else "the LAYERTRACK_ settings"
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(msg if msg.startswith(name) else f"{name}: {msg}")
    return "; ".join(parts) + " (fix or unset the variable; docs/deploy.md lists them)"
