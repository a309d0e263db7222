"""API tokens: random secrets shown once, stored as sha256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import time

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


#: a token seen valid is trusted for this many seconds without asking the database again,
#: so a revocation takes effect within this time (in every API process)
CACHE_SECONDS = 5.0
_valid: dict[str, float] = {}  # token hash -> monotonic time it was last checked


def verify(session: Session, token: str) -> bool:
    digest = hash_token(token)
    checked = _valid.get(digest)
    if checked is not None and time.monotonic() - checked < CACHE_SECONDS:
        return True
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked_at is not None:
        _valid.pop(digest, None)
        return False
    if len(_valid) > 10_000:
        _valid.clear()
    _valid[digest] = time.monotonic()
    return True


def revoke(session: Session, token_id: int) -> ApiToken | None:
    row = session.get(ApiToken, token_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row
