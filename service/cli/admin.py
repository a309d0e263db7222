"""Commands that work on the database directly (no API): API tokens and migrations. They
use the service's settings (LAYERTRACK_DATABASE_URL, else SQLite under LAYERTRACK_DATA_DIR)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from .common import EXIT_USAGE, CliError, one_line


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
    from ..auth import SCOPES, create_token

    with _session() as s:
        try:
            row, secret = create_token(s, args.name, scopes=args.scope or SCOPES, run_patterns=args.runs or ())
        except ValueError as e:
            raise CliError(str(e), EXIT_USAGE) from None
        print(f"token {row.id} ({row.name}): {secret}")
        rights = f"scopes {row.scopes.replace(',', ', ')}; runs {row.run_patterns or 'every run'}"
    print(f"{rights}. Keep the token: it is not shown again", file=sys.stderr)
    return 0


def cmd_token_list(_args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from ..models import ApiToken

    with _session() as s:
        rows = list(s.scalars(select(ApiToken).order_by(ApiToken.id)))
        if rows:
            print(f"{'id':>4}  {'name':<24} {'prefix':<13} {'scopes':<18} {'runs':<20} {'created':<16}  state")
        for t in rows:
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            runs = t.run_patterns or "*"
            print(f"{t.id:>4}  {t.name:<24} {t.prefix}...  {t.scopes:<18} {runs:<20} {t.created_at:%Y-%m-%d %H:%M}  "
                  f"{state}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from ..auth import revoke

    with _session() as s:
        row = revoke(s, args.id)
    if row is None:
        raise CliError(f"no token with id {args.id}; 'layertrack token list' shows them")
    print(f"token {args.id} revoked")
    return 0


def cmd_rotate_secrets(args: argparse.Namespace) -> int:
    """Re-encrypt every stored webhook and hook-source secret with the newest key (and
    encrypt any stored in clear); ``--new-key`` first makes a new key the newest."""
    from .. import crypto
    from ..settings import get_settings

    if args.print_key:
        print(crypto.generate_key())
        return 0
    settings = get_settings()
    try:
        if args.new_key:
            if settings.secret_keys:
                raise CliError(f"{crypto.ENV} is set: put a new key first in it (print one with "
                               "'layertrack rotate-secrets --print-key'), keep the old ones after it, restart the "
                               "API and workers, then run 'layertrack rotate-secrets'", EXIT_USAGE)
            path = crypto.key_file(settings)
            old = path.read_text() if path.exists() else ""
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".new")
            tmp.write_text(crypto.generate_key() + "\n" + old)
            tmp.chmod(0o600)
            tmp.replace(path)
            print(f"new key added first in {path} (the older ones stay after it, to decrypt)")
        with _session() as s:
            counts = crypto.reseal_all(s, settings, rotate=True)
    except crypto.SecretKeyError as e:
        raise CliError(str(e)) from None
    print(f"{counts['rotated']} secret(s) re-encrypted with the newest key, {counts['encrypted']} encrypted "
          "that were stored in clear; the older keys are no longer needed")
    return 0
