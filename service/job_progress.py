"""A remote job's progress, written to its row while its checkpoint is fetched: the phase,
bytes done and total, seconds and a message the API and the dashboard show."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

from . import jobs

log = logging.getLogger("layertrack.job_progress")


#: what a job's progress keeps from one attempt to the next about its store failures
CARRIED_STORE_FIELDS = ("store_failing_since", "store_failures", "retry_until")


def size(n: int | None) -> str:
    """A byte count for people: 1.5 GiB, 12.0 MiB, 3 B; ? when unknown."""
    if n is None:
        return "?"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


class Progress:
    """What a job of a remote checkpoint shows as ``progress``: ``phase`` (fetching, waiting,
    scoring), ``bytes_done``, ``bytes_total``, ``seconds`` (of the phase), ``message``;
    ``waiting_since`` once it has waited for an incomplete upload, and ``store_failing_since``,
    ``store_failures``, ``retry_until`` once its store could not be reached (kept until the
    job ends, so each deadline counts from the first wait or failure, whichever worker runs
    the next attempt). The fetch reports to it from any thread; a
    thread of its own writes it to the job at most every ``interval_s`` (which counts as a
    heartbeat), and phase changes are written at once. A failed write is logged and tried
    again at the next change: progress never stops a fetch."""

    def __init__(self, db_url: str, job_id: str, worker: str, interval_s: float, previous: dict | None):
        self.db_url, self.job_id, self.worker, self.interval_s = db_url, job_id, worker, interval_s
        self.state: dict[str, Any] = {"phase": "fetching", "bytes_done": None, "bytes_total": None, "seconds": None,
                                      "message": None}
        if previous and previous.get("waiting_since"):
            self.state["waiting_since"] = previous["waiting_since"]
            self.state["looks"] = previous.get("looks", 0)
        if previous and previous.get("store_failing_since"):
            for key in CARRIED_STORE_FIELDS:
                self.state[key] = previous.get(key)
        self._lock = threading.Lock()
        # held from taking a copy of the state to the end of writing it: writes land in the
        # order their copies were taken (a periodic write of "fetching" could otherwise land
        # after the "scoring" written at the phase change, and stay there)
        self._write_lock = threading.Lock()
        self._dirty = False
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Progress:
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                state = self.state
                if state["phase"] == "fetching" and state.get("bytes_total") is not None:
                    self._show_fetch(state["bytes_done"] or 0, state["bytes_total"])  # the clock runs on
            self.flush()

    def _show_fetch(self, done: int, total: int) -> None:
        seconds = time.monotonic() - self._t0
        pct = f" ({100 * done / total:.0f} %)" if total else ""
        self.state.update(bytes_done=done, bytes_total=total, seconds=round(seconds, 3),
                          message=f"fetching {size(done)} of {size(total)}{pct}, {seconds:.1f} s")
        self._dirty = True

    def phase(self, phase: str, message: str, **fields: Any) -> None:
        """Enter a phase (its clock starts) and write it now."""
        with self._lock:
            self._t0 = time.monotonic()
            self.state.update({"phase": phase, "message": message, "seconds": 0.0, **fields})
            self._dirty = True
        self.flush()

    def note(self, message: str, **fields: Any) -> None:
        """Say something (and set ``fields``) without leaving the phase; written now."""
        with self._lock:
            self.state.update({"message": message, **fields})
            self._dirty = True
        self.flush()

    def fetched(self, done: int, total: int) -> None:
        """The fetch's progress callback: bytes of the checkpoint present in the cache so far
        (a late call, after the fetch has moved on to another phase, changes nothing)."""
        with self._lock:
            if self.state["phase"] == "fetching":
                self._show_fetch(done, total)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.state)

    def flush(self) -> None:
        with self._write_lock:
            with self._lock:
                if not self._dirty:
                    return
                state, self._dirty = dict(self.state), False
            try:
                self._write(state)
            except Exception as e:
                log.warning("progress of job %s not written: %s", self.job_id, e)
                with self._lock:
                    self._dirty = True

    def _write(self, state: dict[str, Any]) -> None:
        jobs.set_progress(self.db_url, self.job_id, self.worker, state)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
