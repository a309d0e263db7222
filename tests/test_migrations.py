"""Migrations create exactly what the models describe, on PostgreSQL and SQLite, and go back down."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from layertrack.service.db import downgrade, upgrade
from layertrack.service.models import Base
from sqlalchemy import create_engine, inspect


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    from services import create_pg_database, drop_pg_database

    url = create_pg_database()
    yield url
    drop_pg_database(url)


def test_upgrade_from_empty_matches_the_models_and_downgrade_works(empty_db):
    upgrade(empty_db)
    engine = create_engine(empty_db)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations disagree: {diff}"
            tables = set(inspect(conn).get_table_names())
        assert {"runs", "checkpoints", "probes", "jobs", "scores", "api_tokens"} <= tables
        downgrade(empty_db, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        upgrade(empty_db)  # and up again
        with engine.connect() as conn:
            assert "scores" in inspect(conn).get_table_names()
    finally:
        engine.dispose()  # also when an assertion fails: no connection left open
