"""Store clients: listing and reading checkpoint files where training wrote them.

(First version: the interface. The implementations follow.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .errors import (  # re-exported: the codes a store error fails a job with
    AccessDenied,
    CheckpointIncomplete,
    CheckpointNotFound,
    HostRefused,
    StoreUnreachable,
)
from .locations import Location

__all__ = [
    "AccessDenied", "CheckpointIncomplete", "CheckpointNotFound", "HostRefused", "ObjectInfo", "Store",
    "StoreUnreachable", "checkpoint_files", "fingerprint", "open_store",
]


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # path relative to the checkpoint location
    size: int
    version: str | None  # ETag / version id / generation / Hub LFS sha256 or blob id
    checksum: tuple[str, str] | None = None  # ("md5"|"sha256"|"crc32c"|"git-sha1", hex)


class Store(Protocol):
    location: Location
    identity: str  # what names this store's objects (scheme, container, endpoint): cache keys

    def resolve(self) -> str | None: ...
    def list(self, recursive: bool = False) -> list[ObjectInfo]: ...
    def list_dirs(self) -> list[str]: ...
    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> bytes: ...
    def revisions(self) -> list[tuple[str, str]]: ...


def open_store(loc: Location, *, allow_hosts: str = "") -> Store:
    raise NotImplementedError


def checkpoint_files(listing: list[ObjectInfo], store: Store | None = None, *,
                     allow_pickle: bool = False) -> list[ObjectInfo]:
    raise NotImplementedError


def fingerprint(loc: Location, files: list[ObjectInfo], resolved: str | None) -> str:
    raise NotImplementedError
