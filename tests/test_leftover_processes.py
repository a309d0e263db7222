"""The session-end check of tests/leftover_processes.py, in pytest sessions of their own
(pytester, each in a process of its own): a test that leaves a process running fails the run,
which names the process and kills it; a process a session-scoped fixture stops in its teardown
is not a survivor (the check runs after the fixtures are torn down). Each in one process and
under pytest-xdist (the suite's own way: `-n 2`), where the workers find and the controller fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from leftover_processes import _alive

TESTS = Path(__file__).parent

LEAKS = """
import subprocess
from pathlib import Path


def test_leaves_a_sleep_behind(tmp_path_factory):
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)  # detached, never stopped
    Path({pidfile!r}).write_text(str(proc.pid))
"""

CLEAN = """
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def server():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    Path({pidfile!r}).write_text(str(proc.pid))
    yield proc
    proc.terminate()
    proc.wait()


def test_uses_a_session_server(server):
    assert server.poll() is None


def test_waits_for_its_child():
    assert subprocess.run(["sleep", "0"]).returncode == 0
"""


WAYS = pytest.mark.parametrize("ways", [[], ["-n", "2"]], ids=["one-process", "xdist"])


def _run(pytester, source: str, monkeypatch, ways: list[str]):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LAYERTRACK_TEST_LEFTOVER_GRACE_S", "1")
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "leftover_processes", "-p", "no:cacheprovider", "-q", *ways)


@WAYS
def test_a_process_left_running_fails_the_run_and_is_killed(pytester, monkeypatch, tmp_path, ways):
    pidfile = tmp_path / "pid"
    result = _run(pytester, LEAKS.format(pidfile=str(pidfile)), monkeypatch, ways)
    pid = int(pidfile.read_text())
    try:
        result.stdout.fnmatch_lines(["*1 passed*"])  # the test itself passed ...
        assert result.ret == 1, result.stdout.str()  # ... the run did not
        result.stdout.fnmatch_lines(["*processes left running*", "*still running when the session ended*",
                                     f"*pid {pid}: sleep 60*"])
        assert not _alive(pid)  # killed by the inner session's check
    finally:
        if _alive(pid):
            os.kill(pid, 9)


@WAYS
def test_processes_stopped_by_fixtures_and_tests_pass(pytester, monkeypatch, tmp_path, ways):
    pidfile = tmp_path / "pid"
    result = _run(pytester, CLEAN.format(pidfile=str(pidfile)), monkeypatch, ways)
    pid = int(pidfile.read_text())
    try:
        assert result.ret == 0, result.stdout.str()
        assert "processes left running" not in result.stdout.str()
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)
