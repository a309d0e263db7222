"""Database engine and sessions, and running the migrations."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _migrations_dir() -> Path:
    import layertrack.migrations

    return Path(layertrack.migrations.__file__).resolve().parent


#: one engine (and its connection pool) per database URL, for the life of the process; an
#: engine is only dropped by dispose_engine, so no pool is ever garbage-collected with its
#: connections still open
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _engine_locked(url: str) -> Engine:
    if url not in _engines:
        _engines[url] = _create_engine(url)
    return _engines[url]


def get_engine(url: str) -> Engine:
    with _lock:
        return _engine_locked(url)


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    with _lock:
        if url not in _sessionmakers:
            _sessionmakers[url] = sessionmaker(_engine_locked(url), expire_on_commit=False)
        return _sessionmakers[url]


def dispose_engine(url: str) -> None:
    """Close the pooled connections to ``url`` and forget its engine (before dropping the
    database, say)."""
    with _lock:
        engine = _engines.pop(url, None)
        _sessionmakers.pop(url, None)
    if engine is not None:
        engine.dispose()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (alembic upgrade)."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
