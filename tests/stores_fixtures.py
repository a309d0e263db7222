"""Servers on loopback for the store and fetch tests, and the fixtures that start them.

- ``DirServer``: ``http.server`` serving a directory, with Range support (or without:
  ``ranges=False`` is the plain ``SimpleHTTPRequestHandler``), counting the bytes it serves,
  optionally cutting a body short (``short_by``) or sending it slowly (``delay_s`` per 64 KiB).
- ``MotoProcess``: moto's standalone server as a process of its own (``python -m
  moto.server``), for what must not touch the in-process S3 server of tests/moto_s3.py
  (switching IAM authentication on, which moto does per process).
- fixtures: ``tiny_single`` and ``tiny_sharded`` (tiny Llama checkpoints, single-file and in
  three shards), ``s3_server`` (tests/moto_s3.py's S3Server, one per module) and ``s3_env``
  (its AWS_* variables set for the test), ``hub`` (tests/hub_server.py, HF_ENDPOINT set).

Import the fixtures into a test module (``from stores_fixtures import s3_env, ...``).
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from layertrack.service.embedded import free_port
from services import wait_until


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    owner: DirServer

    def log_message(self, *args) -> None:
        pass

    def send_head(self):  # Range support on top of SimpleHTTPRequestHandler (GET and HEAD)
        owner = self.owner
        with owner.lock:
            owner.requests.append((self.command, self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if not owner.ranges or m is None or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
        self.end_headers()
        import io

        return io.BytesIO(data[start:end])

    def copyfile(self, source, outputfile) -> None:
        owner = self.owner
        data = source.read()
        if owner.short_by and self.command == "GET" and len(data) > owner.short_by:
            data = data[:-owner.short_by]  # the declared Content-Length is not reached: a cut transfer
        for i in range(0, len(data), 1 << 16):
            if owner.delay_s:
                time.sleep(owner.delay_s)
            outputfile.write(data[i:i + (1 << 16)])
            with owner.lock:
                owner.bytes_served += len(data[i:i + (1 << 16)])
        if owner.short_by and self.command == "GET":
            self.close_connection = True


class DirServer:
    """``http.server`` on 127.0.0.1 serving ``directory``."""

    def __init__(self, directory: Path, *, ranges: bool = True):
        self.directory = Path(directory)
        self.ranges = ranges
        self.short_by = 0
        self.delay_s = 0.0
        self.bytes_served = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_RangeHandler,), {"owner": self})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class MotoProcess:
    """``python -m moto.server`` on a free port of 127.0.0.1, a process of its own."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import httpx

        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/moto-api/", timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, 30, what="moto server to answer")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def enable_iam_auth(self) -> None:
        """From now on every request must be signed by an IAM user's key and allowed by its
        policies (moto evaluates identity policies; it does not evaluate bucket policies)."""
        import httpx

        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0").raise_for_status()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def tiny_single(tmp_path_factory, tokenizer):
    """A tiny Llama checkpoint: config.json, model.safetensors, tokenizer files."""
    from tiny_models import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-single") / "ckpt", "llama", tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory, tokenizer):
    """A tiny Llama checkpoint in three safetensors shards with model.safetensors.index.json."""
    from tiny_models import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-sharded") / "ckpt", "llama", tokenizer, seed=2,
                            max_shard_size="100KB")


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 on loopback (tests/moto_s3.py), one per module."""
    from moto_s3 import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The S3 server, running, with AWS_ENDPOINT_URL and dummy credentials set for this test
    (and no shared config file to read)."""
    if not s3_server.running:
        s3_server.start()
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.reset_counts()
    s3_server.on_get = None
    s3_server.delay_s = 0.0
    return s3_server


@pytest.fixture()
def hub(monkeypatch):
    """A Hub on loopback (tests/hub_server.py) with HF_ENDPOINT pointing at it; token "hf_test"."""
    from hub_server import HubServer

    server = HubServer(token="hf_test").start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    yield server
    server.stop()
