"""Settings, from environment variables prefixed ``LAYERTRACK_`` (see docs/deploy.md).

The defaults are the embedded, server-less setup of ``layertrack up``: an SQLite file and a
filesystem Celery broker under the data directory. Point ``LAYERTRACK_DATABASE_URL`` at
PostgreSQL and ``LAYERTRACK_BROKER_URL`` at Redis for production; nothing else changes.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "layertrack"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAYERTRACK_", extra="ignore")

    #: where the embedded database, broker folders and the first API token live
    data_dir: Path = Field(default_factory=_default_data_dir)
    #: SQLAlchemy URL; default sqlite:///<data_dir>/layertrack.db
    database_url: str = ""
    #: Celery broker URL; default: kombu's filesystem transport under <data_dir>/broker
    broker_url: str = ""
    #: directories checkpoints may be read from, separated by ":" (a path or file:// URI
    #: outside them is refused). Default: the working directory the service starts in.
    checkpoint_roots: str = ""
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

    @field_validator("database_url", "broker_url", "checkpoint_roots", "webhook_allow_hosts", "secret_keys",
                     mode="before")
    @classmethod
    def _strip(cls, v: str | None) -> str:
        return (v or "").strip()

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
    def roots(self) -> list[Path]:
        if not self.checkpoint_roots:
            return [Path.cwd()]
        return [Path(p).expanduser() for p in self.checkpoint_roots.split(os.pathsep) if p.strip()]

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.broker.startswith("filesystem://"):
            for key in ("data_folder_in", "control_folder"):
                Path(self.broker_transport_options[key]).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
