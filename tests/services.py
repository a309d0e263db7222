"""Real PostgreSQL, Redis, API server and Celery worker processes for the service tests.

Nothing here is mocked: databases are created in the machine's PostgreSQL (a database of
the tests' own, dropped afterwards), the broker is a private ``redis-server`` the tests start
on a free port (each service gets a database index of its own on it), and the API and
workers run as the separate processes they are in production
(layertrack.service.embedded). When PostgreSQL or redis-server is missing the tests fail;
they never skip. Nothing shared is flushed or dropped.

Waiting for something to happen is always :func:`wait_until` (poll with a deadline), never a
fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import pytest
from layertrack.service.embedded import EmbeddedService, free_port

__all__ = ["AS_BACKGROUND_JOB", "Receiver", "RedisServer", "Service", "api_only", "create_pg_database",
           "drop_pg_database", "free_port", "interrupt_group", "layertrack_exe", "live_service", "max_delta", "ready",
           "stop_child", "store_service", "stored_scores", "synthetic_run", "wait_until"]

PG_ADMIN = os.environ.get("LAYERTRACK_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 60, *, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail the test
    with ``what`` and the last value seen when ``timeout`` seconds pass first. An exception
    raised by ``predicate`` is not caught: it fails the test at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}; last seen: {value!r}"[:4000])
        time.sleep(interval)


def layertrack_exe() -> str:
    """The installed console script beside this interpreter (the venv need not be on PATH)."""
    exe = shutil.which("layertrack", path=str(Path(sys.executable).parent)) or shutil.which("layertrack")
    if exe is None:
        pytest.fail("the layertrack console script is not installed")
    return exe


def ready(url: str) -> bool:
    """Whether the API at ``url`` answers /readyz with 200 (False while it does not listen)."""
    import httpx

    with contextlib.suppress(httpx.TransportError):
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    return False


#: put before a command: it runs with SIGINT ignored, as a shell without job control (a script,
#: CI) starts a background job (``cmd &``), whatever way the suite itself was started; exec
#: keeps the disposition. A test that stops a child with Ctrl-C starts it so, and shows that it
#: stops all the same (service/cli/common.py: stop_on_ctrl_c_and_sigterm). An exec wrapper
#: rather than ``preexec_fn``, which is unsafe in a process with threads.
AS_BACKGROUND_JOB = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                     "os.execv(sys.argv[1], sys.argv[1:])"]


def stop_child(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60, *,
               group: bool = False, read_pipes: bool = True) -> bool:
    """``sig`` to ``proc`` (to its process group with ``group``: one started with
    ``start_new_session``) and wait until it exits, reading what it still writes to its pipes
    unless ``read_pipes`` is False (a thread of the test reads them); True when it exited
    within ``timeout`` seconds. Otherwise SIGKILL (to the group) and False: a test's child
    never outlives it."""
    kill = (lambda s: os.killpg(proc.pid, s)) if group else proc.send_signal
    wait = proc.communicate if read_pipes else proc.wait
    if group or proc.poll() is None:  # a group may outlive its leader
        with contextlib.suppress(ProcessLookupError):
            kill(sig)
    try:
        wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            kill(signal.SIGKILL)
        wait()
        return False


def interrupt_group(proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Ctrl-C (SIGINT) to the process group of ``proc`` (started with ``start_new_session``,
    as ``layertrack up`` is): ``stop_child(proc, SIGINT, timeout, group=True)``."""
    return stop_child(proc, signal.SIGINT, timeout, group=True)


# ------------------------------------------------------------------ PostgreSQL
def create_pg_database() -> str:
    """A new, empty database ``lt_test_*`` in the machine's PostgreSQL; its URL."""
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
    """Drop a database made by :func:`create_pg_database` (and nothing else)."""
    from layertrack.service.db import dispose_engine
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    assert name.startswith("lt_test_"), f"refusing to drop {name!r}: not made by the tests"
    dispose_engine(url)  # this process's own pooled connections
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    eng.dispose()


def tiny_job_scores() -> int:
    """The scores a job of a tiny model (3 blocks, 4 hidden states) stores by default."""
    from layertrack.workers.vocabulary import LAYER_METRICS, PAIR_METRICS

    return 3 * len(PAIR_METRICS) + 4 * len(LAYER_METRICS)


