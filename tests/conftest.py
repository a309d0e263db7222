from __future__ import annotations

import pytest
from leftover_processes import pytest_configure, pytest_sessionfinish, pytest_testnodedown  # noqa: F401 (hooks: the run fails on a leftover process)
from tiny_models import build_checkpoint, train_tokenizer

pytest_plugins = ["pytester"]  # tests/test_leftover_processes.py runs sessions of its own


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
def redis_server():
    """A private redis-server for the session (stopped at the end). Fixtures that need an
    empty Redis take ``redis_server.new_url()``: a database index nothing else uses."""
    from services import RedisServer

    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture()
def redis_url(redis_server):
    """An empty Redis database of this test's own, on the session's private server."""
    return redis_server.new_url()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_service(request, tmp_path_factory):
    """The API server (no worker) on SQLite + filesystem broker, or PostgreSQL + Redis."""
    from services import api_only, create_pg_database, drop_pg_database

    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    if request.param == "sqlite":
        with api_only(tmp) as svc:
            svc.backend = request.param
            yield svc
        return
    db = create_pg_database()
    with api_only(tmp, db_url=db, broker_url=request.getfixturevalue("redis_server").new_url()) as svc:
        svc.backend = request.param
        yield svc
    drop_pg_database(db)


# the servers and checkpoints of the store and fetch tests (tests/stores_fixtures.py)
from framework_fixtures import fsdp2, litgpt_ckpt, titan, titan_qwen3, titan_v02  # noqa: E402, F401
from stores_fixtures import hub, s3_env, s3_server, tiny_sharded, tiny_single  # noqa: E402, F401
