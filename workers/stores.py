"""Store clients: listing and reading checkpoint files where training wrote them.

``open_store(location)`` gives a ``Store`` for a ``Location`` (workers/locations.py):

    file           the local file system
    s3, gs, az     obstore (Rust ``object_store``): one client for the three object stores,
                   with concurrent range reads. S3: endpoint from ``AWS_ENDPOINT_URL_S3`` /
                   ``AWS_ENDPOINT_URL``, credentials from boto3's provider chain (environment,
                   shared config and credentials files, SSO, instance roles), none found: unsigned
                   requests. GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` & co.;
                   ``STORAGE_EMULATOR_HOST`` for an emulator. Azure: ``AZURE_STORAGE_CONNECTION_STRING``
                   or ``AZURE_STORAGE_ACCOUNT_NAME`` + ``AZURE_STORAGE_ACCOUNT_KEY`` (or the
                   other ``AZURE_*`` variables obstore reads)
    hf             huggingface_hub (``HF_ENDPOINT``, ``HF_TOKEN``): the revision resolved to its
                   commit, every read pinned to that commit
    http, https    httpx; a directory discovered through the Hugging Face layout (config.json,
                   the index and its shards or model.safetensors, the tokenizer files). Every
                   connection goes to an address checked by workers/netpolicy.py: a host that
                   resolves to a non-public address is refused (``host_refused``) unless
                   ``allow_hosts`` lists it, and the request is sent to the address checked
                   (no second resolution to rebind). Redirects are not followed.

Store errors carry the job error codes: ``checkpoint_not_found`` (404, no such bucket,
key or revision), ``access_denied`` (401/403), ``store_unreachable`` (connection refused,
timeouts, 5xx; transient), ``checkpoint_incomplete`` (a shard not there yet, an object that
changed while it was read; transient).

The client libraries are imported when a store is opened, never at import time, and they
come with the extras ``s3`` (obstore + boto3), ``gcs``, ``azure`` (obstore) and ``hub``
(huggingface_hub). No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from urllib.parse import quote

from . import netpolicy
from .checkpoint import MAX_JSON_BYTES, MAX_TOKENIZER_FILE_BYTES, SMALL_FILES, TOKENIZER_FILES
from .errors import (  # re-exported: the codes a store error fails a job with
    AccessDenied,
    CheckpointIncomplete,
    CheckpointNotFound,
    CheckpointUnreadable,
    FileTooLarge,
    HostRefused,
    InvalidCheckpointURI,
    LayertrackError,
    NoSafetensorsWeights,
    NotAModelDirectory,
    StoreUnreachable,
)
from .locations import Location

__all__ = [
    "AccessDenied", "CheckpointIncomplete", "CheckpointNotFound", "HostRefused", "ObjectInfo", "Store",
    "StoreUnreachable", "checkpoint_files", "fingerprint", "open_store",
]

#: the extra to install for each scheme's client library
EXTRAS = {"s3": "s3", "gs": "gcs", "az": "azure", "hf": "hub"}
#: how long an object store client keeps retrying one request that fails for a transient
#: reason (connection refused, timeouts, 5xx), at most REQUEST_RETRIES times, before it gives
#: up with StoreUnreachable; and how long it waits for a connection. Kept short so one attempt
#: at a store that is down ends in seconds: the worker retries the job with its own back-off,
#: within LAYERTRACK_FETCH_RETRY_BUDGET_S (service/job_runner.py)
RETRY_TIMEOUT_S = 10.0
REQUEST_RETRIES = 3
CONNECT_TIMEOUT_S = 5
#: the files besides the weights that a checkpoint directory may hold and a load reads
OPTIONAL_FILES = tuple(dict.fromkeys((
    "generation_config.json", *TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "vocab.txt", "spiece.model",
    "preprocessor_config.json",
)))
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class ObjectInfo:
    """One file of a checkpoint, from the store's listing (no data read)."""

    key: str  # path relative to the checkpoint location ("config.json", "model-00001-of-00002.safetensors")
    size: int
    version: str | None  # ETag / version id / generation / Hub LFS sha256 or blob id / mtime
    #: ("md5" | "sha256" | "crc32c" | "git-sha1", hex) where the store gives a verifiable one
    checksum: tuple[str, str] | None = None


