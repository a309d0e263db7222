"""``layertrack up``: the whole service on this machine, supervised by one command.

Migrates the database, creates a first API token when there is none (every scope, saved to
``<data dir>/client.json``, where the CLI and the Python client find it), makes sure there
is a key for the webhook and hook-source secrets (``LAYERTRACK_SECRET_KEYS``, else
``<data dir>/secret.key``, created with mode 600), starts two Celery
workers as child processes (scoring on the ``gpu`` queue, webhook deliveries on
``webhooks``), and serves the API in this process until Ctrl-C or SIGTERM (however ``up`` was
started: ``common.stop_on_ctrl_c_and_sigterm``); then stops the workers and exits 0.
``--roots`` sets the checkpoint roots of the API and of the workers it starts. The workers' output
and the API server's log go to ``<data dir>/logs/`` (``LOG_DIR``); ``up`` prints only its own lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from layertrack.workers.checkpoint import ROOTS_ENV  # stdlib only: no torch

from .admin import database_errors, safe_url
from .common import CliError, stop_on_ctrl_c_and_sigterm

#: under the data directory: api.log (the API server, its access log) and worker-NAME.log
LOG_DIR = "logs"
CELERY = ("-m", "celery", "-A", "layertrack.service.queue", "worker", "--loglevel", "INFO")
#: (name, queue arguments) of the workers ``up`` starts
WORKERS = (
    ("embedded", ("-Q", "gpu", "-c", "1", "--prefetch-multiplier", "1")),
    # webhook deliveries: a light worker of their own, so a long scoring job never delays them
    ("embedded-hooks", ("-Q", "webhooks", "-P", "threads", "-c", "4")),
)


def checkpoint_roots(given: list[str]) -> list[Path | str]:
    """``--roots`` as absolute directories and normalized URI prefixes (s3://, gs://, az://,
    hf://, http(s)://); a missing directory is an error, not a silent root, and so is a URI
    with credentials in it."""
    from layertrack.workers import locations
    from layertrack.workers.errors import LayertrackError

    from ..jobs import is_remote

    roots: list[Path | str] = []
    for r in given:
        if is_remote(r):
            try:
                roots.append(locations.parse(r).uri())
            except LayertrackError as e:
                raise CliError(f"checkpoint root #{given.index(r) + 1} of --roots: {e.message}") from None
            continue
        path = Path(r).expanduser().resolve()
        if not path.is_dir():
            raise CliError(f"checkpoint root {r!r} is not a directory ({path}); create it or give another --roots")
        roots.append(path)
    return roots


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise CliError(f"cannot listen on {host}:{port} ({e.strerror}); is another 'layertrack up' running? "
                           "Pick another port with --port") from None


def _save_token(settings, url: str) -> str:
    """Create the first token when the database has none; the line ``up`` prints about it."""
    from sqlalchemy import func, select

    from ..auth import SCOPES, create_token
    from ..db import session_scope
    from ..models import ApiToken

    cfile = settings.data_dir / "client.json"
    with session_scope(settings.db_url) as s:
        if not s.scalar(select(func.count(ApiToken.id))):
            _row, secret = create_token(s, "default", scopes=SCOPES)  # admin: every scope, every run
            cfile.write_text(json.dumps({"url": url, "token": secret}))
            os.chmod(cfile, 0o600)
            return f"first API token saved to {cfile} (the CLI and the Python client read it from there)"
    if cfile.is_file():
        saved = json.loads(cfile.read_text())
        saved["url"] = url
        cfile.write_text(json.dumps(saved))
        return f"API token for the CLI and client: {cfile}"
    return "no saved token: create one with 'layertrack token create NAME'"


def _secret_key(settings) -> str:
    """Check the key of the stored secrets (and encrypt any stored in clear); create the key
    file when no key is configured. The line ``up`` prints about it."""
    from .. import crypto

    try:
        crypto.startup_check(settings, encrypt_plaintext=False)  # stored secrets and no key: refuse
        crypto.ensure_key_file(settings, announce=False)  # no key at all: make one (the line below says so)
        crypto.startup_check(settings, encrypt_plaintext=True)  # secrets stored in clear: encrypt them
    except crypto.SecretKeyError as e:
        raise CliError(str(e)) from None
    if settings.secret_keys:
        return f"webhook and hook-source secrets encrypted with the keys in {crypto.ENV}"
    return (f"webhook and hook-source secrets encrypted with the key in {crypto.key_file(settings)} "
            "(back it up with the database)")


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def log_config(path: Path) -> dict:
    """uvicorn's logging, into ``path``: its start and stop lines, the access log and the API's
    own loggers (layertrack.*, the sweeper) at INFO; errors also on stderr."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": fmt},
            "access": {"()": "uvicorn.logging.AccessFormatter", "use_colors": False,
                       "fmt": '%(asctime)s %(levelname)s access: %(client_addr)s "%(request_line)s" %(status_code)s'},
        },
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "plain"},
            "access": {"class": "logging.FileHandler", "filename": str(path), "formatter": "access"},
            "errors": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "level": "ERROR",
                       "formatter": "plain"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["file", "errors"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "layertrack": {"handlers": ["file", "errors"], "level": "INFO", "propagate": False},
        },
    }


