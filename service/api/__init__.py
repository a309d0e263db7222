"""The HTTP API (FastAPI): one module per resource under ``routes/``, assembled here.

OpenAPI at /openapi.json, Swagger UI at /docs. Every /v1 route and /metrics need a bearer
token, but /v1/hooks/checkpoint, which takes a signed webhook instead."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import queue
from ..settings import Settings, get_settings
from .middleware import BodyLimit
from .problems import install_error_handlers
from .routes import (
    alerts,
    checkpoints,
    hook_sources,
    inbound_hooks,
    jobs,
    meta,
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
            await asyncio.to_thread(queue.sweep, settings.db_url, stale_after_s=settings.stale_after_s,
                                    requeue_after_s=settings.requeue_after_s)
        except Exception as e:  # a dependency is down: try again next round
            log.warning("sweep failed: %s: %s", type(e).__name__, e)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
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
    install_error_handlers(app)
    for module in (ops, meta, checkpoints, inbound_hooks, jobs, webhooks, hook_sources, alerts, plots, runs):
        app.include_router(module.router)
    app.include_router(runs.last)  # GET /v1/runs/{run:path} matches every longer run path: last
    app.include_router(pages.router)
    app.mount("/static", pages.static_files(), name="static")
    return app
