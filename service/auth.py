"""API tokens: random secrets shown once, stored as sha256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiToken, utcnow

PREFIX = "lt_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str) -> tuple[ApiToken, str]:
    """A new token; the secret is returned once and never stored."""
    secret = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, prefix=secret[:10], token_hash=hash_token(secret))
    session.add(row)
    session.flush()
    return row, secret


@dataclass(frozen=True)
class Caller:
    """Who made a request: the API token it carried."""

    token_id: int
    name: str


#: a token seen valid is trusted for this many seconds without asking the database again,
#: so a revocation takes effect within this time (in every API process)
CACHE_SECONDS = 5.0
_valid: dict[str, tuple[float, Caller]] = {}  # token hash -> (monotonic time last checked, caller)


def verify(session: Session, token: str) -> Caller | None:
    """The caller a token belongs to, or None when it is unknown or revoked. A check that
    reaches the database also records the token's ``last_used_at`` (committed)."""
    digest = hash_token(token)
    cached = _valid.get(digest)
    if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
        return cached[1]
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked_at is not None:
        _valid.pop(digest, None)
        return None
    caller = Caller(token_id=row.id, name=row.name)
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