class Store(Protocol):
    location: Location
    #: what names this store's objects (scheme, container, endpoint): part of cache keys
    identity: str

    def resolve(self) -> str | None:
        """hf: the commit sha of ``location.revision`` (default "main"); others None."""

    def list(self, recursive: bool = False) -> list[ObjectInfo]:
        """The objects under the location (keys relative to it); [] when there are none."""

    def list_dirs(self) -> list[str]:
        """The names of the immediate "subdirectories" of the location (checkpoint-1000 ...)."""

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive; None: the end) of ``key``. With ``version``
        (the ObjectInfo's), CheckpointIncomplete when the object is no longer that version."""

    def revisions(self) -> list[tuple[str, str]]:
        """hf: (branch or tag name, commit sha) of every branch and tag; others raise
        NotImplementedError."""


def _missing_extra(scheme: str, e: ImportError) -> LayertrackError:
    extra = EXTRAS.get(scheme, "worker")
    return InvalidCheckpointURI(
        f"this worker cannot read {scheme}:// checkpoints: {e.name or 'a client library'} is not installed; "
        f"install the extra: pip install 'layertrack[{extra}]'")


def open_store(loc: Location, *, allow_hosts: str = "") -> Store:
    """The store client for ``loc``. ``allow_hosts`` (http/https): comma-separated host
    names, addresses or networks that may be non-public (LAYERTRACK_FETCH_ALLOW_HOSTS)."""
    if loc.scheme == "file":
        return LocalStore(loc)
    if loc.scheme in ("http", "https"):
        return HTTPStore(loc, allow_hosts=allow_hosts)
    try:
        if loc.scheme == "hf":
            return HubStore(loc)
        return ObjectStore(loc)
    except ImportError as e:
        raise _missing_extra(loc.scheme, e) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _parallel(fn, items: Iterable, workers: int = 8) -> list:
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(workers, len(items))) as ex:
        return list(ex.map(fn, items))


# ------------------------------------------------------------------ local directories
class LocalStore:
    """A local directory (watch and backfill list it; a worker scores it in place)."""

    def __init__(self, loc: Location):
        self.location = loc
        self.identity = "file://"

    def resolve(self) -> str | None:
        return None

    def _path(self, key: str) -> str:
        return os.path.join(self.location.path, *key.split("/"))

    def list(self, recursive: bool = False) -> list[ObjectInfo]:
        out = []
        root = self.location.path
        try:
            for dirpath, dirnames, filenames in os.walk(root):
                if not recursive:
                    dirnames.clear()
                dirnames.sort()
                rel = os.path.relpath(dirpath, root)
                for name in sorted(filenames):
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(os.path.join(dirpath, name))
                        key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                        out.append(ObjectInfo(key, st.st_size, f"{st.st_mtime_ns}-{st.st_ino}"))
        except OSError as e:
            raise CheckpointUnreadable(f"cannot list {root!r}: {e.strerror or e}") from None
        return out

    def list_dirs(self) -> list[str]:
        try:
            with os.scandir(self.location.path) as it:
                return sorted(e.name for e in it if e.is_dir())
        except FileNotFoundError:
            raise CheckpointNotFound(f"directory {self.location.path!r} does not exist") from None
        except OSError as e:
            raise CheckpointUnreadable(f"cannot list {self.location.path!r}: {e.strerror or e}") from None

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if version is not None and f"{st.st_mtime_ns}-{st.st_ino}" != version:
                    raise CheckpointIncomplete(f"{path!r} changed while it was read (still being written?)")
                f.seek(start)
                return f.read(-1 if end is None else max(0, end - start))
        except FileNotFoundError:
            raise CheckpointNotFound(f"{path!r} does not exist") from None
        except PermissionError:
            raise AccessDenied(f"{path!r}: permission denied") from None
        except OSError as e:
            raise CheckpointUnreadable(f"{path!r} cannot be read: {e.strerror or e}") from None

    def revisions(self) -> list[tuple[str, str]]:
        raise NotImplementedError("revisions are a Hub notion; a directory has none")


