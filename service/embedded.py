"""Start a layertrack service in child processes: an API server and Celery workers.

One helper for everything that needs a real service for a while, the test suite and
``layertrack demo`` alike::

    with EmbeddedService(data_dir=Path("/tmp/lt")) as svc:
        svc.migrate_and_token()          # migrate the database, create an API token
        svc.start_api()                  # uvicorn layertrack.service.main:app
        svc.start_worker("gpu0")         # celery -A layertrack.service.queue worker -Q gpu
        with svc.client() as c:
            ...

Entering the context starts nothing; leaving it stops every process started through it.
The default database is SQLite and the default broker kombu's filesystem transport, both
under ``data_dir``: nothing else has to run. Give ``db_url`` / ``broker_url`` for
PostgreSQL / Redis. The children get the parent's environment with the ``LAYERTRACK_``
settings of this service on top, then ``env`` on top of that; each runs in a session
(process group) of its own, so stopping one also stops the processes it forked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedService:
    """An API server process and worker processes sharing one database and broker.

    ``roots`` are the checkpoint roots, kept as ``checkpoint_roots`` (default: the service's
    own default, the working directory the service starts in); ``log_dir`` receives
    ``api.log`` and ``worker-NAME.log`` (default: ``data_dir``).
    """

    def __init__(self, *, data_dir: Path, db_url: str | None = None, broker_url: str | None = None,
                 roots: Sequence[Path] = (), env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.data_dir = Path(data_dir)
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'layertrack.db'}"
        self.broker_url = broker_url or "filesystem://"
        self.checkpoint_roots = [Path(r) for r in roots]
        self.extra_env: dict[str, str] = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir is not None else self.data_dir
        self.url = ""
        self.token = ""
        self.api: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        """The environment the service's processes get."""
        env = {k: v for k, v in os.environ.items() if k != "LAYERTRACK_CHECKPOINT_ROOTS"}
        env.update({
            "LAYERTRACK_DATA_DIR": str(self.data_dir),
            "LAYERTRACK_DATABASE_URL": self.db_url,
            "LAYERTRACK_BROKER_URL": self.broker_url,
            # one thread per process: API, workers and whatever runs beside them share the cores
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        })
        if self.checkpoint_roots:
            env["LAYERTRACK_CHECKPOINT_ROOTS"] = os.pathsep.join(str(r) for r in self.checkpoint_roots)
        env.update(self.extra_env)
        return env

    def _log(self, name: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{name}.log"

    # ------------------------------------------------------------------ database
    def migrate_and_token(self, name: str = "embedded") -> str:
        """Bring the database to the newest schema and create an API token called ``name``;
        the secret becomes ``self.token`` and is returned."""
        from .auth import create_token
        from .db import session_scope, upgrade

        self.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.db_url)
        with session_scope(self.db_url) as s:
            _row, self.token = create_token(s, name)
        return self.token

    def save_client_file(self) -> Path:
        """Write ``<data dir>/client.json`` (this service's URL and token, mode 600), as
        ``layertrack up`` does: ``layertrack up`` on this data directory later finds the token
        there (and puts its own URL in), and so do the CLI and the client."""
        import json

        path = self.data_dir / "client.json"
        path.touch(mode=0o600, exist_ok=True)
        os.chmod(path, 0o600)
        path.write_text(json.dumps({"url": self.url, "token": self.token}))
        return path

    # ------------------------------------------------------------------ processes
    def start_api(self, port: int | None = None, processes: int = 1, timeout: float = 60) -> str:
        """Start ``uvicorn layertrack.service.main:app`` and wait until it answers
        ``/healthz``; returns its URL. Raises RuntimeError (with the end of its log) when it
        exits or does not answer within ``timeout`` seconds."""
        if self.api is not None and self.api.poll() is None:
            return self.url
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self._log("api")
        with open(path, "ab") as log:  # the child keeps its own descriptor
            self.api = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "layertrack.service.main:app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning", "--workers", str(processes)],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.api.poll() is not None:
                with contextlib.suppress(ProcessLookupError):  # whatever it started goes with it
                    os.killpg(self.api.pid, signal.SIGKILL)
                code, self.api = self.api.returncode, None
                raise RuntimeError(f"the API server exited with code {code}:\n{_tail(path)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self.url
            if time.monotonic() > deadline:
                self.stop_api()
                raise RuntimeError(f"the API server did not answer within {timeout:g} s:\n{_tail(path)}")
            time.sleep(0.2)

    def stop_api(self) -> None:
        """Stop the API server (SIGTERM, then SIGKILL after 15 s)."""
        if self.api is not None:
            _stop(self.api, signal.SIGTERM, grace=15)
            self.api = None

    def start_worker(self, name: str, queues: str = "gpu", *, pool: str | None = None,
                     concurrency: int = 1) -> subprocess.Popen:
        """Start a Celery worker ``NAME@host`` consuming ``queues`` (comma separated), one
        task at a time per process. It is not waited for: a task sent before it is ready
        stays in the broker until it is. ``pool="threads"`` suits the webhooks queue."""
        if name in self.workers and self.workers[name].poll() is None:
            raise RuntimeError(f"a worker called {name!r} is already running")
        cmd = [sys.executable, "-m", "celery", "-A", "layertrack.service.queue", "worker", "-Q", queues,
               "-c", str(concurrency), "--prefetch-multiplier", "1", "-n", f"{name}@%h", "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if pool:
            cmd += ["-P", pool]
        with open(self._log(f"worker-{name}"), "ab") as log:
            proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.workers[name] = proc
        return proc

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's whole process group (SIGKILL: a machine that died;
        SIGTERM: a warm shutdown) and wait for it to end."""
        proc = self.workers.pop(name)
        _stop(proc, sig, grace=30)

    def stop(self) -> None:
        """Stop every worker and the API server; forget the database connections this
        process opened (so a PostgreSQL database can be dropped afterwards)."""
        for name in list(self.workers):
            self.kill_worker(name, signal.SIGTERM)
        self.stop_api()
        with contextlib.suppress(Exception):
            from .db import dispose_engine

            dispose_engine(self.db_url)

    def __enter__(self) -> EmbeddedService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ talking to it
    def client(self):
        """The Python client (layertrack.service.client.Client) with this service's token."""
        from .client import Client

        return Client(self.url, self.token, timeout=30)

    def http(self) -> httpx.Client:
        """A plain httpx client on the service's URL, sending the bearer token."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def logs(self) -> str:
        """The end of every log file of the service's processes."""
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(self.log_dir.glob("*.log")))


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, sig: int, grace: float) -> None:
    """``sig`` to the process group of ``proc``; SIGKILL when it has not ended after ``grace`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
