"""Pure ASGI middleware (no per-request overhead beyond what it checks): the bearer token
before anything reads the body, then the body's size."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from .problems import problem_response

#: the routes under /v1 that take no API token: the signed hook (Standard Webhooks) and bucket
#: notifications (the hook source's own secret as the bearer); each checks its credential itself
SIGNED = frozenset({"/v1/hooks/checkpoint", "/v1/hooks/object-store"})
CHALLENGE = {"WWW-Authenticate": "Bearer"}
MISSING = "missing API token: send 'Authorization: Bearer <token>' (create one with 'layertrack token create')"
MALFORMED = "the Authorization header must be 'Bearer <token>'"
UNKNOWN = "unknown or revoked API token"


def needs_token(path: str) -> bool:
    """Every /v1 route and /metrics need a bearer token, but the inbound hooks (SIGNED);
    /healthz, /readyz, the pages, /static, /docs and /openapi.json hold no data."""
    return (path == "/metrics" or path == "/v1" or path.startswith("/v1/")) and path not in SIGNED


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def _unauthorized(detail: str):
    return problem_response(401, "Unauthorized", detail, CHALLENGE)


class RequireBearer:
    """Answer 401 before the request's body is read or parsed when a route that needs a token
    gets none or a malformed one. A request that carries a body also has its token checked
    (``verify(token)``: True, False, or None when that cannot be told now, e.g. the database
    is down); requests without a body leave that to the routes' ``current_caller``, which
    checks every token again either way (a verified token is cached, so that costs nothing)."""

    def __init__(self, app, verify: Callable[[str], bool | None] | None = None,
                 known: Callable[[str], bool] | None = None):
        #: ``known(token)``: verified recently (a cache hit, answered on the event loop without
        #: a thread or a database session)
        self.app, self.verify, self.known = app, verify, known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not needs_token(scope["path"]):
            return await self.app(scope, receive, send)
        value = _header(scope, b"authorization")
        if not value:
            return await _unauthorized(MISSING)(scope, receive, send)
        scheme, _, token = value.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return await _unauthorized(MALFORMED)(scope, receive, send)
        has_body = _header(scope, b"transfer-encoding") is not None or _header(scope, b"content-length") not in (
            None, b"0")
        if (has_body and self.verify is not None and not (self.known is not None and self.known(token))
                and await anyio.to_thread.run_sync(self.verify, token) is False):
            return await _unauthorized(UNKNOWN)(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: a declared length at once, a chunked
    body (no length declared) as soon as it has grown past the limit, before the app sees
    any of it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        return problem_response(413, "Request too large", f"the request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            return await self.app(scope, receive, send)
        if _header(scope, b"transfer-encoding") is None:  # no body
            return await self.app(scope, receive, send)
        # chunked: read it here (at most max_bytes), then hand the app the whole body at once
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                first = message
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()  # after the body: a disconnect, when it comes

        return await self.app(scope, replay, send)