# ------------------------------------------------------------------ S3, GCS, Azure (obstore)
def _azure_config() -> dict[str, Any]:
    """obstore's Azure config from AZURE_STORAGE_CONNECTION_STRING (AccountName, AccountKey,
    BlobEndpoint, SharedAccessSignature, UseDevelopmentStorage); {} leaves obstore to read the
    AZURE_* variables itself."""
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    if not conn:
        cfg = {}
        if os.environ.get("AZURE_STORAGE_ACCOUNT") and not os.environ.get("AZURE_STORAGE_ACCOUNT_NAME"):
            cfg["account_name"] = os.environ["AZURE_STORAGE_ACCOUNT"]
        return cfg
    fields = {k.strip().lower(): v.strip() for k, _, v in (p.partition("=") for p in conn.split(";")) if k.strip()}
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return {"use_emulator": True}
    cfg = {}
    if "accountname" in fields:
        cfg["account_name"] = fields["accountname"]
    if "accountkey" in fields:
        cfg["account_key"] = fields["accountkey"]
    if "sharedaccesssignature" in fields:
        cfg["sas_key"] = fields["sharedaccesssignature"]
    if "blobendpoint" in fields:
        cfg["endpoint"] = fields["blobendpoint"].rstrip("/")
    elif "accountname" in fields:
        proto = fields.get("defaultendpointsprotocol", "https")
        suffix = fields.get("endpointsuffix", "core.windows.net")
        cfg["endpoint"] = f"{proto}://{fields['accountname']}.blob.{suffix}"
    return cfg


