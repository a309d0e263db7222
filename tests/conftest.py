from __future__ import annotations

import pytest
from tiny_models import build_checkpoint, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """Build (once per session) a tiny checkpoint per family; returns family -> path."""
    made: dict[str, object] = {}
    root = tmp_path_factory.mktemp("ckpt")

    def get(family: str):
        if family not in made:
            made[family] = build_checkpoint(root / family, family, tokenizer)
        return made[family]

    return get


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for the session (dropped at the end)."""
    from services import create_pg_database, drop_pg_database

    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session")
def redis_url():
    """A Redis database index of the session's own (flushed at the end)."""
    from services import redis_db_url, release_redis_db

    url = redis_db_url()
    yield url
    release_redis_db(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_service(request, tmp_path_factory):
    """The API server (no worker) on SQLite + filesystem broker, or PostgreSQL + Redis."""
    from services import Service, create_pg_database, drop_pg_database, redis_db_url, release_redis_db

    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    roots = tmp / "ckpts"
    roots.mkdir()
    if request.param == "sqlite":
        db, broker = f"sqlite:///{tmp / 'lt.db'}", "filesystem://"
    else:
        db, broker = create_pg_database(), redis_db_url()
    svc = Service(tmp=tmp, db_url=db, broker_url=broker, roots=roots)
    svc.extra_env["LAYERTRACK_SWEEP_INTERVAL_S"] = "0"  # no worker: keep jobs where they are
    svc.migrate_and_token()
    svc.start_api()
    svc.backend = request.param
    yield svc
    svc.stop()
    if request.param == "postgresql":
        drop_pg_database(db)
        release_redis_db(broker)
