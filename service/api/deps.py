"""Request dependencies, composed with ``Annotated``: the settings, a database session, and
the caller (the bearer token's owner). A handler declares what it needs:

    def read_job(job_id: str, session: SessionDep) -> JobOut: ...

Routers that need a token declare ``dependencies=[Depends(current_caller)]``; FastAPI gives
the handler and the token check the same session within one request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from .. import auth
from ..db import get_sessionmaker
from ..settings import Settings
from .problems import Problem


async def settings_dep(request: Request) -> Settings:  # async: no thread hop
    """The app's settings (create_app's argument). Not a dependency override: FastAPI
    re-analyses overrides on every request, which cost ~3 ms per call."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_dep)]


def session_dep(settings: SettingsDep) -> Iterator[Session]:
    """A database session for the request, closed after it. Writes are committed by the
    service functions that make them (jobs, webhooks, hooks, alerts), never by a route."""
    session = get_sessionmaker(settings.db_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(session_dep)]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def current_caller(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> auth.Caller:
    """The owner of the request's bearer token; 401 when it is missing, malformed or revoked."""
    if not authorization:
        raise Problem(401, "Unauthorized", "missing API token: send 'Authorization: Bearer <token>' "
                      "(create one with 'layertrack token create')", _CHALLENGE)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "Unauthorized", "the Authorization header must be 'Bearer <token>'", _CHALLENGE)
    caller = auth.verify(session, token.strip())
    if caller is None:
        raise Problem(401, "Unauthorized", "unknown or revoked API token", _CHALLENGE)
    return caller


CurrentCaller = Annotated[auth.Caller, Depends(current_caller)]
