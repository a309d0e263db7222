"""Commands that work on the database directly (no API): API tokens and migrations. They
use the service's settings (LAYERTRACK_DATABASE_URL, else SQLite under LAYERTRACK_DATA_DIR)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from .common import CliError, one_line


def safe_url(url: str) -> str:
    """A database URL with its password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an invalid URL)"


@contextlib.contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn the database's failures into one line that says what to do."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, ProgrammingError

    shown = safe_url(url)
    try:
        yield
    except (ArgumentError, NoSuchModuleError) as e:
        raise CliError(f"LAYERTRACK_DATABASE_URL is not a usable database URL ({one_line(e)}); give "
                       "e.g. postgresql+psycopg://user@host/db, or leave it unset for SQLite") from None
    except (OperationalError, ProgrammingError) as e:
        reason = one_line(getattr(e, "orig", None) or e)
        if "no such table" in reason or ("relation" in reason and "does not exist" in reason):
            raise CliError(f"the database at {shown} has no layertrack tables: run 'layertrack migrate'") from None
        raise CliError(f"cannot use the database at {shown} ({reason}); check that it runs and "
                       "LAYERTRACK_DATABASE_URL") from None


def _db_url() -> str:
    from ..settings import get_settings

    return get_settings().db_url


@contextlib.contextmanager
def _session():
    from ..db import session_scope

    url = _db_url()
    with database_errors(url), session_scope(url) as s:
        yield s


def cmd_migrate(_args: argparse.Namespace) -> int:
    from ..db import upgrade

    url = _db_url()
    with database_errors(url):
        upgrade(url)
    print(f"database at {safe_url(url)} is up to date")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from ..auth import create_token

    with _session() as s:
        row, secret = create_token(s, args.name)
        print(f"token {row.id} ({row.name}): {secret}")
    print("keep it: it is not shown again", file=sys.stderr)
    return 0


def cmd_token_list(_args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from ..models import ApiToken

    with _session() as s:
        for t in s.scalars(select(ApiToken).order_by(ApiToken.id)):
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            print(f"{t.id:>4}  {t.name:<24} {t.prefix}...  created {t.created_at:%Y-%m-%d %H:%M}  {state}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from ..auth import revoke

    with _session() as s:
        row = revoke(s, args.id)
    if row is None:
        raise CliError(f"no token with id {args.id}; 'layertrack token list' shows them")
    print(f"token {args.id} revoked")
    return 0
