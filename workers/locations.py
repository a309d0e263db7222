"""Checkpoint locations: parsing, normalising and checking checkpoint URIs.

A checkpoint is named by a URI of one of these schemes::

    /abs/path, relative/path, file:///abs/path     a local directory
    s3://bucket/prefix                             AWS S3 or an S3-compatible store
    gs://bucket/prefix                             Google Cloud Storage
    az://container/prefix  (abfs://, abfss://)     Azure Blob Storage
    hf://org/repo[@revision][/subfolder]           a Hugging Face Hub model repository
    http(s)://host[:port]/path                     a directory served over HTTP

A URI never carries credentials: a user name or password, a signed query string
(``X-Amz-Signature``, ``sig=``, ``token=`` ...) or, on s3/gs/az/hf, any query string is
refused (``CredentialsInURI``); the stores take their credentials from the environment of
the process that reads them. ``Location.uri()`` is the normalised form, the one stored.

This module uses the standard library only: the API imports it to validate a submission
and the allowed locations (``LAYERTRACK_CHECKPOINT_ROOTS``) without any store client.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import CredentialsInURI, InvalidCheckpointURI

SCHEMES = ("file", "s3", "gs", "az", "hf", "http", "https")
#: scheme aliases accepted on input, normalised to the scheme on the right
ALIASES = {"abfs": "az", "abfss": "az", "gcs": "gs", "s3a": "s3"}
ROOTS_ENV = "LAYERTRACK_CHECKPOINT_ROOTS"

#: query parameters that carry a credential or a signature (compared lower-cased)
_SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "sig", "se", "sp", "sv", "skoid",
    "token", "access_token", "id_token", "auth", "authorization", "api_key", "apikey", "key", "password",
    "passwd", "secret", "client_secret", "credential", "credentials", "x-amz-date", "expires",
})
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SCHEME_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _shown(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}")


@dataclass(frozen=True)
class Location:
    """Where a checkpoint (or a prefix of checkpoints) is.

    ``container`` is the bucket, the Azure container, ``org/repo`` on the Hub (``org`` alone
    for an allowed-location prefix covering every repository of an organisation) or
    ``host[:port]`` for http(s); ``""`` for a local path. ``path`` is the key prefix inside
    the container without leading or trailing ``/`` (``""``: its root); for ``file`` the
    absolute path. ``revision`` (hf only) is the branch, tag or commit as given.
    """

    scheme: str
    container: str
    path: str
    revision: str | None = None

    @property
    def remote(self) -> bool:
        return self.scheme != "file"

    def uri(self) -> str:
        """The normalised, credential-free URI (what is stored and shown)."""
        if self.scheme == "file":
            return "file://" + quote(self.path, safe="/")
        if self.scheme in ("http", "https"):
            return f"{self.scheme}://{self.container}/{quote(self.path, safe='/')}"
        head = f"{self.scheme}://{self.container}"
        if self.scheme == "hf" and self.revision is not None:
            head += "@" + quote(self.revision, safe="")
        if self.scheme == "hf" and "/" not in self.container and not self.path:
            return head + "/"  # an organisation: hf://EleutherAI/
        if self.path:
            return f"{head}/{self.path}"
        return head if self.scheme == "hf" else head + "/"

    def __str__(self) -> str:
        return self.uri()

    def child(self, name: str) -> Location:
        """The location of ``name`` (one or more ``/``-separated parts) under this one."""
        parts = _segments(name, what=f"name {_shown(name)}")
        if not parts:
            raise InvalidCheckpointURI(f"cannot take the child {_shown(name)} of {self.uri()}: the name is empty")
        if self.scheme == "file":
            return replace(self, path=os.path.join(self.path, *parts))
        return replace(self, path="/".join([p for p in self.path.split("/") if p] + parts))

    @property
    def name(self) -> str:
        """The last part of the path (``checkpoint-1000``), or the container's."""
        if self.path:
            return self.path.rstrip("/").rsplit("/", 1)[-1]
        return self.container.rsplit("/", 1)[-1]

    def identity(self) -> str:
        """What names the store's objects (for caches and fingerprints): the scheme, the
        container and, for s3/gs/az, the endpoint the environment configures. No revision:
        on the Hub the resolved commit is part of a fingerprint separately."""
        endpoint = ""
        if self.scheme == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        elif self.scheme == "gs":
            endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "")
        elif self.scheme == "az":
            endpoint = _azure_account()
        elif self.scheme == "hf":
            endpoint = os.environ.get("HF_ENDPOINT", "")
        return f"{self.scheme}://{self.container}" + (f" ({endpoint})" if endpoint else "")


def _azure_account() -> str:
    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    fields = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
    return (fields.get("BlobEndpoint") or fields.get("AccountName") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
            or os.environ.get("AZURE_STORAGE_ACCOUNT") or "")


