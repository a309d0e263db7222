"""A run name that stays the same when training resumes from its own checkpoints."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

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
