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


# ------------------------------------------------------------------ the client's types are the API's
def _pairs():
    from layertrack.service import client, schemas

    return [
        (client.Job, schemas.JobOut), (client.RunInfo, schemas.RunOut), (client.RunDeletion, schemas.RunDeletionOut),
        (client.Series, schemas.SeriesOut), (client.Scores, schemas.ScoresOut), (client.Trend, schemas.TrendOut),
        (client.Heatmap, schemas.HeatmapOut), (client.Profile, schemas.ProfileOut),
        (client.CompareRun, schemas.CompareRunOut), (client.Compare, schemas.CompareOut),
        (client.Webhook, schemas.WebhookOut), (client.Attempt, schemas.AttemptOut),
        (client.Delivery, schemas.DeliveryOut), (client.HookSource, schemas.HookSourceOut),
        (client.AlertRule, schemas.AlertRuleOut), (client.AlertFiring, schemas.AlertFiringOut),
    ]


def _as_client_type(annotation, typed_of: dict):
    """The type the client's TypedDict should give a response model's field: the same, with a
    time as its ISO 8601 string and a nested model as its TypedDict."""
    import datetime
    import functools
    import operator
    import types
    import typing

    if annotation is datetime.datetime:
        return str
    if annotation in typed_of:
        return typed_of[annotation]
    args = typing.get_args(annotation)
    if not args:
        return annotation
    mapped = tuple(_as_client_type(a, typed_of) for a in args)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return functools.reduce(operator.or_, mapped)
    return typing.get_origin(annotation)[mapped]


def test_every_typeddict_of_the_client_is_a_response_model_field_for_field():
    import typing

    from layertrack.service import client

    pairs = _pairs()
    typed_of = {model: typed for typed, model in pairs}
    declared = {name for name, v in vars(client).items() if typing.is_typeddict(v)}
    assert declared == {typed.__name__ for typed, _ in pairs}, "a TypedDict of the client has no response model here"
    for typed, model in pairs:
        hints = typing.get_type_hints(typed)
        assert list(hints) == list(model.model_fields), typed.__name__  # the same keys, in the JSON's order
        assert typed.__required_keys__ == set(hints), typed.__name__  # every key is in every answer
        for name, field in model.model_fields.items():
            assert hints[name] == _as_client_type(field.annotation, typed_of), f"{typed.__name__}.{name}"


def _check(value, typed) -> None:
    """``value`` has exactly ``typed``'s keys, and so do the TypedDicts nested in it."""
    import typing

    assert isinstance(value, dict) and set(value) == set(typing.get_type_hints(typed)), (typed.__name__, value)
    for name, hint in typing.get_type_hints(typed).items():
        inner = [a for a in typing.get_args(hint) if typing.is_typeddict(a)]
        if inner and value[name] is not None:
            for item in value[name]:
                _check(item, inner[0])


def _returns(method) -> tuple[object, bool]:
    """The TypedDict a client method's annotation names, and whether it returns a list of them."""
    import typing

    hint = typing.get_type_hints(method).get("return")
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def test_the_client_returns_exactly_the_declared_keys_from_the_real_app(tmp_path, checkpoints):
    import inspect
    import shutil
    import typing

    from layertrack.service.models import Delivery
    from layertrack.workers.vocabulary import DEFAULT_METRIC, DeliveryStatus
    from services import synthetic_run

    db = f"sqlite:///{tmp_path / 'lt.db'}"
    upgrade(db)
    with session_scope(db) as s:
        _row, token = create_token(s, "client-types")
    roots = tmp_path / "roots"
    ckpt = shutil.copytree(checkpoints("llama"), roots / "run-c" / "step-5")
    settings = Settings(data_dir=tmp_path / "data", database_url=db, checkpoint_roots=str(roots), sweep_interval_s=0)
    run = "org/typed"
    seen: dict[str, object] = {}

    with Client.for_app(create_app(settings), token) as c:
        def call(name: str, *args, **kw):
            value = getattr(c, name)(*args, **kw)
            typed, many = _returns(getattr(Client, name))
            got = value[0] if isinstance(value, tuple) else value
            assert typing.is_typeddict(typed), name
            for item in (got if many else [got]):
                _check(item, typed)
            if many:
                assert got, f"{name} returned no items to check"
            seen[name] = got
            return got

        jobs = synthetic_run(db, run, (10,), fingerprint="typed-", anisotropy=0.3,
                             pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.2, "cosine": 0.8,
                                                "norm_ratio": 1.1})
        rule = call("create_alert", run, metric="linearity_nores", kind="threshold", above=0.5)
        hook = call("create_webhook", "http://8.8.8.8/typed", run=run)  # step 20's events are delivered to it
        synthetic_run(db, run, (20,), fingerprint="typed-", anisotropy=0.3,
                      pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.8, "cosine": 0.8, "norm_ratio": 1.1})
        call("job", jobs[0])
        call("wait", jobs[0], timeout=5)  # succeeded: the first poll returns it
        call("jobs", run=run)
        job = call("submit", run="run-c", step=5, uri=str(ckpt))
        call("submit_checked", run="run-c", step=5, uri=str(ckpt))
        call("cancel", job["id"])
        call("retry", job["id"])
        call("runs")
        call("run", run)
        call("delete_run", run, dry_run=True)
        assert call("scores", run)["metric"] == DEFAULT_METRIC
        assert call("trend", run)["metric"] == DEFAULT_METRIC
        assert call("heatmap", run)["metric"] == DEFAULT_METRIC
        assert call("profile", run)["metric"] == DEFAULT_METRIC
        assert call("compare", [run, "run-c"])["metric"] == DEFAULT_METRIC
        call("webhooks")
        call("update_webhook", hook["id"], active=False)
        deliveries = call("deliveries", hook["id"])
        call("delivery", hook["id"], deliveries[0]["id"])
        with session_scope(db) as s:  # no webhook worker here: end the delivery as a worker would, then redeliver it
            s.get(Delivery, deliveries[0]["id"]).status = DeliveryStatus.failed
        call("redeliver", hook["id"], deliveries[0]["id"])
        call("test_webhook", hook["id"])
        call("create_hook_source", "typed-source", prefix="s3://bucket/runs/")
        call("hook_sources")
        call("revoke_hook_source", "typed-source")
        call("alerts", run)
        assert call("firings", run)[0]["rule_id"] == rule["id"]
    # every method that returns JSON was called
    returning = {name for name, m in vars(Client).items() if inspect.isfunction(m) and not name.startswith("_")
                 and typing.is_typeddict(_returns(m)[0])}
    assert returning == set(seen)
