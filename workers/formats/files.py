"""Reading byte ranges of a checkpoint's local files, for the format readers."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointUnreadable, MalformedWeights


def read_range(path: Path, offset: int, length: int) -> bytes:
    """Exactly ``length`` bytes of ``path`` from ``offset``: a file that cannot be read is
    ``checkpoint_unreadable``, one that ends sooner ``malformed_weights``."""
    try:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
    except OSError as e:
        raise CheckpointUnreadable(f"{str(path)!r} cannot be read ({e.strerror or e}); check that the checkpoint is "
                                   "complete and readable by the worker") from None
    if len(data) != length:
        raise MalformedWeights(f"{str(path)!r} ends early: {length} bytes expected at offset {offset}, {len(data)} "
                               "there; it is truncated or still being written: copy it again, completely")
    return data
