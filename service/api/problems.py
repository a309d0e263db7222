"""Errors as problem details (RFC 9457, ``application/problem+json``): what was wrong and
what to do, for every error the API answers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Conflict, Invalid, NotFound, ServiceError
from ..hooks import Unsigned

log = logging.getLogger("layertrack.api")
PROBLEM = "application/problem+json"

#: the HTTP status of each kind of service error
STATUS = {NotFound: 404, Conflict: 409, Invalid: 422, Unsigned: 401}


class Problem(Exception):
    """An error the HTTP layer itself finds (authentication, a bad plot format, ...)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra):
        self.status, self.title, self.detail, self.headers, self.extra = status, title, detail, headers, extra


def problem_response(status: int, title: str, detail: str, headers=None, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _status_of(exc: ServiceError) -> int:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def _message(error: dict) -> str:
    """pydantic's message, naming the value given where pydantic does not (a choice not among
    the allowed ones: ``unknown metric 'x'; known: ...``)."""
    msg = error.get("msg", "")
    given = error.get("input")
    if error.get("type") not in ("literal_error", "enum") or not isinstance(given, str | int | float):
        return msg
    names = [p for p in error.get("loc", ()) if isinstance(p, str)]
    what = names[-1].removesuffix("s") if names and names[-1] not in ("body", "query", "path") else "value"
    return f"unknown {what} {given!r}; {msg[0].lower()}{msg[1:]}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_req, exc: Problem):
        return problem_response(exc.status, exc.title, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(ServiceError)
    async def _service_error(_req, exc: ServiceError):
        extra = {"code": exc.code} if exc.code else {}
        return problem_response(_status_of(exc), exc.title, exc.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", [])), "msg": _message(e), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return problem_response(422, "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return problem_response(exc.status_code, "HTTP error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(req: Request, exc: OperationalError):
        log.warning("database unavailable: %s", exc)
        retry_after = req.app.state.settings.retry_after_s
        return problem_response(503, "Database unavailable", "the database cannot be reached; try again shortly",
                                {"Retry-After": str(retry_after)})
