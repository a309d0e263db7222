"""Errors as problem details (RFC 9457, ``application/problem+json``): what was wrong and
what to do, for every error the API answers; and how the OpenAPI document describes them
(``ProblemDetails``, :func:`problem_responses`)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy.exc import OperationalError
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from ..errors import Conflict, Invalid, NotFound, ServiceError
from ..hooks import Unsigned
from ..schemas import RESERVED_SEGMENTS

log = logging.getLogger("layertrack.api")
PROBLEM = "application/problem+json"

#: the HTTP status of each kind of service error
STATUS = {NotFound: 404, Conflict: 409, Invalid: 422, Unsigned: 401}


class FieldError(BaseModel):
    """One invalid part of a request (422): where it is and what was wrong with it."""

    loc: list[str | int] = Field(description="where: 'body', 'query', 'path' or 'header', then the field's path")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. 'missing', 'int_parsing', 'literal_error'")


class ProblemDetails(BaseModel):
    """An error answer (RFC 9457 problem details, ``application/problem+json``)."""

    type: str = Field(default="about:blank", description="always 'about:blank': the status says what kind")
    title: str = Field(description="short, the same for every problem of its kind")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what was wrong with this request and what to do")
    #: (left out when there is none: not null)
    code: str | SkipJsonSchema[None] = Field(default=None, description="machine-readable reason: a specific one "
                                             "where there is one (e.g. 'checkpoint_outside_roots', "
                                             "'run_has_active_jobs'), else the status's ('not_found', 'conflict', "
                                             "'invalid_request', 'forbidden', ...)")
    errors: list[FieldError] | SkipJsonSchema[None] = Field(default=None,
                                                            description="422 from validation: every invalid part")


#: what each status means in this API, as the OpenAPI document says it
DESCRIPTIONS = {
    400: "The request body could not be read (not UTF-8 JSON)",
    401: "Missing, malformed, unknown or revoked API token (signed hooks: a bad signature)",
    403: "The token lacks the scope (or the run) this route needs",
    404: "No such run, job, webhook, delivery, hook source, alert rule or scores",
    405: "Method not allowed on this path; `Allow` lists those that are",
    409: "Conflicts with what is stored (a job's state, an Idempotency-Key, a name taken, a replayed hook)",
    413: "The request body is larger than the service accepts",
    422: "The request is well-formed but invalid; `detail` (and `errors`) say what",
    503: "The database cannot be reached; retry after `Retry-After` seconds",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    405: {"Allow": {"description": "the methods this path supports", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}},
}
PROBLEM_REF = {"$ref": "#/components/schemas/ProblemDetails"}
#: the code of a problem that has no specific one: its status's
STATUS_CODES = {
    400: "unreadable_body", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "body_too_large", 422: "invalid_request", 503: "database_unavailable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router or route: each status as a problem-details answer."""
    return {s: {"description": DESCRIPTIONS[s], "content": {PROBLEM: {"schema": PROBLEM_REF}},
                **({"headers": HEADERS[s]} if s in HEADERS else {})} for s in statuses}


class Problem(Exception):
    """An error the HTTP layer itself finds (authentication, a bad plot format, ...)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra):
        self.status, self.title, self.detail, self.headers, self.extra = status, title, detail, headers, extra


def problem_response(status: int, title: str, detail: str, headers=None, **extra) -> JSONResponse:
    """A problem-details answer; every one has a ``code`` (``extra``'s, else the status's)."""
    code = extra.pop("code", None) or STATUS_CODES.get(status, "error")
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "code": code, **extra}
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


class RunNameConvertor(Convertor):
    """``{run:run}``: a run name as a path (it may contain '/'), but none with a part that names
    a view of a run (``alerts``, ``trend``, ``plot.png`` ...), which a run name may not have. So
    ``GET /v1/runs/{run:run}`` does not take ``/v1/runs/x/alerts/5`` for a run named
    ``x/alerts/5``: that path is DELETE's only, and GET there is 405."""

    _words = "|".join(sorted(RESERVED_SEGMENTS))
    _part = rf"(?!(?:{_words}|plot\.[^/]*)(?:/|$))[^/]+"
    regex = rf"{_part}(?:/{_part})*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("run", RunNameConvertor())  # before the routes that use it are made (runs.py imports this)


def _real_match(params: dict[str, Any]) -> bool:
    """False when a route matched only by taking a view of a run (``x/alerts/5``, ``x/trend``)
    into its ``{run:path}``: run names may not contain those words, so no run is there."""
    run = params.get("run")
    return not isinstance(run, str) or not any(
        seg in RESERVED_SEGMENTS or seg.startswith("plot.") for seg in run.split("/"))


def allowed_methods(routes, scope) -> list[str]:
    """Every method one of ``routes`` answers at this request's path. Starlette's own
    ``Allow`` names only the first route whose path matched, though several routes (GET,
    PATCH and DELETE /v1/webhooks/{id}) share a path."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods:
            match, child = route.matches({**scope, "method": "\0"})  # a method no route has
            if match is not Match.NONE and _real_match(child.get("path_params", {})):
                methods |= route.methods
    return sorted(methods)


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
    async def _http(req: Request, exc: StarletteHTTPException):
        status, headers, detail = exc.status_code, dict(getattr(exc, "headers", None) or {}), str(exc.detail)
        if status == 405:
            allowed = allowed_methods(req.app.state.routes, req.scope)
            if not allowed:  # only a run route matched, with a view's name inside its run name
                return problem_response(404, NotFound.title, f"nothing at {req.url.path}")
            headers["Allow"] = ", ".join(allowed)
            detail = f"{req.method} is not allowed on {req.url.path}; allowed: {headers['Allow']}"
        elif status == 404 and detail == "Not Found":
            detail = f"nothing at {req.url.path}"
        elif status == 400 and detail == "There was an error parsing the body":
            detail = "the request body could not be read: send UTF-8 JSON with 'Content-Type: application/json'"
        title = NotFound.title if status == 404 else HTTPStatus(status).phrase
        return problem_response(status, title, detail, headers or None)

    @app.exception_handler(OperationalError)
    async def _db_down(req: Request, exc: OperationalError):
        log.warning("database unavailable: %s", exc)
        retry_after = req.app.state.settings.retry_after_s
        return problem_response(503, "Database unavailable", "the database cannot be reached; try again shortly",
                                {"Retry-After": str(retry_after)})