def _etag(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


class ObjectStore:
    """s3://, gs:// and az:// through obstore."""

    def __init__(self, loc: Location, *, retry_timeout_s: float | None = None):
        import obstore
        from obstore.store import AzureStore, GCSStore, S3Store

        self.location = loc
        self.identity = loc.identity()
        self._obs = obstore
        timeout = RETRY_TIMEOUT_S if retry_timeout_s is None else retry_timeout_s
        retry = {"max_retries": REQUEST_RETRIES, "retry_timeout": timedelta(seconds=timeout),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                             "base": 2}}
        client: dict[str, Any] = {"connect_timeout": f"{CONNECT_TIMEOUT_S}s", "timeout": "120s"}
        if loc.scheme == "s3":
            self.store = self._s3(S3Store, loc, retry, client)
            self.endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                             or "https://s3.amazonaws.com").rstrip("/")
            self._md5_etags = os.environ.get("LAYERTRACK_S3_ETAG_MD5", "1") not in ("0", "false", "no")
        elif loc.scheme == "gs":
            cfg: dict[str, Any] = {}
            emulator = os.environ.get("STORAGE_EMULATOR_HOST")
            if emulator:
                base = emulator if "://" in emulator else f"http://{emulator}"
                cfg.update(base_url=base.rstrip("/"), skip_signature=True)
                client["allow_http"] = base.startswith("http://")
            self.store = GCSStore(loc.container, config=cfg, client_options=client, retry_config=retry)
            self.endpoint = cfg.get("base_url", "https://storage.googleapis.com")
            self._md5_etags = False
        else:
            cfg = _azure_config()
            if str(cfg.get("endpoint", "")).startswith("http://") or cfg.get("use_emulator"):
                client["allow_http"] = True
            self.store = AzureStore(loc.container, config=cfg, client_options=client, retry_config=retry)
            self.endpoint = cfg.get("endpoint") or ("http://127.0.0.1:10000 (Azurite)" if cfg.get("use_emulator")
                                                    else "https://<account>.blob.core.windows.net")
            self._md5_etags = False

    @staticmethod
    def _s3(S3Store, loc: Location, retry, client):
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = boto3.Session()
        region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        cfg: dict[str, Any] = {"region": region}
        if endpoint:
            cfg["endpoint"] = endpoint.rstrip("/")
            if endpoint.startswith("http://"):
                client["allow_http"] = True
        if session.get_credentials() is None:  # a public bucket: unsigned requests
            return S3Store(loc.container, config={**cfg, "skip_signature": True}, client_options=client,
                           retry_config=retry)
        return S3Store(loc.container, config=cfg, client_options=client, retry_config=retry,
                       credential_provider=Boto3CredentialProvider(session))

    # the errors of obstore, as job errors
    def _error(self, e: Exception, what: str) -> LayertrackError:
        from obstore import exceptions as ox

        where = f"{what} in {self.location.uri()}"
        text = str(e)
        if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
            if "NoSuchBucket" in text or "ContainerNotFound" in text:
                return CheckpointNotFound(f"{where}: the {self._kind()} {self.location.container!r} does not exist")
            return CheckpointNotFound(f"{where} does not exist")
        if isinstance(e, ox.PermissionDeniedError | ox.UnauthenticatedError | PermissionError) or _has_status(
                text, 401, 403) or re.search(
                r"AccessDenied|Forbidden|AuthorizationFailure|InvalidAccessKeyId|SignatureDoesNotMatch", text):
            return AccessDenied(
                f"{where}: access denied by the store ({_first_line(text)}). Give the workers credentials that may "
                f"read it ({self._credentials_hint()})")
        if isinstance(e, ox.PreconditionError) or "Precondition" in text or _has_status(text, 412):
            return CheckpointIncomplete(f"{where} changed while it was read (still being uploaded?)")
        if isinstance(e, ox.GenericError | ConnectionError | TimeoutError | OSError) and (
                re.search(r"connect|timed? ?out|timeout|\b5\d\d\b|error sending request|retries|dns|reset|"
                          r"broken pipe|Service ?Unavailable|SlowDown|Internal ?Error", text, re.I)):
            return StoreUnreachable(f"{where}: {self.location.scheme} endpoint {self.endpoint} "
                                    f"{unreachable_cause(text)}")
        return CheckpointUnreadable(f"{where} cannot be read: {_first_line(text)}")

    def _kind(self) -> str:
        return "container" if self.location.scheme == "az" else "bucket"

    def _credentials_hint(self) -> str:
        return {"s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role",
                "gs": "GOOGLE_APPLICATION_CREDENTIALS or a service account",
                "az": "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY",
                }[self.location.scheme]

    def resolve(self) -> str | None:
        return None

    def _info(self, meta: dict, prefix: str) -> ObjectInfo:
        key = meta["path"][len(prefix) + 1:] if prefix else meta["path"]
        etag = _etag(meta.get("e_tag"))
        version = etag or meta.get("version")  # an ETag changes with the content; If-Match checks it
        checksum = None
        if self._md5_etags and etag and re.fullmatch(r"[0-9a-fA-F]{32}", etag):
            checksum = ("md5", etag.lower())
        return ObjectInfo(key, int(meta["size"]), version, checksum)

    def list(self, recursive: bool = False) -> list[ObjectInfo]:
        prefix = self.location.path
        try:
            if recursive:
                metas = [m for chunk in self._obs.list(self.store, prefix or None) for m in chunk]
            else:
                metas = self._obs.list_with_delimiter(self.store, prefix or None)["objects"]
        except Exception as e:
            raise self._error(e, "listing") from None
        out = [self._info(m, prefix) for m in metas]
        return sorted((o for o in out if o.key), key=lambda o: o.key)

    def list_dirs(self) -> list[str]:
        prefix = self.location.path
        try:
            found = self._obs.list_with_delimiter(self.store, prefix or None)["common_prefixes"]
        except Exception as e:
            raise self._error(e, "listing") from None
        return sorted(p[len(prefix) + 1:] if prefix else p for p in found)

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> bytes:
        options: dict[str, Any] = {}
        if end is not None:
            if end <= start:
                return b""
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        if version is not None:
            options["if_match"] = f'"{version}"'
        try:
            result = self._obs.get(self.store, _join(self.location.path, key), options=options or None)
            return bytes(result.bytes())
        except Exception as e:
            raise self._error(e, repr(key)) from None

    def revisions(self) -> list[tuple[str, str]]:
        raise NotImplementedError("revisions are a Hub notion; object stores have none")


#: what a storage library's error text says about an unreachable endpoint, in words
_CAUSES = (
    (r"ConnectionRefused|Connection refused", "refused the connection (nothing listens there: is the endpoint "
                                              "right and the store up?)"),
    (r"dns error|failed to lookup|Name or service not known|nodename nor servname|getaddrinfo",
     "does not resolve (its host name is unknown: check the endpoint)"),
    (r"ConnectionReset|Connection reset|broken pipe", "reset the connection"),
    (r"TimedOut|timed? ?out|timeout", "did not answer in time"),
    (r"certificate|tls|ssl", "failed the TLS handshake (certificate?)"),
    (r"SlowDown|Service ?Unavailable|\b503\b", "is overloaded (503 / SlowDown)"),
    (r"\b5\d\d\b|Internal ?Error", "answered with a server error (5xx)"),
)


def _has_status(text: str, *codes: int) -> bool:
    """Whether the store's message carries one of these HTTP status codes — as a status, not as
    the digits of a port (``127.0.0.1:41245``), an address or a duration (``in 401.49ms``, which
    obstore prints for a connection that failed after 401 ms)."""
    alts = "|".join(str(c) for c in codes)
    return re.search(rf"(?<![:.\d])({alts})(?![\d.]|\s*(?:ms|s|µs)\b)", text) is not None


