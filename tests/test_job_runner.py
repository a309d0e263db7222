"""The job runner's contract with the score task and with workers/errors.py: the retries the
tasks declare are the ones the runner announces, every transient error is retried, and every
code a failed job can get is an error class's."""

from __future__ import annotations

import ast
import inspect

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from layertrack.service import job_runner, queue
from layertrack.service.settings import Settings
from layertrack.workers import errors
from sqlalchemy.exc import OperationalError


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


ERROR_CLASSES = _subclasses(errors.LayertrackError)


def test_the_tasks_declare_their_retries_and_the_runner_announces_celerys_countdowns():
    score, deliver = queue.score, queue.deliver_webhook
    assert score.autoretry_for == job_runner.RETRIED
    assert deliver.autoretry_for == job_runner.TRANSIENT
    settings = queue.SETTINGS
    assert score.max_retries == max(settings.task_max_retries, settings.fetch_max_retries)
    assert deliver.max_retries == settings.task_max_retries
    for task in (score, deliver):
        assert task.retry_jitter is False
        # the countdown Celery's autoretry computes (celery/app/autoretry.py) for each retry
        celery_delays = [get_exponential_backoff_interval(int(max(1.0, float(task.retry_backoff))), n,
                                                          int(task.retry_backoff_max), task.retry_jitter)
                         for n in range(9)]
        assert celery_delays == [job_runner.retry_delay(n) for n in range(9)] == [2, 4, 8, 16, 32, 64, 64, 64, 64]


def test_every_transient_error_but_the_incomplete_upload_is_retried():
    transient = {c for c in ERROR_CLASSES if c.transient}
    assert errors.CheckpointIncomplete in transient  # it waits for the upload instead
    assert transient - {errors.CheckpointIncomplete} <= set(job_runner.RETRIED)


def test_failures_that_are_not_layertrack_errors_map_to_error_classes():
    settings = Settings(task_soft_time_limit=60)
    cases = {
        SoftTimeLimitExceeded(): ("time_limit", "the job ran longer than 60 s and was stopped"),
        OperationalError("SELECT 1", {}, ConnectionRefusedError("refused")): ("transient_error", "OperationalError"),
        ConnectionError("broker gone"): ("transient_error", "ConnectionError: broker gone"),
        ValueError("a bug"): ("internal_error", "ValueError: a bug"),
    }
    for exc, (code, message) in cases.items():
        err = job_runner.job_error(exc, settings)
        assert type(err) in ERROR_CLASSES and err.code == code and message in err.message, (exc, err)
    given = errors.MalformedWeights("truncated")
    assert job_runner.job_error(given, settings) is given


def test_retry_caps_by_kind():
    settings = Settings(task_max_retries=3, fetch_max_retries=8)
    assert job_runner.retry_cap(TimeoutError(), remote=False, settings=settings) == 3
    assert job_runner.retry_cap(errors.StoreUnreachable("503"), remote=True, settings=settings) == 8
    assert job_runner.retry_cap(errors.StoreUnreachable("503"), remote=False, settings=settings) is None
    assert job_runner.retry_cap(errors.MalformedWeights("x"), remote=True, settings=settings) is None


def test_the_runner_writes_no_error_code_of_its_own():
    """Codes come from the error classes: no string literal in the runner is an error code."""
    codes = {c.code for c in ERROR_CLASSES}
    tree = ast.parse(inspect.getsource(job_runner))
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert literals & codes == set()