def stored_scores(db_url: str, job_id: str) -> dict[tuple[str, int], float | None]:
    """The scores stored for a job: {(metric, layer): value}."""
    from layertrack.service.db import session_scope
    from layertrack.service.models import Score
    from sqlalchemy import select

    with session_scope(db_url) as s:
        rows = s.execute(select(Score.metric, Score.layer, Score.value).where(Score.job_id == job_id)).all()
    return {(m, layer): v for m, layer, v in rows}


def max_delta(a: dict, b: dict) -> float:
    """The largest |a[k] - b[k]| of two score dicts with the same (non-empty) keys."""
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)


def synthetic_run(db_url: str, run: str, steps: tuple[int, ...], *, fingerprint: str,
                  pair: Callable[[int], dict[str, float]], anisotropy: float) -> list[str]:
    """Synthetic scores through the real completion path (submissions.submit, jobs.claim, jobs.complete), no
    worker: at each step a job (checkpoint fingerprint ``fingerprint`` + step) with
    BASE_METRICS, ``pair(step)`` for two blocks and the final-norm pair and ``anisotropy`` for
    four hidden states; the job ids."""
    from layertrack.service import jobs, submissions
    from layertrack.service.db import session_scope
    from layertrack.workers.vocabulary import BASE_METRICS, Phase

    ids = []
    for step in steps:
        sub = submissions.Submission(run=run, step=step, uri=f"/synthetic/{run}/{step}",
                                     fingerprint=f"{fingerprint}{step}", phase=Phase.pretrain, parent_run=None,
                                     parent_step=None, probe="default", config={"metrics": list(BASE_METRICS)})
        with session_scope(db_url) as s:
            job, _ = submissions.submit(s, sub)
            s.flush()
            ids.append(job.id)
        assert jobs.claim(db_url, ids[-1], "test") is not None
        scores = pair(step)
        result = {"pairs": [{"layer": 0, **scores}, {"layer": 1, **scores}, {"layer": 2, **scores, "final_norm": True}],
                  "layers": [{"layer": k, "anisotropy": anisotropy} for k in range(4)], "n_tokens": 1}
        assert jobs.complete(db_url, ids[-1], "test", result, list(BASE_METRICS))
    return ids