def unreachable_cause(text: str) -> str:
    """One phrase for why a store could not be reached, from a storage library's (long,
    nested, debug-formatted) error text; its first line when no known cause is in it."""
    for pattern, phrase in _CAUSES:
        if re.search(pattern, text, re.I):
            return phrase
    return f"cannot be reached ({_first_line(text, 200)})"


def _first_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "..."


# ------------------------------------------------------------------ the Hugging Face Hub
class HubStore:
    """hf://org/repo[@revision][/subfolder] through huggingface_hub (HF_ENDPOINT, HF_TOKEN)."""

    def __init__(self, loc: Location):
        from huggingface_hub import HfApi

        if "/" not in loc.container:
            raise InvalidCheckpointURI(f"{loc.uri()} names an organisation, not a repository; write hf://org/repo")
        self.location = loc
        self.identity = loc.identity()
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self._token = os.environ.get("HF_TOKEN") or None
        self.api = HfApi(endpoint=self.endpoint, token=self._token)
        self._sha: str | None = None
        self._lock = threading.Lock()

    def _error(self, e: Exception, what: str) -> LayertrackError:
        from huggingface_hub import errors as he

        where = f"{what} of {self.location.uri()}"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, he.GatedRepoError) or (status in (401, 403) and not isinstance(
                e, he.RepositoryNotFoundError)):
            return AccessDenied(f"{where}: access denied by the Hub ({_first_line(str(e))}); set HF_TOKEN to a "
                                "token that may read the repository (and accept its terms on the Hub if gated)")
        if isinstance(e, he.RepositoryNotFoundError):
            return CheckpointNotFound(f"{where}: the repository {self.location.container!r} does not exist (or is "
                                      "private: set HF_TOKEN to a token that may read it)")
        if isinstance(e, he.RevisionNotFoundError):
            return CheckpointNotFound(f"{where}: the revision {self.location.revision!r} does not exist")
        if isinstance(e, he.EntryNotFoundError) or status == 404:
            return CheckpointNotFound(f"{where} does not exist")
        if status is not None and (status >= 500 or status == 429):
            return StoreUnreachable(f"{where}: the Hub answered {status}; retried")
        if (status is None and isinstance(e, OSError | ConnectionError | TimeoutError)) or _is_transport_error(e):
            return StoreUnreachable(f"{where}: the Hub at {self.endpoint} {unreachable_cause(str(e))}")
        return CheckpointUnreadable(f"{where} cannot be read: {_first_line(str(e))}")

    def resolve(self) -> str | None:
        with self._lock:
            if self._sha is None:
                rev = self.location.revision or "main"
                try:
                    info = self.api.model_info(self.location.container, revision=rev, expand=["sha"])
                except Exception as e:
                    raise self._error(e, f"revision {rev!r}") from None
                if not info.sha:
                    raise CheckpointUnreadable(f"the Hub gave no commit for revision {rev!r} of {self.location.uri()}")
                self._sha = info.sha
            return self._sha

    def _entries(self, recursive: bool):
        sha = self.resolve()
        try:
            return list(self.api.list_repo_tree(self.location.container, path_in_repo=self.location.path or None,
                                                revision=sha, recursive=recursive))
        except Exception as e:
            raise self._error(e, "listing") from None

    def list(self, recursive: bool = False) -> list[ObjectInfo]:
        from huggingface_hub.hf_api import RepoFile

        prefix = self.location.path
        out = []
        for entry in self._entries(recursive):
            if not isinstance(entry, RepoFile):
                continue
            key = entry.path[len(prefix) + 1:] if prefix else entry.path
            lfs_sha = entry.lfs.sha256 if entry.lfs is not None else None
            if lfs_sha:
                out.append(ObjectInfo(key, int(entry.size), lfs_sha, ("sha256", lfs_sha)))
            else:
                out.append(ObjectInfo(key, int(entry.size), entry.blob_id,
                                      ("git-sha1", entry.blob_id) if entry.blob_id else None))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self) -> list[str]:
        from huggingface_hub.hf_api import RepoFolder

        prefix = self.location.path
        return sorted((e.path[len(prefix) + 1:] if prefix else e.path)
                      for e in self._entries(False) if isinstance(e, RepoFolder))

    def url(self, key: str) -> str:
        return (f"{self.endpoint}/{self.location.container}/resolve/{quote(self.resolve() or '', safe='')}/"
                f"{quote(_join(self.location.path, key), safe='/')}")

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        if end is not None and end <= start:
            return b""
        headers = build_hf_headers(token=self._token)
        headers["Accept-Encoding"] = "identity"
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            r = get_session().get(self.url(key), headers=headers, follow_redirects=True, timeout=120)
            hf_raise_for_status(r)
        except Exception as e:
            raise self._error(e, repr(key)) from None
        return _ranged_body(r.status_code, r.content, start, end, f"{key!r} of {self.location.uri()}")

    def revisions(self) -> list[tuple[str, str]]:
        try:
            refs = self.api.list_repo_refs(self.location.container)
        except Exception as e:
            raise self._error(e, "the branches and tags") from None
        return [(r.name, r.target_commit) for r in [*refs.branches, *refs.tags]]


