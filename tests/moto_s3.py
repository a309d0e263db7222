"""A real S3 REST endpoint on loopback for the remote-checkpoint tests: moto's server
application (the one ``moto_server`` runs) in a thread of the test process, with a thin WSGI
layer that counts the object bytes it serves and can cut a transfer short.

Nothing is mocked on the client side: the service's workers talk HTTP to it through their
store client, configured by the standard ``AWS_ENDPOINT_URL`` and ``AWS_*`` credentials
(:meth:`S3Server.env`). :meth:`stop` and :meth:`start` again (same port, same objects: moto
keeps its state in this process) stand for an outage.

Also here, for tests/stores_fixtures.py and bench/fetch_bench.py alike (nothing in this module
needs pytest): :class:`MotoProcess`, moto's standalone server as a process of its own, and
:func:`s3_client`, :func:`upload_dir` and :func:`stop_process`, which both servers use.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from layertrack.service.embedded import free_port

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}


def s3_client(url: str, credentials: dict[str, str] = CREDENTIALS):
    """A boto3 S3 client of the endpoint ``url`` with ``credentials`` (the AWS_* names)."""
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name=credentials["AWS_DEFAULT_REGION"],
                        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])


def upload_dir(client, bucket: str, prefix: str, directory: Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Upload every file of ``directory`` under ``prefix/`` (but those named in ``skip``), one
    PUT per file in name order, with the boto3 ``client``; the keys written."""
    skipped = set(skip)
    keys = []
    for f in sorted(Path(directory).iterdir()):
        if f.is_file() and f.name not in skipped:
            key = f"{prefix.strip('/')}/{f.name}"
            client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
            keys.append(key)
    return keys


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it when it has not exited within ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class MotoProcess:
    """``python -m moto.server`` on a free port of 127.0.0.1, a process of its own (in a
    session of its own with ``new_session``: a terminal's Ctrl-C does not reach it). Raises
    RuntimeError when it exits or does not answer within ``timeout`` seconds."""

    def __init__(self, *, timeout: float = 30, new_session: bool = False):
        import httpx

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=new_session)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/moto-api/", timeout=1).status_code < 500:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"moto's server (python -m moto.server) did not answer on port {self.port} "
                                   f"within {timeout:g} s (exit code {self.proc.returncode})")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this store with the standard provider chain."""
        return {"AWS_ENDPOINT_URL": self.url, **CREDENTIALS}

    def client(self):
        return s3_client(self.url)

    def enable_iam_auth(self) -> None:
        """From now on every request must be signed by an IAM user's key and allowed by its
        policies (moto evaluates identity policies; it does not evaluate bucket policies)."""
        import httpx

        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0").raise_for_status()

    def close(self) -> None:
        stop_process(self.proc)


class S3Server:
    """moto's S3 on ``127.0.0.1:port``. ``object_bytes`` counts the body bytes of object GETs
    served (per key in ``bytes_by_key``); ``on_get(key)`` may return ``"cut"`` to send half of
    that object's body and drop the connection (a server dying mid-transfer); ``delay_s``
    holds each object GET that long before answering; ``bytes_per_s`` (when set) sends each
    object body no faster than that (a throttled link, per request)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._server = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.object_bytes = 0
        self.object_gets = 0
        self.bytes_by_key: dict[str, int] = {}
        self.on_get: Callable[[str], str | None] | None = None
        self.delay_s = 0.0
        self.bytes_per_s: float | None = None
        self._app = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this store with the standard provider chain."""
        return {"AWS_ENDPOINT_URL": self.url, **CREDENTIALS}

    # ------------------------------------------------------------------ the server
    def _wsgi(self, environ: dict[str, Any], start_response) -> Iterable[bytes]:
        key = environ.get("PATH_INFO", "")
        bucket_and_key = key.lstrip("/").split("/", 1)
        is_object_get = (environ["REQUEST_METHOD"] == "GET" and len(bucket_and_key) == 2 and bool(bucket_and_key[1])
                         and "list-type" not in environ.get("QUERY_STRING", ""))
        if is_object_get and self.delay_s:
            threading.Event().wait(self.delay_s)
        action = self.on_get(key) if is_object_get and self.on_get is not None else None
        body = self._app(environ, start_response)
        if not is_object_get:
            return body
        return self._counted(key, body, cut=action == "cut")

    def _counted(self, key: str, body: Iterable[bytes], *, cut: bool) -> Iterable[bytes]:
        data = b"".join(body)
        if hasattr(body, "close"):
            body.close()
        with self._lock:
            self.object_gets += 1
        if cut:
            half = data[: len(data) // 2]
            self._count(key, len(half))
            yield half
            threading.Thread(target=self.stop, daemon=True).start()
            raise ConnectionAbortedError("the S3 test server stops mid-transfer")
        self._count(key, len(data))
        if self.bytes_per_s:
            threading.Event().wait(len(data) / self.bytes_per_s)
        yield data

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.object_bytes += n
            self.bytes_by_key[key] = self.bytes_by_key.get(key, 0) + n

    def start(self) -> S3Server:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        if self._app is None:
            self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self.port, self._wsgi, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    @property
    def running(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------------ objects
    def client(self):
        return s3_client(self.url)

    def upload_dir(self, bucket: str, prefix: str, directory: Path, *, skip: Iterable[str] = ()) -> list[str]:
        """Upload every file of ``directory`` under ``prefix/`` (but those named in ``skip``);
        the keys written."""
        return upload_dir(self.client(), bucket, prefix, directory, skip=skip)

    def reset_counts(self) -> None:
        with self._lock:
            self.object_bytes = self.object_gets = 0
            self.bytes_by_key = {}
