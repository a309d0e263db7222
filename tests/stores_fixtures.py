"""Servers on loopback for the store and fetch tests, and the fixtures that start them.

- ``DirServer``: ``http.server`` serving a directory, with Range support (or without:
  ``ranges=False`` is the plain ``SimpleHTTPRequestHandler``), counting the bytes it serves,
  optionally cutting a body short (``short_by``) or sending it slowly (``delay_s`` per 64 KiB).
- ``Azurite`` and ``GCSEmulator``: the Azure and GCS emulators (below).
- fixtures: ``tiny_single`` and ``tiny_sharded`` (tiny Llama checkpoints, single-file and in
  three shards), ``s3_server`` (tests/moto_s3.py's S3Server, one per module) and ``s3_env``
  (its AWS_* variables set for the test), ``hub`` (tests/hub_server.py, HF_ENDPOINT set),
  ``hub_srv`` (a Hub without a token, one per module, for a live service: :func:`hub_env`),
  ``web`` (a DirServer of a directory of its own, one per module), ``azurite`` and
  ``gcs_emulator``.
- for the remote round trips through a live service: :func:`upload_checkpoint` (a tiny
  checkpoint built under the service's local root and uploaded to a store) and
  :func:`assert_scored_like_local` (the remote job against the same checkpoint's local job).

moto's standalone server as a process of its own is tests/moto_s3.py's ``MotoProcess``.

Import the fixtures into a test module (``from stores_fixtures import s3_env, ...``).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from layertrack.service.embedded import free_port
from moto_s3 import stop_process
from services import max_delta, stored_scores, tiny_job_scores, wait_until


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
    s3_server.bytes_per_s = None
    return s3_server


@pytest.fixture(scope="module")
def hub_srv():
    """A Hub on loopback (tests/hub_server.py) without a token, one per module; a live
    service reaches it through :func:`hub_env`."""
    from hub_server import HubServer

    server = HubServer().start()
    yield server
    server.stop()


def hub_env(hub, home: Path) -> dict[str, str]:
    """The variables that point a process at ``hub`` (no implicit token), its Hub cache
    under ``home``."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HOME": str(home)}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """http.server on 127.0.0.1 serving a directory of its own (``web.directory``), one per module."""
    with contextlib.closing(DirServer(tmp_path_factory.mktemp("web"))) as server:
        yield server


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


# ------------------------------------------------------------------ Azure and GCS emulators
# Azurite (the Azure Storage emulator, a Node program from the npm registry) and
# gcp-storage-emulator (a Python package), for the az:// and gs:// round trips of
# tests/test_remote_emulators.py. Neither is mocked; both run on free ports of 127.0.0.1 and
# keep their data in memory.

#: Azurite's well-known development account (published in Azurite's README; not a secret)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
#: the npm package installed when no Azurite is found (major version 3: the blob service's CLI)
AZURITE_PACKAGE = "azurite@3"


def install_cache_dir() -> Path:
    """Where the tests keep what they install for themselves (Azurite): outside the
    repository, reused across runs. ``LAYERTRACK_TEST_CACHE`` overrides it."""
    base = os.environ.get("LAYERTRACK_TEST_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layertrack-test"


def azurite_blob_script(timeout: float = 600) -> Path:
    """The ``azurite-blob`` program, installed with npm into :func:`install_cache_dir` the
    first time (under a file lock: two sessions at once install it once). Fails the test,
    saying what to do, when Node/npm are missing or the install does not work."""
    import fcntl
    import shutil

    prefix = install_cache_dir() / "azurite"
    script = prefix / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("the Azure round trip needs Azurite, a Node.js program: install Node.js >= 18 and npm "
                    f"(apt-get install nodejs npm); missing: {'node' if node is None else 'npm'}")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not script.is_file():
            cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save",
                   "--loglevel", "error", AZURITE_PACKAGE]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=prefix)
            except subprocess.TimeoutExpired:
                pytest.fail(f"installing Azurite timed out after {timeout:g} s: {' '.join(cmd)} (is the npm registry "
                            "reachable? npm config get registry)")
            if out.returncode != 0 or not script.is_file():
                pytest.fail(f"installing Azurite failed (exit {out.returncode}): {' '.join(cmd)}\n"
                            f"{(out.stdout + out.stderr)[-3000:]}\nThe Azure round trip needs Azurite from the npm "
                            "registry; install it by hand with that command, or point LAYERTRACK_TEST_CACHE at a "
                            "directory holding azurite/node_modules/azurite")
    return script


