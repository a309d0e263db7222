"""Attach layertrack to the training you already run.

* ``layertrack.integrations.hf.LayertrackCallback``: Hugging Face ``Trainer`` callback.
* ``layertrack.integrations.lightning.LayertrackCallback``: PyTorch Lightning callback.
* ``Reporter`` / ``report_checkpoint``: a hand-written loop.

All of them post checkpoints from a background thread, keep submissions in a local spool
while the service is unreachable, and never stop training. docs/integrations.md has
copy-paste examples.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

from .reporter import Reporter, flush_spool

__all__ = ["Reporter", "flush_spool", "report_checkpoint"]

_reporters: dict[tuple[str, str | None], Reporter] = {}
_lock = threading.Lock()


def report_checkpoint(path: str, *, run: str, step: int, url: str | None = None, token: str | None = None,
                      **options: Any) -> None:
    """Post checkpoint ``path`` of ``run`` at ``step`` without blocking (one background
    Reporter per run and URL, flushed when the program exits). ``options``: those of
    ``Reporter`` (phase, parent_run, parent_step, config, spool_dir, ...), used when the
    run's Reporter is created."""
    with _lock:
        key = (run, url)
        if key not in _reporters:
            _reporters[key] = Reporter(run, url=url, token=token, **options)
        reporter = _reporters[key]
    reporter.report(step, path)


@atexit.register
def _close_all() -> None:
    for r in list(_reporters.values()):
        r.close(timeout=30)
    _reporters.clear()