def _segments(path: str, *, what: str) -> list[str]:
    """The ``/``-separated parts of a path inside a container; refuses ``.``/``..`` and empty
    parts (a trailing ``/`` is fine) and control characters."""
    if _CONTROL.search(path):
        raise InvalidCheckpointURI(f"{what} contains a control character (NUL, newline, ...); give a plain path")
    parts = path.strip("/").split("/") if path.strip("/") else []
    for p in parts:
        if p in ("", ".", ".."):
            raise InvalidCheckpointURI(
                f"{what} has an empty, '.' or '..' part; give the path without them (s3://bucket/runs/ckpt-1000)")
    return parts


def _refuse_query(uri: str, query: str, scheme: str) -> None:
    names = {k.lower() for k, _ in parse_qsl(query, keep_blank_values=True)}
    if scheme in ("http", "https") and not names & _SECRET_PARAMS:
        raise InvalidCheckpointURI(
            f"checkpoint URI {_shown(_redacted(uri))} has a query string; give the URL of the directory that "
            "holds config.json, without '?...'")
    raise CredentialsInURI(
        f"checkpoint URI {_shown(_redacted(uri))} carries a query string ({', '.join(sorted(names)) or '?'}); "
        "signed URLs and tokens in URIs are refused, because the URI is stored and shown. Give the plain "
        "URI and provide credentials to the workers through the environment (AWS_* / the shared AWS config, "
        "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_CONNECTION_STRING, HF_TOKEN)")


def _redacted(uri: str) -> str:
    """``uri`` without its user info and query string, for messages."""
    uri = re.sub(r"(://)[^/@]*@", r"\1***@", uri, count=1)
    return uri.split("?", 1)[0] + ("?***" if "?" in uri else "")


