"""A pytest plugin: the run fails when a process the suite started outlives it.

At the start of the session a marker, ``LAYERTRACK_TEST_SESSION=<random>``, is put in the
environment, so that every process the tests start (and every process those start) carries it
unless it was given an environment without it. When the session ends (after the fixtures,
session-scoped ones too, are torn down: this hook runs after pytest's own), every process
whose environment holds the marker, but this process and its ancestors, is a survivor. The
survivors get a grace period to exit; those still alive are killed (SIGKILL), listed (pid and
command line) and the session's exit status is set to failure.

Under pytest-xdist each worker checks its own processes and hands what it found to the
controller (``workeroutput``), which reports it and fails the run.

tests/conftest.py imports the hooks; another pytest session loads the plugin with
``-p leftover_processes`` (tests/ on its path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import pytest

MARKER = "LAYERTRACK_TEST_SESSION"
#: seconds the survivors get to exit by themselves before they are killed
GRACE_S = float(os.environ.get("LAYERTRACK_TEST_LEFTOVER_GRACE_S", "5"))


def _ancestors() -> set[int]:
    """This process and its ancestors."""
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            break
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def marked_processes(value: str) -> list[int]:
    """The running processes (but this one and its ancestors) whose environment holds
    ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    skip = _ancestors()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle in env and _alive(int(name)):
            found.append(int(name))
    return sorted(found)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status when it is a child of this process (else nothing)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pytest_configure(config: pytest.Config) -> None:
    # a fresh marker for this session, also when it runs inside another session's process tree
    value = uuid.uuid4().hex
    os.environ[MARKER] = value
    config.stash[_KEY] = value


_KEY = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after _pytest.runner's, which tears the session's fixtures down
def pytest_sessionfinish(session: pytest.Session) -> None:
    from_workers = session.config.stash.get(_FROM_WORKERS, None)
    if from_workers:  # (pytest-xdist's controller; its workers ran the tests, it started nothing)
        _report(session, from_workers)
    value = session.config.stash.get(_KEY, None)
    if value is None:
        return
    deadline = time.monotonic() + GRACE_S
    survivors = marked_processes(value)
    while survivors and time.monotonic() < deadline:
        for pid in survivors:
            _reap(pid)
        time.sleep(0.1)
        survivors = marked_processes(value)
    if not survivors:
        return
    listed = [(pid, _cmdline(pid)) for pid in survivors]
    for pid, _ in listed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    gone_by = time.monotonic() + GRACE_S
    while any(_alive(pid) for pid, _ in listed) and time.monotonic() < gone_by:
        for pid, _ in listed:
            _reap(pid)
        time.sleep(0.05)
    lines = [f"{len(listed)} process(es) started by the tests were still running when the session ended "
             f"(killed now; {MARKER}={value} in their environment):"]
    lines += [f"  pid {pid}: {cmd[:300]}" for pid, cmd in listed]
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its exit status is not the run's; the controller reports
        workeroutput["leftover_processes"] = lines
        return
    _report(session, lines)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """(pytest-xdist's controller) a worker ended: keep what it found left running."""
    lines = getattr(node, "workeroutput", {}).get("leftover_processes")
    if lines:
        node.config.stash.setdefault(_FROM_WORKERS, []).extend([f"[{node.gateway.id}] {line}" for line in lines])


_FROM_WORKERS = pytest.StashKey[list]()


def _report(session: pytest.Session, lines: list[str]) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "processes left running", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        import sys

        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
