"""Fetching a remote checkpoint into a local cache directory.

(First version: the interface. The implementation follows.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .stores import ObjectInfo, Store


class Cache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def fetch(self, store: Store, files: list[ObjectInfo], *, progress: Callable[[int, int], None] | None = None,
              concurrency: int = 8, part_size: int = 16 << 20) -> Path:
        raise NotImplementedError

    def release(self, path: Path) -> None:
        """Give back a directory ``fetch`` returned (its entries may then be evicted)."""
        raise NotImplementedError