def _watch_workers(workers: list[tuple[str, subprocess.Popen, Path]]):
    """Say on stderr, once, when a worker fails (exits with a code other than 0) while the API
    still runs: its output is in its log, not on the terminal. Returns the Event that ends the
    watch (set it before stopping the workers)."""
    import threading

    done = threading.Event()

    def watch() -> None:
        alive = list(workers)
        while alive and not done.wait(1):
            for item in list(alive):
                what, proc, path = item
                if proc.poll() is not None:
                    alive.remove(item)
                    if proc.returncode != 0 and not done.is_set():
                        print(f"error: the {what} worker exited with code {proc.returncode}; its log: {path}",
                              file=sys.stderr, flush=True)

    threading.Thread(target=watch, name="layertrack-up-workers", daemon=True).start()
    return done


def cmd_up(args: argparse.Namespace) -> int:
    stop_on_ctrl_c_and_sigterm()  # however it was started (common.py); the workers get the default handlers
    if args.data_dir:  # before anything reads the settings: the API reads them below, the workers inherit them
        data_dir = Path(args.data_dir).expanduser().resolve()
        if data_dir.exists() and not data_dir.is_dir():
            raise CliError(f"--data-dir {args.data_dir!r} is not a directory ({data_dir}); give a directory")
        os.environ["LAYERTRACK_DATA_DIR"] = str(data_dir)
    if args.roots:
        # before anything reads the settings: the API reads them below, the workers inherit them
        roots = checkpoint_roots(args.roots)
        # ":" as before for directories; "," once a URI is among them (parse_roots takes both)
        os.environ[ROOTS_ENV] = (",".join if any(isinstance(r, str) for r in roots) else os.pathsep.join)(
            map(str, roots))
    import uvicorn

    from ..api import create_app
    from ..db import upgrade
    from ..settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    _check_port(args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    with database_errors(settings.db_url):
        settings.ensure_dirs()
        upgrade(settings.db_url)
        key_line = _secret_key(settings)
        token_line = _save_token(settings, url)
    logs = settings.data_dir / LOG_DIR
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create the log directory {logs}: {e.strerror}; check LAYERTRACK_DATA_DIR") from None
    workers: list[subprocess.Popen] = []
    started: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        if not args.no_worker:
            for (name, queue), what in zip(WORKERS, ("scoring", "webhook"), strict=True):
                path = logs / f"worker-{name}.log"
                with open(path, "ab") as log:  # the worker keeps its own descriptor: its banner and log go there
                    proc = subprocess.Popen([sys.executable, *CELERY, *queue, "-n", f"{name}@%h"],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                workers.append(proc)
                started.append((what, proc, path))
        print(f"layertrack is up at {url}  (API docs: {url}/docs)")
        print(f"database {safe_url(settings.db_url)}; broker {settings.broker}")
        print(f"checkpoint roots: {', '.join(r.uri() if r.remote else r.path for r in settings.root_locations)}")
        print(key_line)
        print(token_line)
        print(f"logs in {logs}: {', '.join(['api.log', *(p.name for _w, _p, p in started)])}")
        print("Ctrl-C stops it", flush=True)
        watching = _watch_workers(started)
        # uvicorn shuts down on Ctrl-C or SIGTERM, then raises it again: a clean stop
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=log_config(logs / "api.log"))
    finally:
        if started:
            watching.set()
        _stop(workers)
    return 0
