"""A loopback server speaking the Hugging Face Hub's HTTP layout, for huggingface_hub via
HF_ENDPOINT (no hub is reachable from the tests).

The endpoints huggingface_hub 2.4 calls for what layertrack uses (read from its source):

    GET  /api/models/{repo}[/revision/{rev}]          HfApi.model_info: {"id", "sha", "siblings", ...}
    GET  /api/models/{repo}/tree/{rev}[/{path}]       HfApi.list_repo_tree (?recursive=, ?expand=; pages
                                                      follow the Link: <...>; rel="next" header)
    GET  /api/models/{repo}/refs                      HfApi.list_repo_refs: {"branches", "tags", "converts"}
    HEAD /{repo}/resolve/{rev}/{path}                 hf_hub_download's metadata (X-Repo-Commit, ETag,
                                                      X-Linked-Etag and X-Linked-Size for LFS files)
    GET  /{repo}/resolve/{rev}/{path}                 the file, honouring Range

Errors are answered as the Hub does, with ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo), which huggingface_hub turns into its error classes. A private
repository answers 401 RepoNotFound without ``Authorization: Bearer <token>``; a gated one 403
GatedRepo. Files ending in .safetensors are LFS files (their oid a sha256), others plain git
blobs (their oid git's blob sha1). Commits are sha1s of their content.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False

    def commit(self, files: dict[str, bytes], *, branch: str | None = "main", tag: str | None = None) -> str:
        h = hashlib.sha1()
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        h.update(str(len(self.commits)).encode())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        if branch:
            self.branches[branch] = sha
        if tag:
            self.tags[tag] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.commits:
            return rev
        return None


def files_of(directory: Path, prefix: str = "") -> dict[str, bytes]:
    """The files of a directory (recursively) as {path in repo: bytes}."""
    return {prefix + p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class HubServer:
    """``HubServer().start()``; ``.url`` for HF_ENDPOINT; ``.repos["org/name"] = Repo()``."""

    def __init__(self, token: str | None = None, page_size: int = 1000):
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.page_size = page_size
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.bytes_served = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---------------------------------------------------------------- answers
    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(code)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
            with self.server_hub._lock:
                self.server_hub.bytes_served += len(body)

    def _json(self, obj, headers: dict | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, code: int, error_code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(code, body, {"Content-Type": "application/json", "X-Error-Code": error_code,
                                "X-Error-Message": message}, head=head)

    def _authorized(self, repo: Repo, head: bool = False) -> bool:
        hub = self.server_hub
        if repo.private and self.headers.get("Authorization") != f"Bearer {hub.token}":
            self._error(401, "RepoNotFound", "Repository not found", head)
            return False
        if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
            self._error(403, "GatedRepo", "Access to this repository is restricted", head)
            return False
        return True

    # ---------------------------------------------------------------- routing
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        hub = self.server_hub
        parts = urlsplit(self.path)
        path = parts.path
        query = parse_qs(parts.query)
        with hub._lock:
            hub.requests.append((self.command, path))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|refs)(?:/([^/]+)(/.*)?)?)?", path)
        if m:
            repo_id, kind, rev, sub = m.group(1), m.group(2), m.group(3), m.group(4)
            return self._api(repo_id, kind, unquote(rev) if rev else None, unquote(sub or "").strip("/"), query)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), head)
        self._error(404, "NotFound", f"no route {path}", head)

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404 if self.headers.get("Authorization") else 401, "RepoNotFound", "Repository not found",
                        head)
            return None
        return repo if self._authorized(repo, head) else None

    def _api(self, repo_id: str, kind: str | None, rev: str | None, sub: str, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if kind == "refs":
            def refs(d: dict[str, str], prefix: str) -> list[dict]:
                return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": s} for n, s in sorted(d.items())]
            return self._json({"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"),
                               "converts": [], "pullRequests": []})
        sha = repo.resolve(rev or "main")
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[sha]
        if kind in (None, "revision"):
            return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                               "siblings": [{"rfilename": p} for p in sorted(files)]})
        # tree
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = sub + "/" if sub else ""
        if sub and not any(p.startswith(prefix) for p in files):
            return self._error(404, "EntryNotFound", f"{sub} does not exist on {rev}")
        entries: dict[str, dict] = {}
        for p, data in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                d = prefix + rest.split("/", 1)[0]
                entries.setdefault(d, {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
                continue
            if recursive:
                for i in range(rest.count("/")):
                    d = prefix + "/".join(rest.split("/")[:i + 1])
                    entries.setdefault(d, {"type": "directory", "path": d,
                                           "oid": hashlib.sha1(d.encode()).hexdigest()})
            entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_id(data)}
            if p.endswith(".safetensors"):
                sha256 = hashlib.sha256(data).hexdigest()
                entry["oid"] = git_blob_id(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
                                           f"size {len(data)}\n".encode())
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
            entries[p] = entry
        listing = sorted(entries.values(), key=lambda e: e["path"])
        start = int(query.get("cursor", ["0"])[0])
        page = listing[start:start + self.server_hub.page_size]
        headers = {}
        if start + self.server_hub.page_size < len(listing):
            nxt = urlsplit(self.path)._replace(query=f"recursive={str(recursive).lower()}&cursor="
                                                     f"{start + self.server_hub.page_size}")
            headers["Link"] = f'<{self.server_hub.url}{nxt.path}?{nxt.query}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", head)
        lfs = path.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, len(data)) if m.group(2) else len(data)
            else:
                start, end = max(0, len(data) - int(m.group(2))), len(data)
            if start >= len(data) and len(data) > 0:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return self._send(206, data[start:end], headers, head)
        self._send(200, data, headers, head)