def parse(uri: str) -> Location:
    """The Location a checkpoint URI (or a local path) names; InvalidCheckpointURI or
    CredentialsInURI when it is malformed or carries credentials."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidCheckpointURI("the checkpoint URI is empty; give a directory path or a URI "
                                   "(file://, s3://, gs://, az://, hf://, https://)")
    uri = uri.strip()
    if "\x00" in uri:
        raise InvalidCheckpointURI("the checkpoint URI contains a NUL byte")
    if _CONTROL.search(uri):
        raise InvalidCheckpointURI("the checkpoint URI contains a control character (newline, tab, ...)")
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = m.group(1).lower() if m and len(m.group(1)) > 1 else ""  # one letter: a Windows drive
    if not scheme:
        return _local(uri)
    scheme = ALIASES.get(scheme, scheme)
    if scheme not in SCHEMES:
        raise InvalidCheckpointURI(
            f"unsupported URI scheme {m.group(1)!r} in {_shown(_redacted(uri))}; use a local path or "
            "file://, s3://, gs://, az://, hf://, http:// or https://")
    try:
        parts = urlsplit(uri)
    except ValueError as e:
        raise InvalidCheckpointURI(f"cannot parse checkpoint URI {_shown(_redacted(uri))} ({e})") from None
    if "@" in parts.netloc:
        if scheme == "az" and parts.password is None and not parts.netloc.startswith("@"):
            raise InvalidCheckpointURI(
                f"{_shown(_redacted(uri))}: give Azure locations as az://container/path and the storage account "
                "through AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING")
        raise CredentialsInURI(
            f"checkpoint URI {_shown(_redacted(uri))} carries a user name or password; credentials in URIs are "
            "refused, because the URI is stored and shown. Give the plain URI and provide credentials to the "
            "workers through the environment")
    if parts.query or uri.endswith("?"):
        _refuse_query(uri, parts.query, scheme)
    if parts.fragment or "#" in uri:
        raise InvalidCheckpointURI(f"checkpoint URI {_shown(_redacted(uri))} has a '#' fragment; leave it out")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidCheckpointURI(f"file URI {_shown(uri)} names host {parts.netloc!r}; use file:///absolute/path")
        return _local(unquote(parts.path) or "/")
    if scheme == "hf":
        return _hf(uri, parts.netloc, parts.path)
    if scheme in ("http", "https"):
        return _http(uri, scheme, parts)
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        kind = "container" if scheme == "az" else "bucket"
        raise InvalidCheckpointURI(
            f"{_shown(uri)} has no valid {kind} name ({bucket!r}); write {scheme}://{kind}/path/to/checkpoint")
    path = "/".join(_segments(parts.path, what=f"the path of {_shown(uri)}"))
    return Location(scheme, bucket, path)


def _local(text: str) -> Location:
    if _CONTROL.search(text):
        raise InvalidCheckpointURI("the checkpoint path contains a control character (newline, tab, ...)")
    try:
        path = os.path.expanduser(text)
    except RuntimeError:  # ~name of no known user
        raise InvalidCheckpointURI(f"cannot expand '~' in {_shown(text)}: no such user's home directory; "
                                   "give an absolute path") from None
    if path.startswith("~"):
        raise InvalidCheckpointURI(f"cannot expand '~' in {_shown(text)}: no such user's home directory; "
                                   "give an absolute path")
    return Location("file", "", os.path.abspath(path))


def _hf(uri: str, netloc: str, path: str) -> Location:
    # hf://org/repo@rev/sub : the org is the netloc; the repo, revision and subfolder follow
    org = netloc
    rest = path.lstrip("/")
    repo, _, tail = rest.partition("/")
    revision = None
    if "@" in org:
        raise InvalidCheckpointURI(f"{_shown(uri)}: write hf://org/repo@revision/subfolder")
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        revision = unquote(revision)
        if not revision or _CONTROL.search(revision) or revision.startswith(("/", "-")) or ".." in revision:
            raise InvalidCheckpointURI(f"{_shown(uri)} has an invalid revision {revision!r}; give a branch, tag or "
                                       "commit (a '/' in a branch name written %2F)")
    if org in ("datasets", "spaces"):
        raise InvalidCheckpointURI(f"{_shown(uri)} names a {org[:-1]} repository; layertrack reads model repositories "
                                   "(hf://org/repo)")
    if not _HF_NAME.fullmatch(org) or (repo and not _HF_NAME.fullmatch(repo)):
        raise InvalidCheckpointURI(f"{_shown(uri)} is not a Hub model URI; write hf://org/repo[@revision][/subfolder]")
    if not repo:
        if revision is not None or tail:
            raise InvalidCheckpointURI(f"{_shown(uri)} names no repository; write hf://org/repo[@revision]")
        return Location("hf", org, "")  # an organisation (an allowed-location prefix)
    sub = "/".join(_segments(tail, what=f"the subfolder of {_shown(uri)}"))
    return Location("hf", f"{org}/{repo}", sub, revision)


def _http(uri: str, scheme: str, parts) -> Location:
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise InvalidCheckpointURI(f"{_shown(uri)} has an invalid port") from None
    if not host:
        raise InvalidCheckpointURI(f"{_shown(uri)} has no host; write {scheme}://host[:port]/path/to/checkpoint/")
    if not re.fullmatch(r"[A-Za-z0-9._:-]+", host) or host.startswith(("-", ".")):
        raise InvalidCheckpointURI(f"{_shown(uri)} has an invalid host name {host!r}")
    container = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        container += f":{port}"
    path = "/".join(_segments(unquote(parts.path), what=f"the path of {_shown(uri)}"))
    return Location(scheme, container.lower(), path)


def within(loc: Location, root: Location) -> bool:
    """Whether ``loc`` is ``root`` or under it: same scheme and container, and ``root``'s path
    a prefix of ``loc``'s on part boundaries (``s3://b/runs`` does not admit
    ``s3://b/runs-evil``). On the Hub, a root naming an organisation (``hf://EleutherAI/``)
    admits each of its repositories; a root with a revision admits that revision only."""
    if loc.scheme != root.scheme:
        return False
    if loc.scheme == "hf":
        if "/" not in root.container:  # an organisation
            return loc.container.split("/", 1)[0] == root.container
        if loc.container != root.container:
            return False
        if root.revision is not None and loc.revision != root.revision:
            return False
    elif loc.container != root.container:
        return False
    if loc.scheme == "file":
        base = root.path.rstrip("/")
        return loc.path == root.path or loc.path.startswith(base + "/")
    if not root.path:
        return True
    return loc.path == root.path or loc.path.startswith(root.path + "/")


def parse_roots(text: str) -> list[Location]:
    """The allowed locations of ``LAYERTRACK_CHECKPOINT_ROOTS`` (or ``up --roots``): entries
    separated by ``,``, or by ``:`` where it does not start ``://`` (so the old
    ``:``-separated directory lists keep working). A URI's ``host:port`` is kept whole; a
    path containing ``:`` must be given in a ``,``-separated list."""
    out: list[Location] = []
    for chunk in text.split(","):
        for entry in _split_colons(chunk):
            if entry.strip():
                out.append(parse(entry.strip()))
    return out


def _split_colons(text: str) -> list[str]:
    entries, i, start = [], 0, 0
    while i < len(text):
        m = _SCHEME_START.match(text, i) if i == start else None
        if m:  # a URI: skip its scheme and authority (host:port, [v6]:port)
            i = m.end()
            while i < len(text) and text[i] not in "/":
                i += 1
            continue
        if text[i] == ":" and not text.startswith("://", i):
            entries.append(text[start:i])
            start = i + 1
        i += 1
    entries.append(text[start:])
    return entries


def admitted(loc: Location, roots: list[Location]) -> bool:
    """Whether some root admits ``loc`` (no roots: everything is admitted)."""
    return not roots or any(within(loc, r) for r in roots)
