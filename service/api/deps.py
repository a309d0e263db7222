"""Request dependencies, composed with ``Annotated``: the settings, a database session, the
caller (the bearer token's owner) and what the caller may do. A handler declares what it needs:

    def read_job(job_id: str, session: SessionDep) -> JobOut: ...

and each router (or, where a router mixes scopes, each route) declares the scope it needs
(``auth.py`` says what each scope allows):

    router = APIRouter(prefix="/v1/webhooks", dependencies=[Depends(admin_scope)])

``read_scope``, ``submit_scope``, ``admin_scope``: the token must have that scope, and every run
the request names (the ``{run}`` path parameter, the ``run`` query parameter, the
comma-separated ``runs`` of /v1/compare, ``run`` and ``parent_run`` in a JSON body) must be
within the token's run patterns; a read also leaves other runs out of the lists it answers.
``read_every_run``: ``read`` by a token not limited to runs (/metrics counts every run).
``job_read`` (a job or the job list: ``read``, or ``submit`` for the token's own jobs) and
``job_change`` (cancel, retry: ``submit``, the token's own job unless it is also ``admin``)
are the jobs' rules. ``current_caller``: any valid token (/v1/meta). Refusals are 403 problems naming
the missing scope, or the token's run patterns. The inbound hooks (/v1/hooks/checkpoint,
/v1/hooks/object-store) take no API token and none of these: their routes check a hook
source's credential (service/hooks.py), and middleware.SIGNED lets them through. FastAPI
gives the handler and these checks the same session within one request.

The session carries the app's settings (``session.info["settings"]``) for the service
functions that need them without a parameter of their own (the keys of the secrets at rest,
``crypto.py``). ``secrets_at_rest`` checks those keys when the API starts (create_app's
lifespan enters it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Header, Request
from sqlalchemy.orm import Session

from .. import auth, crypto
from ..auth import ADMIN, READ, SUBMIT
from ..db import get_sessionmaker
from ..models import Job
from ..settings import Settings
from .middleware import CHALLENGE, MALFORMED, MISSING, UNKNOWN
from .problems import Problem

log = logging.getLogger("layertrack.api")


async def settings_dep(request: Request) -> Settings:  # async: no thread hop
    """The app's settings (create_app's argument). Not a dependency override: FastAPI
    re-analyses overrides on every request, which cost ~3 ms per call."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_dep)]


async def session_dep(request: Request) -> AsyncIterator[Session]:
    """A database session for the request, closed after it. Writes are committed by the
    service functions that make them (jobs, webhooks, hooks, alerts), never by a route. It
    carries the app's settings (``session.info["settings"]``), read here rather than through
    ``settings_dep``: every dependency FastAPI resolves costs time on each request.

    Async, so that it costs no thread hop: making a session does no I/O (it connects when
    first used), and neither does closing one that holds no transaction (a committed
    submission); one that does (a read) is closed in a thread, since its rollback is a round
    trip, shielded from cancellation so that its connection always goes back to the pool."""
    settings: Settings = request.app.state.settings
    session = get_sessionmaker(settings.db_url)()
    session.info["settings"] = settings
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):
                # a limiter of its own: closing never waits for a worker thread to be free
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


SessionDep = Annotated[Session, Depends(session_dep)]

async def _caller(session: Session, authorization: str | None) -> auth.Caller:
    """The caller of the request's Authorization header, bound to the request's session
    (``auth.bind``), which keeps it for the other checks of the same request; 401 when the
    token is missing, malformed or revoked (the messages RequireBearer gives when it answers
    first). A token verified in the last ``auth.CACHE_SECONDS`` is answered on the event loop;
    any other is looked up in a thread."""
    known = session.info.get(auth.CALLER_KEY)
    if known is not None:  # checked already in this request (the session is the request's)
        return known
    if not authorization:
        raise Problem(401, "Unauthorized", MISSING, CHALLENGE)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "Unauthorized", MALFORMED, CHALLENGE)
    caller = auth.cached(token)
    if caller is None:
        caller = await asyncio.to_thread(auth.verify, session, token)  # database I/O off the event loop
    if caller is None:
        raise Problem(401, "Unauthorized", UNKNOWN, CHALLENGE)
    auth.bind(session, caller)
    return caller