# ------------------------------------------------------------------ Redis
class RedisServer:
    """A private ``redis-server`` on a free port of 127.0.0.1, in a temporary directory,
    nothing saved to disk. ``new_url()`` hands out a database index nobody used yet, so a
    test that needs an empty Redis gets one without flushing anything. ``stop()`` and
    ``start()`` again (same port) stand for an outage."""

    DATABASES = 1000

    def __init__(self, directory: Path | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is required for these tests and is not installed "
                        "(apt-get install redis-server; see DEVELOPERS.md / .ci/run)")
        self.exe = exe
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="lt-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._next_db = 0

    @property
    def base_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def new_url(self) -> str:
        """The URL of a database index of this server that nothing has used."""
        if self._next_db >= self.DATABASES:
            pytest.fail(f"the private Redis has only {self.DATABASES} databases")
        db, self._next_db = self._next_db, self._next_db + 1
        return f"{self.base_url}/{db}"

    def start(self, timeout: float = 20) -> RedisServer:
        import redis

        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--databases", str(self.DATABASES), "--dir", str(self.dir)]
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)

        def up() -> bool:
            if self.proc.poll() is not None:
                log_text = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server exited with code {self.proc.returncode}:\n{log_text}")
            with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                return bool(client.ping())
            return False

        try:
            wait_until(up, timeout, what=f"redis-server on port {self.port} to answer")
        except BaseException:
            self.stop()  # not left running when it did not come up
            raise
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        """Stop the server and remove its directory (when this object made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------ the service
#: fast sweeps and heartbeats, so that lost and stale jobs are found within seconds
TEST_ENV = {
    "LAYERTRACK_STALE_AFTER_S": "6",
    "LAYERTRACK_HEARTBEAT_S": "1",
    "LAYERTRACK_SWEEP_INTERVAL_S": "1",
    "LAYERTRACK_REQUEUE_AFTER_S": "8",
}


class Service(EmbeddedService):
    """The embedded service as the tests run it: logs and data under ``tmp``, checkpoints
    under the single root ``roots``, the test timings of :data:`TEST_ENV`."""

    def __init__(self, *, tmp: Path, db_url: str, broker_url: str, roots: Path,
                 extra_env: dict[str, str] | None = None, token: str = ""):
        super().__init__(data_dir=tmp / "data", db_url=db_url, broker_url=broker_url, roots=[roots],
                         env={**TEST_ENV, **(extra_env or {})}, log_dir=tmp)
        self.tmp = tmp
        self.roots = roots
        self.token = token

    def migrate_and_token(self, name: str = "tests") -> str:
        return super().migrate_and_token(name)


@contextlib.contextmanager
def api_only(tmp: Path, *, db_url: str | None = None, broker_url: str = "filesystem://"):
    """An API server and no worker (the sweeper off, so jobs stay where a test puts them),
    checkpoints under ``tmp/ckpts``; SQLite under ``tmp`` unless ``db_url`` is given."""
    roots = tmp / "ckpts"
    roots.mkdir()
    svc = Service(tmp=tmp, db_url=db_url or f"sqlite:///{tmp / 'lt.db'}", broker_url=broker_url, roots=roots,
                  extra_env={"LAYERTRACK_SWEEP_INTERVAL_S": "0"})
    try:
        svc.migrate_and_token()
        svc.start_api()
        yield svc
    finally:
        svc.stop()


def store_service(tmp: Path, redis_url: str, roots: list[str], store_env: dict[str, str], *,
                  db_url: str | None = None):
    """:func:`live_service` whose checkpoint roots (LAYERTRACK_CHECKPOINT_ROOTS) are its local
    directory ``tmp/ckpts`` and the remote locations ``roots``, with ``store_env`` (the
    stores' variables and any other settings) in the environment of its processes."""
    env = {**store_env, "LAYERTRACK_CHECKPOINT_ROOTS": ",".join([str(tmp / "ckpts"), *roots])}
    return live_service(tmp, redis_url, db_url=db_url, extra_env=env)


@contextlib.contextmanager
def live_service(tmp: Path, redis_url: str, *, db_url: str | None = None, extra_env: dict[str, str] | None = None,
                 workers: tuple[tuple[str, str], ...] = (("w1", "gpu"),)):
    """An API server and Celery workers (name, queues) on PostgreSQL and Redis, checkpoints
    under ``tmp/ckpts``. A fresh database unless ``db_url`` is given; stopped (and the fresh
    database dropped) afterwards."""
    roots = tmp / "ckpts"
    roots.mkdir()
    db = db_url or create_pg_database()
    svc = Service(tmp=tmp, db_url=db, broker_url=redis_url, roots=roots, extra_env=extra_env)
    try:
        svc.migrate_and_token()
        svc.start_api()
        for name, queues in workers:
            svc.start_worker(name, queues)
        yield svc
    finally:
        svc.stop()
        if db_url is None:
            drop_pg_database(db)


# ------------------------------------------------------------------ webhook receiver
class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST (path, headers with lower-case
    names, body, the status answered) and answers from a per-path script of statuses
    (``script[path]``, used up in order; 200 once empty)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    queue = outer.script.get(self.path) or []
                    status = queue.pop(0) if queue else 200
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    outer.requests.append({"path": self.path, "headers": headers, "body": body, "status": status})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def got(self, path: str | None = None, where=lambda r: True) -> list[dict]:
        """The requests so far (to ``path``, when given) that satisfy ``where``."""
        with self.lock:
            return [r for r in self.requests if (path is None or r["path"] == path) and where(r)]

    def at(self, path: str, n: int, timeout: float = 120, where=lambda r: True) -> list[dict]:
        """The requests to ``path`` (that satisfy ``where``), once there are at least ``n``."""
        def enough() -> list[dict] | None:
            got = self.got(path, where)
            return got if len(got) >= n else None

        return wait_until(enough, timeout, what=f"{n} request(s) to {path}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
