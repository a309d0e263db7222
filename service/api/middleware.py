"""Pure ASGI middleware (no per-request overhead beyond what it checks)."""

from __future__ import annotations

from .problems import Problem, problem_response


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    return await problem_response(413, "Request too large", message)(scope, receive, send)
                return await self.app(scope, receive, send)
        seen = 0

        async def limited_receive():  # chunked upload: count as it arrives
            nonlocal seen
            chunk = await receive()
            seen += len(chunk.get("body", b""))
            if seen > self.max_bytes:
                raise Problem(413, "Request too large", message)
            return chunk

        return await self.app(scope, limited_receive, send)
