"""The job runner's contract with the score task and with workers/errors.py: the retries the
tasks declare are the ones the runner announces, every transient error is retried, and every
code a failed job can get is an error class's."""

from __future__ import annotations

import ast
import inspect
from datetime import UTC, datetime, timedelta

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from layertrack.service import job_runner, queue
from layertrack.service.job_progress import Progress
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


# ------------------------------------------------------------------ the store retry budget
T0 = datetime(2026, 12, 3, 14, 30, 0, tzinfo=UTC)


def declared_attempts(budget_s: float, max_retries: int, attempt_s: float = 0.0) -> int:
    """The attempts the declared back-off fits in a budget: after a failure the next attempt
    starts retry_delay(retries) later, and is made only if it starts within the budget of the
    first failure; each attempt takes ``attempt_s``."""
    attempts, failed_at = 1, 0.0
    while attempts <= max_retries:
        start = failed_at + job_runner.retry_delay(attempts - 1)
        if start > budget_s:
            break
        attempts, failed_at = attempts + 1, start + attempt_s
    return attempts


def simulate(settings: Settings, attempt_s: float = 0.0) -> tuple[int, job_runner.StoreRetry, list[dict]]:
    """Drive store_retry as the runner does, the clock advanced by each attempt's length and
    the delay it chose; the progress handed from attempt to attempt through Progress as a
    claim would. (attempts, the last decision, the progress shown between attempts)."""
    now, retries, previous, shown = T0, 0, None, []
    while True:
        now += timedelta(seconds=attempt_s)
        state = Progress("sqlite://", "job", "w", 1.0, previous).snapshot()
        plan = job_runner.store_retry(state, now, retries, settings)
        if plan.delay is None:
            return plan.failures, plan, shown
        previous = {**state, "store_failing_since": plan.since.isoformat(), "store_failures": plan.failures}
        shown.append(previous)
        now += timedelta(seconds=plan.delay)
        retries += 1


@pytest.mark.parametrize("budget", [0, 1, 2, 10, 13, 30, 120, 600])
def test_a_store_is_retried_while_the_next_attempt_starts_within_the_budget(budget):
    settings = Settings(fetch_retry_budget_s=budget, fetch_max_retries=8)
    attempts, plan, shown = simulate(settings)
    assert attempts == declared_attempts(budget, 8)
    assert plan.since == T0 and plan.deadline == T0 + timedelta(seconds=budget)
    assert plan.bound == (f"LAYERTRACK_FETCH_RETRY_BUDGET_S is {budget:g} s" if attempts <= 8
                          else "LAYERTRACK_FETCH_MAX_RETRIES is 8")
    # the first failure's time is carried from attempt to attempt (the progress, not memory)
    assert all(p["store_failing_since"] == T0.isoformat() for p in shown)
    assert [p["store_failures"] for p in shown] == list(range(1, attempts))


def test_the_default_budget_allows_six_attempts_and_slow_attempts_use_it_up_sooner():
    settings = Settings()
    assert settings.fetch_retry_budget_s == 120
    assert simulate(settings)[0] == declared_attempts(120, settings.fetch_max_retries) == 6
    # attempts that each take 10 s (a store that times out) use the budget up sooner
    slow = Settings(fetch_retry_budget_s=30)
    assert simulate(slow, attempt_s=10)[0] == declared_attempts(30, 8, attempt_s=10) == 3
    assert simulate(slow)[0] == declared_attempts(30, 8) == 5
    # the retry cap still holds when the budget would allow more
    assert simulate(Settings(fetch_retry_budget_s=3600, fetch_max_retries=2))[0] == 3


def test_times_in_messages_name_the_date_only_when_it_is_not_today():
    assert job_runner.clock(T0 + timedelta(seconds=65), T0) == "14:31:05 UTC"
    assert job_runner.clock(T0 + timedelta(hours=10), T0) == "2026-12-04 00:30:00 UTC"


class _HeldProgress(Progress):
    """Progress whose writes are recorded instead of stored; the first write waits until
    released (a periodic write still on its way to the database)."""

    def __init__(self):
        super().__init__("sqlite://", "job", "w", 3600.0, None)
        import threading
        self.written: list[dict] = []
        self.first_started, self.release = threading.Event(), threading.Event()

    def _write(self, state):
        if not self.written and not self.first_started.is_set():
            self.first_started.set()
            self.release.wait(30)
        self.written.append(state)


def test_a_slow_progress_write_never_lands_after_the_phase_change_that_followed_it():
    """CI once showed a succeeded remote job whose progress still said "fetching": a periodic
    write copied the state, the phase change to "scoring" was written, then the periodic one
    landed over it. Writes land in the order their copies were taken; a late fetch callback
    does not change a phase that has moved on."""
    import threading

    p = _HeldProgress()
    p.fetched(100, 100)
    periodic = threading.Thread(target=p.flush)
    periodic.start()
    assert p.first_started.wait(30)
    change = threading.Thread(target=p.phase, args=("scoring", "fetched; scoring"))
    change.start()
    change.join(2)  # without ordered writes the change is written now, while the periodic one waits
    p.release.set()
    periodic.join(30)
    change.join(30)
    p.fetched(100, 100)  # late
    p.flush()
    assert [w["phase"] for w in p.written] == ["fetching", "scoring"], p.written
    assert p.snapshot()["phase"] == "scoring" and p.snapshot()["message"] == "fetched; scoring"
