"""API tokens: random secrets shown once, stored as sha256 hashes, each with what it may do.

Scopes (``api_tokens.scopes``, comma separated; tokens made before scopes existed have all three):

- ``read``: the dashboard and every query (runs, jobs, scores, trends, heatmaps, profiles,
  exports, plots, compare, alert rules and firings, /metrics);
- ``submit``: post checkpoints; read, cancel and retry the jobs this token submitted (its
  *own* jobs, ``jobs.token_id``);
- ``admin``: webhooks, hook sources, alert rules, deleting runs; with ``submit``, cancel and
  retry any job.

Run patterns (``api_tokens.run_patterns``, fnmatch-style, comma separated; ``None``: every
run) limit a token to the runs whose names match one of them (``team-a/*``; ``*`` also
matches ``/``): it cannot submit to, read or list another run, and lists (runs, jobs) leave
other runs out. An ``admin`` token manages service-wide things (webhooks of every run, hook
sources that may submit to any run) and so cannot be limited to runs.

The checks themselves are the HTTP layer's (``api/deps.py``); lists are filtered here, by
:func:`restrict_reads`, which makes the request's session leave other runs' rows (and, for a
token without ``read``, other tokens' jobs) out of every SELECT.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from sqlalchemy import event, select
from sqlalchemy.orm import Session, with_loader_criteria

from .models import ApiToken, Job, Run, utcnow

PREFIX = "lt_"
READ, SUBMIT, ADMIN = "read", "submit", "admin"
#: every scope, in the order they are shown
SCOPES = (READ, SUBMIT, ADMIN)
#: what each scope allows (the help of ``layertrack token create --scope``)
SCOPE_HELP = {
    READ: "dashboards and queries: runs, jobs, scores, plots, exports, compare, alert firings, /metrics",
    SUBMIT: "post checkpoints; read, cancel and retry the jobs this token submitted",
    ADMIN: "webhooks, hook sources, alert rules and deleting runs; with submit, cancel and retry any job",
}
#: room in api_tokens.run_patterns
MAX_PATTERNS_CHARS = 500


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(given: Iterable[str] | None) -> tuple[str, ...]:
    """Scopes from ``--scope`` values (each may be comma separated), in canonical order;
    every scope when none is given. ValueError names an unknown one."""
    names = {s.strip().lower() for g in (given or ()) for s in g.split(",") if s.strip()}
    unknown = sorted(names - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {', '.join(map(repr, unknown))}; the scopes are {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in names) if names else SCOPES


def parse_patterns(given: Iterable[str] | None) -> tuple[str, ...]:
    """Run-name patterns from ``--runs`` values (each may be comma separated); () for none.
    ValueError when a pattern is empty of meaning or they do not fit the column."""
    patterns: list[str] = []
    for g in given or ():
        for p in g.split(","):
            p = p.strip()
            if not p:
                continue
            if "\x00" in p or any(c.isspace() for c in p):
                raise ValueError(f"run pattern {p!r} contains a blank or a NUL character")
            if p not in patterns:
                patterns.append(p)
    if len(",".join(patterns)) > MAX_PATTERNS_CHARS:
        raise ValueError(f"run patterns take at most {MAX_PATTERNS_CHARS} characters, comma separated")
    return tuple(patterns)


def create_token(session: Session, name: str, *, scopes: Sequence[str] = SCOPES,
                 run_patterns: Sequence[str] = ()) -> tuple[ApiToken, str]:
    """A new token (flushed, not committed); the secret is returned once and never stored.
    Every scope and every run unless told otherwise. ValueError for an unknown scope or an
    admin token limited to runs."""
    scopes = parse_scopes(scopes)
    patterns = parse_patterns(run_patterns)
    if ADMIN in scopes and patterns:
        raise ValueError("an admin token cannot be limited to runs (webhooks and hook sources reach every run); "
                         "give --runs to read or submit tokens only")
    secret = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, prefix=secret[:10], token_hash=hash_token(secret), scopes=",".join(scopes),
                   run_patterns=",".join(patterns) or None)
    session.add(row)
    session.flush()
    return row, secret


@dataclass(frozen=True)
class Caller:
    """Who made a request: the API token it carried, its scopes and run patterns."""

    token_id: int
    name: str
    scopes: frozenset[str] = field(default_factory=lambda: frozenset(SCOPES))
    #: () : every run
    run_patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, row: ApiToken) -> Caller:
        scopes = frozenset(s.strip() for s in (row.scopes or "").split(",") if s.strip())
        patterns = tuple(p for p in (row.run_patterns or "").split(",") if p)
        return cls(token_id=row.id, name=row.name, scopes=scopes, run_patterns=patterns)

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def limited(self) -> bool:
        """Limited to the runs matching its patterns."""
        return bool(self.run_patterns)

    def may_see(self, run: str) -> bool:
        """Whether the run named ``run`` is within the token's runs."""
        return not self.run_patterns or any(fnmatchcase(run, p) for p in self.run_patterns)

    def may_touch(self, job: Job) -> bool:
        """Whether the token may cancel or retry the job: submit, and its own job unless admin."""
        return self.has(SUBMIT) and (self.has(ADMIN) or job.token_id == self.token_id)

    def describe(self) -> str:
        """'token NAME (scopes read, submit; runs team-a/*)' for messages."""
        runs = f"; runs {', '.join(self.run_patterns)}" if self.run_patterns else ""
        return f"token {self.name!r} (scopes {', '.join(s for s in SCOPES if s in self.scopes) or 'none'}{runs})"