async def current_caller(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> auth.Caller:
    """The owner of the request's bearer token (any valid token); 401 when it is missing,
    malformed or revoked."""
    return await _caller(session, authorization)


async def request_caller(request: Request, session: Session) -> auth.Caller:
    """``current_caller`` for the scope checks below, which take the header from the request
    themselves rather than through one more dependency."""
    return await _caller(session, request.headers.get("authorization"))


CurrentCaller = Annotated[auth.Caller, Depends(current_caller)]


# ------------------------------------------------------------------ what the caller may do
def forbidden(detail: str, code: str) -> Problem:
    return Problem(403, "Forbidden", detail, code=code)


def missing_scope(caller: auth.Caller, scope: str, what: str) -> Problem:
    return forbidden(f"{caller.describe()} lacks the '{scope}' scope, which {what} needs "
                     f"('{scope}': {auth.SCOPE_HELP[scope]}); use a token created with "
                     f"'layertrack token create NAME --scope {scope}'", "missing_scope")


def outside_runs(caller: auth.Caller, what: str) -> Problem:
    return forbidden(f"{caller.describe()} is limited to the runs matching {', '.join(caller.run_patterns)}; "
                     f"{what} is not one of them", "outside_runs")


def check_run(caller: auth.Caller, run: str) -> None:
    """403 naming the caller's run patterns when ``run`` is outside them."""
    if not caller.may_see(run):
        raise outside_runs(caller, f"run {run!r}")


async def runs_named(request: Request) -> list[str]:
    """The run names a request names: the ``{run}`` path parameter, the ``run`` query
    parameter, the comma-separated ``runs`` query parameter, and ``run`` / ``parent_run`` of a
    JSON object body. The body is parsed once: ``request.json()`` keeps what FastAPI parsed for
    the route's body parameter (the same Request object), or what it parses here."""
    names = [request.path_params["run"]] if isinstance(request.path_params.get("run"), str) else []
    names += request.query_params.getlist("run")
    names += [n.strip() for v in request.query_params.getlist("runs") for n in v.split(",") if n.strip()]
    if request.method in ("POST", "PUT", "PATCH") and "json" in request.headers.get("content-type", ""):
        try:
            body = await request.json()
        except ValueError:  # not JSON: validation says so
            body = None
        if isinstance(body, dict):
            names += [body[k] for k in ("run", "parent_run") if isinstance(body.get(k), str)]
    return names


def _what(request: Request) -> str:
    return f"{request.method} {request.scope.get('route').path if request.scope.get('route') else request.url.path}"


def require(scope: str, *, every_run: bool = False):
    """A dependency: the caller has ``scope``, and every run the request names is within its
    patterns (``every_run``: the route reaches every run, so a token limited to runs is
    refused). A ``read`` leaves other runs out of what the session reads."""

    async def dependency(request: Request, session: SessionDep) -> auth.Caller:
        caller = await request_caller(request, session)
        if not caller.has(scope):
            raise missing_scope(caller, scope, _what(request))
        if every_run and caller.limited:
            raise forbidden(f"{caller.describe()} is limited to the runs matching {', '.join(caller.run_patterns)}, "
                            f"and {_what(request)} covers every run: use a token not limited to runs",
                            "limited_token")
        for name in await runs_named(request):
            check_run(caller, name)
        if scope == READ:
            auth.restrict_reads(session, caller, own_jobs_only=False)
        return caller

    dependency.__name__ = f"require_{scope}{'_every_run' if every_run else ''}"
    return dependency


def _path_job(request: Request, session: Session) -> Job | None:
    job_id = request.path_params.get("job_id")
    if not isinstance(job_id, str) or len(job_id) > 36 or "\x00" in job_id:  # the route refuses it: 422
        return None
    return session.get(Job, job_id)  # None: the route answers 404


def _check_job_run(caller: auth.Caller, job: Job) -> None:
    if not caller.may_see(job.run.name):
        raise outside_runs(caller, f"the run of job {job.id}")


async def job_read(request: Request, session: SessionDep) -> auth.Caller:
    """Reading a job or the job list: ``read`` (every job of the token's runs), or ``submit``
    (the jobs this token submitted)."""
    caller = await request_caller(request, session)
    if not (caller.has(READ) or caller.has(SUBMIT)):
        raise missing_scope(caller, READ, _what(request))
    for name in await runs_named(request):
        check_run(caller, name)
    own_only = not caller.has(READ)
    job = await asyncio.to_thread(_path_job, request, session)  # database I/O off the event loop
    if job is not None:
        await asyncio.to_thread(_check_job_run, caller, job)  # loads job.run
        if own_only and job.token_id != caller.token_id:
            raise missing_scope(caller, READ, f"reading job {job.id}, which another token submitted,")
    auth.restrict_reads(session, caller, own_jobs_only=own_only)
    return caller


async def job_change(request: Request, session: SessionDep) -> auth.Caller:
    """Cancelling or retrying a job: ``submit``, and the job is the token's own unless the
    token is also ``admin``."""
    caller = await request_caller(request, session)
    if not caller.has(SUBMIT):
        raise missing_scope(caller, SUBMIT, _what(request))
    job = await asyncio.to_thread(_path_job, request, session)
    if job is not None:
        await asyncio.to_thread(_check_job_run, caller, job)
        if not caller.may_touch(job):
            raise missing_scope(caller, ADMIN, f"{_what(request)} on job {job.id}, which another token submitted,")
    return caller


read_scope = require(READ)
#: reads that count every run (/metrics): not for a token limited to runs
read_every_run = require(READ, every_run=True)
submit_scope = require(SUBMIT)
admin_scope = require(ADMIN)


# ------------------------------------------------------------------ at start
@asynccontextmanager
async def secrets_at_rest(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan: refuse to start when webhook or hook-source secrets are stored encrypted and
    no configured key opens them; encrypt the ones stored in clear (crypto.startup_check)."""
    settings: Settings = app.state.settings
    try:
        await asyncio.to_thread(crypto.startup_check, settings, encrypt_plaintext=True)
    except crypto.SecretKeyError as e:
        log.critical("layertrack API: %s", e)
        raise
    yield