def _is_transport_error(e: Exception) -> bool:
    return any(c.__name__ in ("TransportError", "ConnectError", "TimeoutException", "NetworkError",
                              "RemoteProtocolError") for c in type(e).__mro__)


def _ranged_body(status: int, body: bytes, start: int, end: int | None, what: str) -> bytes:
    """The bytes start..end of an answer to a range request: a 206's body, or the slice of a
    200's (a server that ignores Range)."""
    if status == 206:
        if end is not None and len(body) != end - start:
            raise StoreUnreachable(f"{what}: the server sent {len(body)} bytes for a {end - start}-byte range")
        return body
    return body[start:end]


# ------------------------------------------------------------------ http(s) directories
def _policy_transport(allow_hosts: str):
    """An httpx transport that connects only to addresses netpolicy admits, and to the very
    address it checked (the request goes to that IP, with the Host header and TLS server name
    of the original host: no second resolution that a rebinding DNS could answer differently)."""
    import httpx

    allow = netpolicy.allow_list(allow_hosts)

    class PolicyTransport(httpx.BaseTransport):
        def __init__(self):
            self._inner = httpx.HTTPTransport(retries=1)

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            host = request.url.host
            port = request.url.port or (443 if request.url.scheme == "https" else 80)
            try:
                infos = netpolicy.resolve_checked(host, port, allow)
            except netpolicy.AddressRefused as e:
                raise HostRefused(
                    f"checkpoint {e}; a checkpoint URL must not reach internal services. Add the host (or its "
                    "network) to LAYERTRACK_FETCH_ALLOW_HOSTS on the workers to allow it") from None
            except netpolicy.Unresolvable as e:
                raise StoreUnreachable(str(e)) from None
            ip = infos[0][4][0].split("%", 1)[0]
            request.url = request.url.copy_with(host=ip)
            if request.url.scheme == "https":
                request.extensions = {**request.extensions, "sni_hostname": host}
            return self._inner.handle_request(request)

        def close(self) -> None:
            self._inner.close()

    return PolicyTransport()