#: a token seen valid is trusted for this many seconds without asking the database again,
#: so a revocation takes effect within this time (in every API process)
CACHE_SECONDS = 5.0
_valid: dict[str, tuple[float, Caller]] = {}  # token hash -> (monotonic time last checked, caller)


def cached(token: str) -> Caller | None:
    """The caller of a token verified less than CACHE_SECONDS ago (no database involved);
    None when it must be looked up."""
    hit = _valid.get(hash_token(token))
    return hit[1] if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS else None


def verify(session: Session, token: str) -> Caller | None:
    """The caller a token belongs to, or None when it is unknown or revoked. A check that
    reaches the database also records the token's ``last_used_at`` (committed)."""
    caller = cached(token)
    if caller is not None:
        return caller
    digest = hash_token(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked_at is not None:
        _valid.pop(digest, None)
        return None
    caller = Caller.of(row)
    row.last_used_at = utcnow()
    session.commit()
    if len(_valid) > 10_000:
        _valid.clear()
    _valid[digest] = (time.monotonic(), caller)
    return caller


def revoke(session: Session, token_id: int) -> ApiToken | None:
    row = session.get(ApiToken, token_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


# ------------------------------------------------------------------ the request's session
#: session.info keys: the caller (jobs created in the session record its token), and the
#: restriction of reads (:func:`restrict_reads`)
CALLER_KEY = "layertrack.caller"
READS_KEY = "layertrack.reads"
_UNFILTERED = "layertrack_unfiltered"


def bind(session: Session, caller: Caller) -> None:
    """Mark the session as the caller's: a job it creates records the caller's token."""
    session.info[CALLER_KEY] = caller


def restrict_reads(session: Session, caller: Caller, *, own_jobs_only: bool) -> None:
    """From now on, every SELECT of the session leaves out runs outside the caller's patterns
    and their jobs, and (``own_jobs_only``) jobs another token submitted. Only request
    sessions that read are restricted; a submission's session is not (it must find an
    identical checkpoint submitted by anyone, to answer with its job)."""
    if caller.limited or own_jobs_only:
        session.info[READS_KEY] = (caller, own_jobs_only)


def visible_run_ids(session: Session, caller: Caller) -> list[int]:
    """Ids of the runs within the caller's patterns."""
    rows = session.execute(select(Run.id, Run.name).execution_options(**{_UNFILTERED: True})).all()
    return [run_id for run_id, name in rows if caller.may_see(name)]


@event.listens_for(Session, "do_orm_execute")
def _only_what_the_caller_may_read(state) -> None:
    restriction = state.session.info.get(READS_KEY)
    if (restriction is None or not state.is_select or state.is_column_load
            or state.execution_options.get(_UNFILTERED)):
        return
    caller, own_jobs_only = restriction
    options = []
    if caller.limited:
        ids = state.session.info.get("layertrack.visible_runs")
        if ids is None:
            ids = state.session.info["layertrack.visible_runs"] = visible_run_ids(state.session, caller)
        options += [with_loader_criteria(Run, Run.id.in_(ids), include_aliases=True),
                    with_loader_criteria(Job, Job.run_id.in_(ids), include_aliases=True)]
    if own_jobs_only:
        options.append(with_loader_criteria(Job, Job.token_id == caller.token_id, include_aliases=True))
    state.statement = state.statement.options(*options)


@event.listens_for(Session, "before_flush")
def _record_the_submitter(session: Session, _flush_context, _instances) -> None:
    caller = session.info.get(CALLER_KEY)
    if caller is None:
        return
    for obj in session.new:
        if isinstance(obj, Job) and obj.token_id is None:
            obj.token_id = caller.token_id
