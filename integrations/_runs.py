"""What the training callbacks share: a run name that stays the same when training resumes
from its own checkpoints, and the Reporter a callback starts once and closes at the end."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .reporter import Reporter

log = logging.getLogger("layertrack.integrations")

RUN_FILE = "layertrack.json"


def stable_run_name(folder: str | Path, wanted: str | None, fallback: str) -> str:
    """``wanted`` if given, else the name kept in ``folder/layertrack.json`` by an earlier
    start, else ``fallback`` plus the start time. The result is (re)written to the file."""
    folder = Path(folder)
    kept = None
    f = folder / RUN_FILE
    if f.is_file():
        try:
            kept = json.loads(f.read_text()).get("run")
        except ValueError:
            kept = None
    if wanted:
        name = wanted
    elif kept:
        name = kept
    else:
        base = re.sub(r"[^A-Za-z0-9._:@+-]+", "-", fallback).strip("-.") or "run"
        name = f"{base}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if name != kept:
        folder.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"run": name}) + "\n")
    return name


class Tracking:
    """Mixed into the Trainer and Lightning callbacks: owns their Reporter."""

    def _init_tracking(self, run: str | None, *, log_scores: bool, flush_timeout_s: float, **options: Any) -> None:
        self.run = run
        self.options = dict(pull_scores=log_scores, **options)
        self.log_scores = log_scores
        self.flush_timeout_s = flush_timeout_s
        self.reporter: Reporter | None = None

    def _start_reporter(self, folder: str | Path, wanted: str | None, fallback: str) -> Reporter:
        """The Reporter of this training, started on first use with the run's stable name."""
        if self.reporter is None:
            self.run = stable_run_name(folder, wanted, fallback)
            self.reporter = Reporter(self.run, **self.options)
            log.info("layertrack: tracking run %r at %s", self.run, self.reporter.url)
        return self.reporter

    def _close_reporter(self) -> None:
        """At the end of training: post what is queued (bounded wait), say what stays spooled."""
        if self.reporter is None:
            return
        left = self.reporter.close(timeout=self.flush_timeout_s)
        if left:
            log.warning("layertrack: %d checkpoint submission(s) stay spooled in %s; they are sent by the next "
                        "run or by 'layertrack spool flush'", left, self.reporter.spool)
        self.reporter = None
