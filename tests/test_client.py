"""The Python client: in-process against the real app (SQLite), clear errors with the server's
message on 4xx, retries with back-off on 503 and on connection errors."""

from __future__ import annotations

import httpx
import pytest
from layertrack.service.api import create_app
from layertrack.service.auth import create_token
from layertrack.service.client import ApiError, AppTransport, Client, ServiceUnavailable
from layertrack.service.db import session_scope, upgrade
from layertrack.service.settings import Settings
from services import free_port


class Counting(httpx.BaseTransport):
    """Wraps a real transport and counts the requests that went through it."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner, self.calls = inner, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture()
def app_and_token(tmp_path, checkpoints):
    db = f"sqlite:///{tmp_path / 'lt.db'}"
    upgrade(db)
    with session_scope(db) as s:
        _row, token = create_token(s, "client-tests")
    roots = tmp_path / "roots"
    roots.mkdir()
    settings = Settings(data_dir=tmp_path / "data", database_url=db, checkpoint_roots=str(roots),
                        sweep_interval_s=0)
    return create_app(settings), token


def test_in_process_client_reads_and_gets_the_servers_message_on_4xx(app_and_token, checkpoints):
    app, token = app_and_token
    with Client.for_app(app, token) as c:
        assert c.runs() == [] and c.jobs() == []
        with pytest.raises(ApiError) as e:
            c.run("nope")
        assert e.value.status == 404 and e.value.detail == "no run named 'nope'"
        with pytest.raises(ApiError) as e:
            c.submit(run="r", step=1, uri=str(checkpoints("llama")))  # outside this app's roots
        assert e.value.status == 422 and "outside the allowed checkpoint roots" in e.value.detail
        with pytest.raises(ApiError) as e:
            c.create_alert("r", metric="linearity", kind="sigma", k=2)
        assert e.value.status == 404
        with pytest.raises(ApiError) as e:
            c.trend("r", metric="linearity")
        assert e.value.status == 404 and e.value.detail == "no run named 'r'"
        with pytest.raises(ApiError) as e:
            c.trend("r", metric="bogus")  # an invalid request is refused before anything is looked up
        assert e.value.status == 422 and "metric" in e.value.detail
    with Client.for_app(app, "lt_wrong") as c, pytest.raises(ApiError) as e:
        c.runs()
    assert e.value.status == 401 and "unknown or revoked API token" in e.value.detail
    assert not isinstance(e.value, ServiceUnavailable)


def test_503_is_retried_with_back_off_then_raised_with_the_servers_message(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
                        sweep_interval_s=0, retry_after_s=0)
    app = create_app(settings)
    counting = Counting(AppTransport(app))
    with Client("http://testserver", "lt_anything", transport=counting, retries=2) as c, \
            pytest.raises(ServiceUnavailable) as e:
        c.runs()
    assert e.value.status == 503 and "database cannot be reached" in e.value.detail
    assert counting.calls == 3  # the first try and two retries


def test_connection_refused_is_retried_then_raised_clearly():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "lt_x", retries=1) as c, pytest.raises(ServiceUnavailable) as e:
        c.runs()
    assert e.value.status == 0 and f"cannot reach layertrack at {url}" in e.value.detail
