"""The HTTP API (FastAPI): one module per resource under ``routes/``, assembled here.

OpenAPI at /openapi.json, Swagger UI at /docs. Every /v1 route and /metrics need a bearer
token, but /v1/hooks/checkpoint, which takes a signed webhook instead, and
/v1/hooks/object-store, which takes a hook source's secret as its bearer. The OpenAPI document
says what the API answers: every error as ``application/problem+json`` (``ProblemDetails``),
the resource's own 404/409 given where its router is included, the answers of the
middleware and of validation (400, 401, 403, 413, 422, 503) added by :func:`describe_errors`
from what each operation is (token or not, parameters, a body)."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .. import auth, sweeper
from ..db import get_sessionmaker
from ..settings import Settings, get_settings
from .deps import secrets_at_rest
from .middleware import BodyLimit, RequireBearer, needs_token
from .problems import ProblemDetails, install_error_handlers, problem_responses
from .routes import (
    alerts,
    checkpoints,
    hook_sources,
    inbound_hooks,
    jobs,
    meta,
    object_store_hooks,
    ops,
    pages,
    plots,
    runs,
    webhooks,
)

__all__ = ["create_app"]

log = logging.getLogger("layertrack.api")


async def _sweeper(settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            await asyncio.to_thread(sweeper.sweep, settings.db_url, stale_after_s=settings.stale_after_s,
                                    requeue_after_s=settings.requeue_after_s)
        except Exception as e:  # a dependency is down: try again next round
            log.warning("sweep failed: %s: %s", type(e).__name__, e)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with secrets_at_rest(app):  # refuse to start without the key of stored secrets
            task = asyncio.create_task(_sweeper(settings)) if settings.sweep_interval_s > 0 else None
            yield
        if task:
            task.cancel()

    app = FastAPI(
        title="layertrack",
        version="0.1.0",
        description="Track how the layers of a transformer language model change while it trains.",
        lifespan=lifespan,
        docs_url=None,  # served by routes/pages.py from the package's own assets
        redoc_url=None,
    )
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequireBearer, verify=_token_check(settings),  # outermost: before the body is read
                       known=lambda token: auth.cached(token) is not None)
    install_error_handlers(app)
    #: each router with the errors of its resource (the rest: describe_errors)
    routers = [
        (ops.router, ()), (meta.router, ()), (checkpoints.router, (409,)),
        (inbound_hooks.router, (401, 409, 503)), (object_store_hooks.router, (401, 409, 503)),
        (jobs.router, (404, 409)), (webhooks.router, (404, 409)),
        (hook_sources.router, (404, 409)), (alerts.router, (404,)), (plots.router, (404,)), (runs.router, (404,)),
        (runs.last, (404,)),  # GET /v1/runs/{run:path} matches every longer run path: last
        (pages.router, ()),
    ]
    for router, statuses in routers:
        app.include_router(router, responses=problem_responses(*statuses))
    app.mount("/static", pages.static_files(), name="static")
    app.state.routes = [route for router, _ in routers for route in router.routes]  # for 405's Allow

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI's, cached until the routes change
        if "ProblemDetails" not in schema.get("components", {}).get("schemas", {}):
            describe_errors(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _token_check(settings: Settings):
    """For RequireBearer: is this token known and not revoked (None: cannot tell now)."""

    def verify(token: str) -> bool | None:
        try:
            with get_sessionmaker(settings.db_url)() as session:
                return auth.verify(session, token) is not None
        except Exception:  # the database is down: the route's own check answers (503)
            return None

    return verify


def describe_errors(schema: dict[str, Any]) -> None:
    """Add to FastAPI's OpenAPI document what it cannot know: the bearer token as a security
    scheme (instead of an ``authorization`` header parameter) and the errors every operation
    can answer, as problem details: 401/403/503 where a token is needed (the token is looked
    up in the database), 422 where there are parameters or a body (in place of FastAPI's
    ``HTTPValidationError``, which the API never sends), 400 and 413 where there is a body."""
    components = schema.setdefault("components", {})
    defs = components.setdefault("schemas", {})
    problem = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(problem.pop("$defs", {}))
    defs["ProblemDetails"] = problem
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "description": "an API token ('layertrack token create')"}
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            statuses: list[int] = []
            if needs_token(path):
                op["security"] = [{"bearer": []}]
                op["parameters"] = [p for p in op.get("parameters", ())
                                    if not (p.get("in") == "header" and p.get("name", "").lower() == "authorization")]
                statuses += [401, 403, 503]
            if not op.get("parameters"):
                op.pop("parameters", None)
            if op.get("parameters") or "requestBody" in op:
                statuses.append(422)
            if "requestBody" in op:
                statuses += [400, 413]
            responses = op.setdefault("responses", {})
            if 422 not in statuses:
                responses.pop("422", None)  # FastAPI's, for the authorization header taken out above
            for status, response in problem_responses(*statuses).items():
                if str(status) == "422" or str(status) not in responses:
                    responses[str(status)] = response
            op["responses"] = dict(sorted(responses.items()))
    for name in ("HTTPValidationError", "ValidationError"):  # in this order: the first refers to the second
        if f'"#/components/schemas/{name}"' not in json.dumps([schema["paths"], defs]):
            defs.pop(name, None)