def _azure_shared_key(method: str, path: str, query: dict[str, str], headers: dict[str, str],
                      content_length: int = 0, content_type: str = "") -> str:
    """The SharedKey Authorization of a Blob service request on Azurite's path-style URL
    (``/devstoreaccount1/container[/blob]``)."""
    import base64
    import hashlib
    import hmac

    canon_headers = "".join(f"{k}:{v}\n" for k, v in sorted((k.lower(), v) for k, v in headers.items()
                                                               if k.lower().startswith("x-ms-")))
    resource = f"/{AZURITE_ACCOUNT}{path}" + "".join(f"\n{k.lower()}:{v}" for k, v in sorted(query.items()))
    to_sign = "\n".join([method, "", "", str(content_length) if content_length else "", "", content_type,
                         "", "", "", "", "", ""]) + "\n" + canon_headers + resource
    digest = hmac.new(base64.b64decode(AZURITE_KEY), to_sign.encode(), hashlib.sha256).digest()
    return f"SharedKey {AZURITE_ACCOUNT}:{base64.b64encode(digest).decode()}"


class Azurite:
    """Azurite's blob service (``azurite-blob``) on a free port of 127.0.0.1, in memory,
    a process of its own. Containers and blobs are written through the Blob REST API with
    the development account's shared key (no Azure SDK needed); ``env()`` is what a
    process needs to reach it: the standard ``AZURE_STORAGE_CONNECTION_STRING``."""

    def __init__(self, workdir: Path):
        script = azurite_blob_script()
        import shutil

        self.port = free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "azurite.log"
        cmd = [shutil.which("node") or "node", str(script), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
               "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        import httpx

        def up() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"Azurite exited with code {self.proc.returncode}:\n"
                            f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                httpx.get(f"{self.url}/", timeout=1)
                return True
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, 60, what=f"Azurite's blob service on port {self.port} to answer")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The blob endpoint of the development account."""
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.url};")

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def _request(self, method: str, path: str, query: dict[str, str], body: bytes = b"",
                 headers: dict[str, str] | None = None):
        from email.utils import formatdate

        import httpx

        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06", **(headers or {})}
        ctype = "application/octet-stream" if body else ""
        if ctype:
            headers["Content-Type"] = ctype
        headers["Authorization"] = _azure_shared_key(method, path, query, headers, len(body), ctype)
        r = httpx.request(method, f"http://127.0.0.1:{self.port}{path}", params=query, content=body,
                          headers=headers, timeout=60)
        if r.status_code >= 300:
            raise RuntimeError(f"Azurite: {method} {path} answered {r.status_code}: {r.text[:500]}")
        return r

    def create_container(self, name: str) -> None:
        self._request("PUT", f"/{AZURITE_ACCOUNT}/{name}", {"restype": "container"})

    def put_blob(self, container: str, name: str, data: bytes) -> None:
        from urllib.parse import quote

        self._request("PUT", f"/{AZURITE_ACCOUNT}/{container}/{quote(name)}", {}, data,
                      {"x-ms-blob-type": "BlockBlob"})

    def upload_dir(self, container: str, prefix: str, directory: Path) -> None:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                self.put_blob(container, f"{prefix}/{p.name}", p.read_bytes())

    def close(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc)


class GCSEmulator:
    """gcp-storage-emulator (in memory, a thread of this process) and, in front of it, the
    part of the GCS XML API that obstore's GCS client speaks.

    obstore (Rust ``object_store``) reads GCS through the XML API only: it lists with
    ``GET /BUCKET?list-type=2&prefix=&delimiter=`` and downloads with ``GET /BUCKET/OBJECT``,
    requiring ``Last-Modified`` and ``ETag`` on the answer. gcp-storage-emulator implements the
    JSON API, and of the XML API only object uploads and downloads, without those headers: its
    list answers 501 Not Implemented, and obstore refuses its downloads ("Last-Modified Header
    missing from response"). So the store's client talks to ``url`` (``STORAGE_EMULATOR_HOST``),
    a small XML front on its own port that answers those two requests from the emulator's
    JSON API (the listing, each object's md5 and update time) and passes the object bytes
    through from the emulator's own download route, honouring ``Range`` and ``If-Match``.
    Objects are written with the emulator's JSON upload API (:meth:`upload_dir`).
    ``object_bytes`` counts the object bytes the front served."""

    def __init__(self, workdir: Path, bucket: str):
        try:
            from gcp_storage_emulator.server import create_server
        except ImportError as e:
            pytest.fail(f"the GCS round trip needs gcp-storage-emulator ({e}); pip install gcp-storage-emulator "
                        "(the test extra should carry it)")
        import logging

        logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
        self.bucket = bucket
        self.emulator_port = free_port()
        self._emulator = create_server("127.0.0.1", self.emulator_port, in_memory=True, default_bucket=bucket,
                                       data_dir=str(workdir))
        self._emulator.start()
        self.object_bytes = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_GCSXmlFront,), {"owner": self})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}

    def upload(self, name: str, data: bytes) -> None:
        import httpx

        r = httpx.post(f"{self.emulator_url}/upload/storage/v1/b/{self.bucket}/o",
                       params={"uploadType": "media", "name": name}, content=data, timeout=60)
        r.raise_for_status()

    def upload_dir(self, prefix: str, directory: Path) -> None:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                self.upload(f"{prefix}/{p.name}", p.read_bytes())

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._emulator.stop()


class _GCSXmlFront(http.server.BaseHTTPRequestHandler):
    """GCS XML API ListObjectsV2 and object GET/HEAD over gcp-storage-emulator's JSON API."""

    owner: GCSEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/xml") -> None:
        self.send_response(status)
        for k, v in {"Content-Type": content_type, **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        from xml.sax.saxutils import escape

        self._send(status, f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>{escape(message)}</Message></Error>".encode())

    @staticmethod
    def _etag(meta: dict) -> str:
        import base64

        return '"' + base64.b64decode(meta["md5Hash"]).hex() + '"'

    @staticmethod
    def _modified(meta: dict) -> tuple[str, str]:
        """(RFC 3339 for listings, HTTP date for headers) of the object's update time."""
        from datetime import datetime
        from email.utils import format_datetime

        t = datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
        return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", format_datetime(t, usegmt=True)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(self.path)
        with self.owner.lock:
            self.owner.requests.append((self.command, self.path))
        bucket, _, name = unquote(parts.path).lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if bucket != self.owner.bucket:
            return self._error(404, "NoSuchBucket", f"the bucket {bucket!r} does not exist")
        if not name and query.get("list-type") == "2" and self.command == "GET":
            return self._list(query)
        if name:
            return self._object(name)
        return self._error(501, "NotImplemented", f"{self.command} {self.path} is not served by this test front")

    def _list(self, query: dict[str, str]) -> None:
        from xml.sax.saxutils import escape

        import httpx

        params = {k: query[k] for k in ("prefix", "delimiter") if query.get(k)}
        items, prefixes, token = [], [], None
        while True:
            r = httpx.get(f"{self.owner.emulator_url}/storage/v1/b/{self.owner.bucket}/o",
                          params={**params, **({"pageToken": token} if token else {})}, timeout=60)
            r.raise_for_status()
            page = r.json()
            items += page.get("items", [])
            prefixes += page.get("prefixes", [])
            token = page.get("nextPageToken")
            if not token:
                break
        start_after = query.get("start-after") or ""
        items = [m for m in items if m["name"] > start_after]
        body = ["<?xml version='1.0' encoding='UTF-8'?>",
                "<ListBucketResult xmlns='http://doc.s3.amazonaws.com/2006-03-01'>",
                f"<Name>{escape(self.owner.bucket)}</Name><Prefix>{escape(params.get('prefix', ''))}</Prefix>",
                f"<KeyCount>{len(items) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>",
                "<IsTruncated>false</IsTruncated>"]
        for m in sorted(items, key=lambda m: m["name"]):
            body.append(f"<Contents><Key>{escape(m['name'])}</Key><Size>{int(m['size'])}</Size>"
                        f"<LastModified>{self._modified(m)[0]}</LastModified>"
                        f"<ETag>{escape(self._etag(m))}</ETag></Contents>")
        body += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes)]
        body.append("</ListBucketResult>")
        self._send(200, "".join(body).encode())

    def _object(self, name: str) -> None:
        from urllib.parse import quote

        import httpx

        r = httpx.get(f"{self.owner.emulator_url}/storage/v1/b/{self.owner.bucket}/o/{quote(name, safe='')}",
                      timeout=60)
        if r.status_code == 404:
            return self._error(404, "NoSuchKey", f"the object {name!r} does not exist")
        r.raise_for_status()
        meta = r.json()
        etag = self._etag(meta)
        match = self.headers.get("If-Match")
        if match is not None and match.strip() not in (etag, "*"):
            return self._error(412, "PreconditionFailed", f"If-Match {match} does not match {etag}")
        headers = {"ETag": etag, "Last-Modified": self._modified(meta)[1], "x-goog-generation": meta["generation"],
                   "Accept-Ranges": "bytes"}
        if self.command == "HEAD":
            headers["Content-Length"] = str(meta["size"])
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        rng = self.headers.get("Range")
        data = httpx.get(f"{self.owner.emulator_url}/{self.owner.bucket}/{quote(name)}",
                         headers={"Range": rng} if rng else {}, timeout=120)
        if data.status_code not in (200, 206):
            return self._error(data.status_code, "EmulatorError", data.text[:300])
        if data.status_code == 206:
            headers["Content-Range"] = data.headers["content-range"]
        with self.owner.lock:
            self.owner.object_bytes += len(data.content)
        self._send(data.status_code, data.content, headers, content_type="application/octet-stream")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """Azurite's blob service on loopback (installed with npm on first use), one per module."""
    with contextlib.closing(Azurite(tmp_path_factory.mktemp("azurite"))) as server:
        yield server


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """gcp-storage-emulator with the XML front obstore needs, bucket ``mlckpts``, one per module."""
    with contextlib.closing(GCSEmulator(tmp_path_factory.mktemp("gcs"), "mlckpts")) as server:
        yield server


# ------------------------------------------------------------------ remote round trips
def upload_checkpoint(live, tokenizer, name: str, upload: Callable[[str, Path], object], *, prefix: str,
                      shard: str | None = None, seed: int = 0) -> tuple[Path, str]:
    """A tiny Llama checkpoint built under the local root of the service ``live`` as ``name``
    and handed to ``upload(key prefix, directory)`` with the key prefix ``prefix/name/step-1``;
    (local directory, key prefix)."""
    from tiny_models import build_checkpoint

    local = build_checkpoint(live.roots / name, "llama", tokenizer, seed=seed, max_shard_size=shard)
    key_prefix = f"{prefix}/{name}/step-1"
    upload(key_prefix, local)
    return local, key_prefix


def assert_scored_like_local(live, done: dict, local_done: dict, local: Path, label: str) -> tuple[dict, int]:
    """The finished remote job ``done`` against ``local_done``, the job of the same checkpoint
    from its local path ``local``: both succeeded, the remote one at its first attempt, with a
    content fingerprint, its progress at "scoring" with every byte done, at least the weights
    and at most every file of the checkpoint; both jobs' stored scores (tiny_job_scores())
    within 1e-12 of each other. (its progress, the size of the weights)."""
    assert done["status"] == "succeeded", (done["error_code"], done["error"], done, live.logs())
    assert local_done["status"] == "succeeded", (local_done["error_code"], local_done["error"], local_done,
                                                 live.logs())
    assert done["attempts"] == 1, done
    assert isinstance(done["content_fingerprint"], str) and len(done["content_fingerprint"]) >= 16, done
    p = done["progress"]
    shards = sorted(f.name for f in local.glob("*.safetensors"))
    sizes = {f.name: f.stat().st_size for f in local.iterdir()}
    weights = sum(sizes[n] for n in shards)
    assert p["phase"] == "scoring" and p["bytes_done"] == p["bytes_total"], p
    assert weights <= p["bytes_total"] <= sum(sizes.values()), (p, sizes)
    a, b = stored_scores(live.db_url, done["id"]), stored_scores(live.db_url, local_done["id"])
    assert len(a) == tiny_job_scores()
    delta = max_delta(a, b)
    print(f"\n{label}: {len(shards)} safetensors file(s), {len(a)} scores, max |Δ| vs local = {delta:.3g}, "
          f"fetched {p['bytes_total']} bytes in {p.get('fetch_s')} s; job {done['duration_s']:.2f} s "
          f"(from a local path: {local_done['duration_s']:.2f} s)")
    assert delta <= 1e-12
    return p, weights