class HTTPStore:
    """A checkpoint directory served over http(s). Nothing lists a directory over plain HTTP,
    so the files are found by name: the Hugging Face layout (config.json, the shard index and
    every shard it names, or model.safetensors; the optional files)."""

    def __init__(self, loc: Location, *, allow_hosts: str = ""):
        import httpx

        self.location = loc
        self.identity = loc.identity()
        self._http = httpx.Client(transport=_policy_transport(allow_hosts), follow_redirects=False, trust_env=False,
                                  timeout=httpx.Timeout(120, connect=10),
                                  headers={"Accept-Encoding": "identity", "User-Agent": "layertrack"})
        self._base = f"{loc.scheme}://{loc.container}/" + (quote(loc.path, safe="/") + "/" if loc.path else "")

    def url(self, key: str) -> str:
        return self._base + quote(key, safe="/")

    def _request(self, method: str, key: str, headers: dict | None = None):
        import httpx

        what = f"{key!r} of {self.location.uri()}"
        try:
            r = self._http.request(method, self.url(key), headers=headers or {})
        except httpx.TimeoutException:
            raise StoreUnreachable(f"{what}: the server at {self._base} did not answer in time") from None
        except httpx.TransportError as e:
            cause = unreachable_cause(f"{e!r} {e}")
            raise StoreUnreachable(f"{what}: the server at {self._base} {cause}") from None
        code = r.status_code
        if code in (404, 410):
            raise CheckpointNotFound(f"{what} does not exist (the server answered {code})")
        if code in (401, 403):
            raise AccessDenied(f"{what}: the server answered {code}; layertrack sends no credentials over http(s): "
                               "serve the checkpoint to the workers without authentication")
        if code == 429 or code >= 500:
            raise StoreUnreachable(f"{what}: the server answered {code}")
        if 300 <= code < 400:
            raise CheckpointUnreadable(f"{what}: the server redirects ({code} to {r.headers.get('location')!r}); "
                                       "redirects are not followed: give the final URL")
        if code >= 400:
            raise CheckpointUnreadable(f"{what}: the server answered {code}")
        return r

    @staticmethod
    def _version(r) -> str | None:
        return _etag(r.headers.get("etag")) or r.headers.get("last-modified")

    def _head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._request("HEAD", key)
            size = r.headers.get("content-length")
            if size is None or r.headers.get("content-encoding", "identity") != "identity":
                raise ValueError
        except CheckpointNotFound:
            return None
        except (ValueError, CheckpointUnreadable):  # no HEAD, or no length: ask for the first byte
            try:
                r = self._request("GET", key, {"Range": "bytes=0-0"})
            except CheckpointNotFound:
                return None
            m = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("content-range", ""))
            size = m.group(1) if m else r.headers.get("content-length")
            if size is None:
                raise CheckpointUnreadable(f"{key!r} of {self.location.uri()}: the server gives no size") from None
        return ObjectInfo(key, int(size), self._version(r))

    def resolve(self) -> str | None:
        return None

    def list(self, recursive: bool = False) -> list[ObjectInfo]:
        names = ["config.json", SAFE_INDEX, "model.safetensors", PICKLE_INDEX, "pytorch_model.bin", *OPTIONAL_FILES]
        found = {o.key: o for o in _parallel(self._head, names) if o is not None}
        for index in (SAFE_INDEX, PICKLE_INDEX):
            if index in found:
                with contextlib.suppress(NotAModelDirectory, FileTooLarge):
                    shards = _index_shards(self, found[index])
                    found.update({o.key: o for o in _parallel(self._head, [s for s in shards if s not in found])
                                  if o is not None})
        return sorted(found.values(), key=lambda o: o.key)

    def list_dirs(self) -> list[str]:
        raise NotImplementedError("a directory served over http(s) cannot be listed; give each checkpoint's URL")

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        r = self._request("GET", key, headers)
        if version is not None and self._version(r) not in (None, version):
            raise CheckpointIncomplete(f"{key!r} of {self.location.uri()} changed while it was read "
                                       "(still being written?)")
        return _ranged_body(r.status_code, r.content, start, end, f"{key!r} of {self.location.uri()}")

    def revisions(self) -> list[tuple[str, str]]:
        raise NotImplementedError("revisions are a Hub notion; an http(s) directory has none")


# ------------------------------------------------------------------ the checkpoint's files
def _index_shards(store: Store, index: ObjectInfo) -> list[str]:
    """The shard file names a weight index names (read through the store)."""
    if index.size > MAX_JSON_BYTES:
        raise FileTooLarge(f"{index.key!r} of {store.location.uri()} is {index.size:,} bytes; layertrack reads at "
                           f"most {MAX_JSON_BYTES:,} bytes of a shard index")
    raw = store.read(index.key, version=index.version)
    try:
        shards = sorted(set(json.loads(raw)["weight_map"].values()))
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        raise NotAModelDirectory(f"{index.key!r} of {store.location.uri()} is not a valid shard index "
                                 f"({type(e).__name__}: {e})") from None
    odd = [s for s in shards if not isinstance(s, str) or s in ("", ".", "..") or "/" in s or "\\" in s
           or "\x00" in s]
    if odd:
        raise NotAModelDirectory(f"{index.key!r} of {store.location.uri()} lists shard {odd[0]!r}, which is not a "
                                 "file name: the shards of a checkpoint are files beside the index")
    return shards


