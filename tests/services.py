"""Real PostgreSQL, Redis, API server and Celery worker processes for the service tests.

Nothing here is mocked: databases are created in the machine's PostgreSQL, queues live in
its Redis (a database index of their own), and the API and workers run as the separate
processes they are in production. When PostgreSQL or Redis is missing the tests fail
(.ci/run starts them); they never skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

PG_ADMIN = os.environ.get("LAYERTRACK_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LAYERTRACK_TEST_REDIS", "redis://127.0.0.1:6379")


def layertrack_exe() -> str:
    """The installed console script beside this interpreter (the venv need not be on PATH)."""
    import shutil

    exe = shutil.which("layertrack", path=str(Path(sys.executable).parent)) or shutil.which("layertrack")
    if exe is None:
        pytest.fail("the layertrack console script is not installed")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_pg_database() -> str:
    from sqlalchemy import create_engine, text

    name = f"lt_test_{uuid.uuid4().hex[:12]}"
    try:
        eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
    except Exception as e:
        pytest.fail(f"PostgreSQL at {PG_ADMIN} is required for these tests and is not reachable ({e}); "
                    "start it (see DEVELOPERS.md / .ci/run)")
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    eng.dispose()


def redis_db_url() -> str:
    import redis

    try:
        r = redis.Redis.from_url(REDIS_URL + "/0", socket_connect_timeout=2)
        r.ping()
    except Exception as e:
        pytest.fail(f"Redis at {REDIS_URL} is required for these tests and is not reachable ({e}); "
                    "start it (see DEVELOPERS.md / .ci/run)")
    for db in range(2, 16):  # claim an empty database index
        r = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        if r.setnx("layertrack-test-lock", str(os.getpid())):
            r.expire("layertrack-test-lock", 3600)
            return f"{REDIS_URL}/{db}"
    pytest.fail("no free Redis database index (2-15) for the tests")


def release_redis_db(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@dataclass
class Service:
    """An API server process and worker processes sharing one database and broker."""

    tmp: Path
    db_url: str
    broker_url: str
    roots: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    token: str = ""
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "LAYERTRACK_DATABASE_URL": self.db_url,
            "LAYERTRACK_BROKER_URL": self.broker_url,
            "LAYERTRACK_DATA_DIR": str(self.tmp / "data"),
            "LAYERTRACK_CHECKPOINT_ROOTS": str(self.roots),
            "LAYERTRACK_STALE_AFTER_S": "6",
            "LAYERTRACK_HEARTBEAT_S": "1",
            "LAYERTRACK_SWEEP_INTERVAL_S": "1",
            "LAYERTRACK_REQUEUE_AFTER_S": "8",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def migrate_and_token(self) -> None:
        from layertrack.service.auth import create_token
        from layertrack.service.db import session_scope, upgrade

        upgrade(self.db_url)
        with session_scope(self.db_url) as s:
            _row, self.token = create_token(s, "tests")

    def start_api(self, processes: int = 1, port: int | None = None) -> None:
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.tmp / "api.log", "ab") as log:  # the child keeps its own descriptor
            self.api = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "layertrack.service.main:app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning", "--workers", str(processes)],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API server exited: {(self.tmp / 'api.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the API server did not start within 60 s")

    def stop_api(self) -> None:
        os.killpg(self.api.pid, signal.SIGTERM)
        self.api.wait(timeout=15)
        self.api = None

    def start_worker(self, name: str, queues: str = "gpu") -> subprocess.Popen:
        with open(self.tmp / f"worker-{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "layertrack.workers.celery_app", "worker", "-Q", queues,
                 "-c", "1", "--prefetch-multiplier", "1", "-n", f"{name}@%h", "--loglevel", "INFO",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.workers[name] = proc
        return proc

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers.pop(name)
        os.killpg(proc.pid, sig)  # the worker and its pool process: a machine that died
        proc.wait(timeout=30)

    def client(self):
        from layertrack.service.client import Client

        return Client(self.url, self.token, timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for name in list(self.workers):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.kill_worker(name, signal.SIGTERM)
        if self.api is not None:
            try:
                os.killpg(self.api.pid, signal.SIGTERM)
                self.api.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.api.pid, signal.SIGKILL)


@contextlib.contextmanager
def live_service(tmp: Path, redis_url: str, *, db_url: str | None = None, extra_env: dict[str, str] | None = None,
                 workers: tuple[tuple[str, str], ...] = (("w1", "gpu"),)):
    """An API server and Celery workers (name, queues) on PostgreSQL and Redis, checkpoints
    under ``tmp/ckpts``. A fresh database unless ``db_url`` is given; stopped (and the fresh
    database dropped) afterwards."""
    roots = tmp / "ckpts"
    roots.mkdir()
    db = db_url or create_pg_database()
    svc = Service(tmp=tmp, db_url=db, broker_url=redis_url, roots=roots, extra_env=dict(extra_env or {}))
    try:
        svc.migrate_and_token()
        svc.start_api()
        for name, queues in workers:
            svc.start_worker(name, queues)
        yield svc
    finally:
        svc.stop()
        if db_url is None:
            from layertrack.service.db import get_engine

            get_engine(db).dispose()
            drop_pg_database(db)