def checkpoint_files(listing: list[ObjectInfo], store: Store | None = None, *,
                     allow_pickle: bool = False) -> list[ObjectInfo]:
    """The files of a Hugging Face checkpoint among ``listing`` (a store's ``list()``), in the
    order a fetch wants them: config.json, then the weights (model.safetensors, or the index
    and every shard it names, read through ``store``), then generation_config.json and the
    tokenizer files. Pickle weights (pytorch_model.bin, or its index and shards) only with
    ``allow_pickle`` and no safetensors.

    CheckpointNotFound when ``listing`` is empty; CheckpointIncomplete when there is no
    config.json or no weights yet, or the index names a shard not (yet) listed (an upload
    in progress); FileTooLarge when a small file is over its cap.
    """
    if not listing:
        where = f" at {store.location.uri()}" if store is not None else ""
        raise CheckpointNotFound(f"there is no checkpoint{where}: nothing is stored there")
    where = f"checkpoint {store.location.uri()}" if store is not None else "the checkpoint"
    by_key = {o.key: o for o in listing}
    for o in listing:
        limit = MAX_TOKENIZER_FILE_BYTES if o.key in TOKENIZER_FILES else MAX_JSON_BYTES
        if (o.key in SMALL_FILES or o.key in TOKENIZER_FILES) and o.size > limit:
            raise FileTooLarge(f"{o.key!r} of {where} is {o.size:,} bytes; layertrack reads at most {limit:,} bytes "
                               "of it: a real one is far smaller")
    if "config.json" not in by_key:
        raise CheckpointIncomplete(
            f"{where} has no config.json (yet): {len(listing)} other file(s) are there. A Hugging Face checkpoint "
            "holds config.json and model.safetensors (or shards listed in model.safetensors.index.json); if it is "
            "still being uploaded, it is retried")
    weights: list[ObjectInfo] = []
    safetensors = sorted(k for k in by_key if k.endswith(".safetensors") and "/" not in k)
    pickles = sorted(k for k in by_key if re.fullmatch(r"pytorch_model.*\.bin", k))
    index_key = SAFE_INDEX if SAFE_INDEX in by_key else (
        PICKLE_INDEX if PICKLE_INDEX in by_key and not safetensors and allow_pickle else None)
    if index_key is not None:
        if store is None:
            raise ValueError("checkpoint_files needs the store to read the shard index")
        shards = _index_shards(store, by_key[index_key])
        missing = [s for s in shards if s not in by_key]
        if missing:
            raise CheckpointIncomplete(
                f"{where} is incomplete: shard(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                f"named in {index_key} are not there (yet): still being uploaded?")
        weights = [by_key[index_key], *(by_key[s] for s in shards)]
    elif "model.safetensors" in by_key:
        weights = [by_key["model.safetensors"]]
    elif safetensors:
        raise CheckpointIncomplete(f"{where} has {', '.join(safetensors[:3])} but neither model.safetensors nor "
                                   f"{SAFE_INDEX} (yet)")
    elif pickles:
        if not allow_pickle:
            raise NoSafetensorsWeights(
                f"{where} has only pickle weights ({', '.join(pickles)}) and no safetensors. Pickle files can run "
                "code when loaded, so they are refused by default: save the model with "
                "save_pretrained(safe_serialization=True), or allow pickle explicitly (--allow-pickle)")
        if "pytorch_model.bin" not in by_key:
            raise CheckpointIncomplete(f"{where} has {', '.join(pickles[:3])} but no {PICKLE_INDEX} (yet)")
        weights = [by_key["pytorch_model.bin"]]
    else:
        raise CheckpointIncomplete(f"{where} has config.json but no weights (yet): expected model.safetensors or "
                                   f"{SAFE_INDEX} with its shards")
    chosen = [by_key["config.json"], *weights]
    keys = {o.key for o in chosen}
    chosen += [by_key[k] for k in OPTIONAL_FILES if k in by_key and k not in keys]
    return chosen


def fingerprint(loc: Location, files: list[ObjectInfo], resolved: str | None) -> str:
    """The content fingerprint of a remote checkpoint, from metadata only: sha256 over the
    store's identity and the location's path, the resolved commit (hf), and each file's key,
    size and version. The revision as given is left out: hf://o/r@main and the same commit by
    its sha fingerprint alike."""
    h = hashlib.sha256()
    h.update(f"layertrack-remote-v1\0{loc.identity()}\0{loc.path}\0{resolved or ''}\0".encode())
    for o in sorted(files, key=lambda o: o.key):
        h.update(f"{o.key}\0{o.size}\0{o.version or ''}\0".encode())
    return h.hexdigest()
