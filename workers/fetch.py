"""Fetching a remote checkpoint into a local cache directory, shared by worker processes.

Layout under the cache root::

    objects/ab/<entry id>        complete, verified files; the id is a sha256 of the store's
                                 identity, the object's path, its size and its version
    tmp/<entry id>.<random>.part downloads in progress (never read as entries)
    locks/<entry id>.lock        one lock file per entry (fcntl.flock), held exclusively while
                                 the entry is downloaded, linked or evicted
    checkouts/<random>/          the directories ``fetch`` returns: hard links to entries
    checkouts/<random>.lock      held by the process using that directory until ``release``
    evict.lock                   exclusive while the cache makes room; shared while a checkout
                                 is made

A file is downloaded to a temporary name (with concurrent range requests when it is larger
than ``part_size``), its size and, where the store gives one, its checksum are verified, it
is flushed to disk, and only then renamed to its entry: a partial download is never taken for
a complete one (a process killed midway leaves a ``.part`` file that is swept away). An entry
is in use while a checkout links it (its link count is above 1): least-recently-used entries
not in use are evicted to keep the cache under ``max_bytes``. When everything in the cache is
in use the cap is exceeded rather than failing the job (a warning is logged). Two processes
that want the same entry at once: the first downloads it, the second waits on the entry's lock
and then finds it complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import CacheTooSmall, ChecksumMismatch, LayertrackError, StoreUnreachable
from .stores import ObjectInfo, Store

log = logging.getLogger("layertrack.fetch")

#: hash functions of the checksum kinds a store may give (crc32c has no standard-library
#: implementation: such checksums are left unverified)
_HASHES: dict[str, Callable[[], object]] = {"md5": hashlib.md5, "sha256": hashlib.sha256, "sha1": hashlib.sha1}


class _GitBlobHash:
    """git's blob id: sha1 over ``blob <size>\\0`` and the content."""

    def __init__(self, size: int):
        self._h = hashlib.sha1(f"blob {size}\0".encode())

    def update(self, data) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool = True, blocking: bool = True) -> Iterator[int | None]:
    """Hold an flock on ``path`` (created if missing); yields the fd, or None when not
    blocking and the lock is held elsewhere. Retries when the file was replaced or removed
    between opening and locking it (so that removing a lock file is safe)."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BlockingIOError:
            os.close(fd)
            held_elsewhere = True
            break
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if same:
            held_elsewhere = False
            break
        os.close(fd)  # replaced or removed meanwhile: lock the file now at ``path``
    # the yields are outside the blocks that close ``fd``: a with-body that raises never has a
    # descriptor closed twice (by then its number may be another thread's file, or lock)
    if held_elsewhere:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


class _Progress:
    """Bytes done of a fetch; the callback at most every ``interval`` seconds, and always when
    the last byte arrives."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None, interval: float = 0.1):
        self.total, self.done, self._cb, self._interval = total, 0, callback, interval
        self._lock = threading.Lock()
        self._last = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self._cb is not None and (self.done >= self.total or now - self._last >= self._interval):
                self._last = now
                self._cb(self.done, self.total)


class Cache:
    """A size-capped cache of checkpoint files, safe to share between worker processes."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        for sub in ("objects", "tmp", "locks", "checkouts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}  # checkout path -> fd of its lock
        #: bytes read from stores by this Cache object (tests and benchmarks read it)
        self.bytes_fetched = 0
        self._count_lock = threading.Lock()

    # -------------------------------------------------------------- naming
    @staticmethod
    def entry_id(store: Store, f: ObjectInfo) -> str:
        """The cache entry of one object: the same store, path, size and version give the
        same entry; an object without a version is never shared (a fresh id each time)."""
        path = f"{store.location.path}/{f.key}" if store.location.path else f.key
        version = f.version if f.version is not None else f"unversioned-{uuid.uuid4().hex}"
        return hashlib.sha256(f"{store.identity}\0{path}\0{f.size}\0{version}".encode()).hexdigest()

    def _object(self, eid: str) -> Path:
        return self.root / "objects" / eid[:2] / eid

    def _lockfile(self, eid: str) -> Path:
        return self.root / "locks" / f"{eid}.lock"

    # -------------------------------------------------------------- the public part
    def fetch(self, store: Store, files: list[ObjectInfo], *, progress: Callable[[int, int], None] | None = None,
              concurrency: int = 8, part_size: int = 16 << 20, checkout: Path | None = None,
              on_file: Callable[[ObjectInfo], None] | None = None, files_at_once: int | None = None) -> Path:
        """A local checkpoint directory holding exactly ``files`` of ``store`` (hard links to
        cache entries), fetched where not cached. Give it back with ``release`` when done.

        ``checkout``: a directory from ``new_checkout`` to fill (its files can be used as they
        arrive); ``on_file(f)`` is called as soon as file ``f`` is complete and verified in it.
        Files are started in the order given, ``files_at_once`` at a time (default: up to
        ``concurrency``); each file's parts are fetched ``concurrency`` at a time."""
        total = sum(f.size for f in files)
        if total > self.max_bytes:
            raise CacheTooSmall(
                f"checkpoint {store.location.uri()} is {total:,} bytes, more than the fetch cache may hold "
                f"({self.max_bytes:,} bytes): raise LAYERTRACK_CACHE_MAX_BYTES above the checkpoint's size")
        checkout = checkout if checkout is not None else self.new_checkout()
        done = _Progress(total, progress)
        if progress is not None:
            progress(0, total)
        at_once = max(1, min(files_at_once or concurrency, len(files) or 1))

        def one(f: ObjectInfo) -> None:
            self._one(store, f, checkout, done, parts, part_size)
            if on_file is not None:
                on_file(f)

        try:
            with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="fetch-part") as parts, \
                    ThreadPoolExecutor(at_once, thread_name_prefix="fetch") as each:
                futures = [each.submit(one, f) for f in files]
                for fut in futures:
                    fut.result()
        except BaseException:
            self.release(checkout)
            raise
        return checkout

    def cached(self, store: Store, f: ObjectInfo) -> Path | None:
        """The cache entry of ``f`` when it is complete here (read it, do not write it)."""
        if f.version is None:
            return None
        obj = self._object(self.entry_id(store, f))
        return obj if self._complete(obj, f.size) else None

    def release(self, path: Path) -> None:
        """Give back a directory ``fetch`` returned: it is removed and its entries may be
        evicted once no other checkout links them."""
        path = Path(path)
        shutil.rmtree(path, ignore_errors=True)
        fd = self._held.pop(str(path), None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.lock")
        if fd is not None:
            os.close(fd)
        if self.usage() > self.max_bytes:  # over the cap while everything was in use: trim now
            self._make_room(0)

    def usage(self) -> int:
        """Bytes held by cache entries (complete files) and downloads in progress. Never less
        than the truth, also while downloads finish (``release`` and callers outside the
        eviction lock count so): the parts are counted before the entries, so a part renamed
        into its entry in between is counted twice rather than not at all. Under the eviction
        lock (``_make_room``) no part is renamed and the count is exact."""
        parts = self._parts_size()
        return parts + sum(size for _, size, _, _ in self._entries())

    # -------------------------------------------------------------- checkouts
    def new_checkout(self) -> Path:
        """An empty directory for ``fetch(checkout=...)``; give it back with ``release``."""
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = self.root / "checkouts" / name
        with _flock(self.root / "evict.lock", exclusive=False):
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            path.mkdir()
        self._held[str(path)] = fd
        return path

    # -------------------------------------------------------------- one file
    def _one(self, store: Store, f: ObjectInfo, checkout: Path, done: _Progress, parts: ThreadPoolExecutor,
             part_size: int) -> None:
        eid = self.entry_id(store, f)
        target = checkout.joinpath(*f.key.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        obj = self._object(eid)
        with _flock(self._lockfile(eid)):
            if not self._complete(obj, f.size):
                for attempt in (1, 2):
                    try:
                        self._download(store, f, eid, obj, done, parts, part_size)
                        break
                    except ChecksumMismatch:
                        if attempt == 2:
                            raise
                        log.warning("checksum mismatch for %s of %s; fetching it again", f.key, store.location.uri())
            else:
                done.add(f.size)
            os.utime(obj)  # least recently used: by modification time, set on every use
            os.link(obj, target)

    @staticmethod
    def _complete(obj: Path, size: int) -> bool:
        try:
            return obj.stat().st_size == size
        except FileNotFoundError:
            return False

    def _download(self, store: Store, f: ObjectInfo, eid: str, obj: Path, done: _Progress,
                  parts: ThreadPoolExecutor, part_size: int) -> None:
        for stale in (self.root / "tmp").glob(f"{eid}.*.part"):  # we hold the entry's lock: nobody writes it
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        tmp = self.root / "tmp" / f"{eid}.{uuid.uuid4().hex[:12]}.part"
        self._make_room(f.size, reserve=tmp)  # creates tmp at its full size, under the eviction lock
        credited = 0
        try:
            fd = os.open(tmp, os.O_RDWR)
            try:
                ranges = [(s, min(s + part_size, f.size)) for s in range(0, f.size, part_size)] or [(0, 0)]

                def get(r: tuple[int, int]) -> int:
                    start, end = r
                    if end <= start:
                        return 0
                    data = store.read(f.key, start, end, version=f.version)
                    if len(data) != end - start:
                        raise StoreUnreachable(
                            f"{f.key!r} of {store.location.uri()}: got {len(data):,} bytes for bytes {start:,}-{end:,} "
                            "(the transfer was cut short); retried")
                    os.pwrite(fd, data, start)
                    with self._count_lock:
                        self.bytes_fetched += len(data)
                    done.add(len(data))
                    return len(data)

                futures = [parts.submit(get, r) for r in ranges]
                try:
                    for fut in futures:
                        credited += fut.result()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    for fut in futures:
                        with contextlib.suppress(BaseException):
                            credited += fut.result() if not fut.cancelled() else 0
                    raise
                if os.fstat(fd).st_size != f.size:
                    raise StoreUnreachable(f"{f.key!r} of {store.location.uri()}: the fetched file is "
                                           f"{os.fstat(fd).st_size:,} bytes, not {f.size:,}; retried")
                self._verify(fd, f, store)
                os.fsync(fd)
            finally:
                os.close(fd)
            obj.parent.mkdir(exist_ok=True)
            # under the eviction lock (shared): a usage count taken while making room lists the
            # parts, then the entries, and counts a file renamed from one to the other exactly once
            with _flock(self.root / "evict.lock", exclusive=False):
                os.rename(tmp, obj)
        except BaseException:
            done.add(-credited)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def _verify(fd: int, f: ObjectInfo, store: Store) -> None:
        if f.checksum is None:
            return
        kind, expected = f.checksum
        if kind == "git-sha1":
            h = _GitBlobHash(f.size)
        elif kind in _HASHES:
            h = _HASHES[kind]()
        else:
            return  # a kind without a standard-library implementation (crc32c)
        pos = 0
        while True:
            chunk = os.pread(fd, 8 << 20, pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
        got = h.hexdigest()
        if got.lower() != expected.lower():
            hint = (" (an S3 ETag is the MD5 only for objects uploaded in one part without SSE-KMS; for such a "
                    "bucket set LAYERTRACK_S3_ETAG_MD5=0)" if kind == "md5" else "")
            raise ChecksumMismatch(f"{f.key!r} of {store.location.uri()}: its {kind} is {got}, the store lists "
                                   f"{expected}{hint}")

    # -------------------------------------------------------------- eviction
    def _entries(self) -> list[tuple[Path, int, float, int]]:
        """(path, size, mtime, link count) of every complete entry."""
        out = []
        for sub in (self.root / "objects").iterdir():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for p in sub.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        st = p.stat()
                        out.append((p, st.st_size, st.st_mtime, st.st_nlink))
        return out

    def _parts(self) -> list[Path]:
        return list((self.root / "tmp").glob("*.part"))

    def _parts_size(self) -> int:
        """Bytes of the downloads in progress. A part renamed into place between listing and
        stat counts as nothing here (it is an entry by the time the entries are listed, after
        this: see usage); renames take the eviction lock, so ``_make_room`` never sees that."""
        total = 0
        for part in self._parts():
            with contextlib.suppress(FileNotFoundError):
                total += part.stat().st_size
        return total

    def _sweep(self) -> None:
        """Remove checkouts whose process is gone and ``.part`` files nobody is writing."""
        for lock in (self.root / "checkouts").glob("*.lock"):
            directory = lock.with_suffix("")
            if str(directory) in self._held:
                continue
            with _flock(lock, blocking=False) as fd:
                if fd is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
        for part in self._parts():
            eid = part.name.split(".", 1)[0]
            with _flock(self._lockfile(eid), blocking=False) as fd:
                if fd is not None:  # its downloader holds this lock while it writes
                    with contextlib.suppress(FileNotFoundError):
                        part.unlink()

    def _make_room(self, need: int, *, reserve: Path | None = None) -> None:
        """Evict least-recently-used entries not in use until ``need`` more bytes fit under the
        cap; then create ``reserve`` at ``need`` bytes (under the same lock, so that two
        processes cannot both count on the same free space)."""
        with _flock(self.root / "evict.lock"):
            used = self.usage()
            if used + need > self.max_bytes:
                self._sweep()
                parts = self._parts_size()  # first: see usage
                entries = sorted(self._entries(), key=lambda e: e[2])
                used = parts + sum(e[1] for e in entries)
                # each decision at debug level: what pins the cause when the cache is found over its cap
                log.debug("fetch cache %s: room for %d bytes: %d in use (%d in parts, %d entries), cap %d",
                          self.root, need, used, parts, len(entries), self.max_bytes)
                for path, size, mtime, nlink in entries:
                    if used + need <= self.max_bytes:
                        break
                    if nlink > 1:
                        log.debug("  kept %s (%d bytes, mtime %.6f): %d links", path.name[:16], size, mtime, nlink)
                        continue  # linked into a checkout: in use
                    eid = path.name
                    with _flock(self._lockfile(eid), blocking=False) as fd:
                        if fd is None:
                            log.debug("  kept %s (%d bytes, mtime %.6f): its lock is held", eid[:16], size, mtime)
                            continue  # being linked or checked right now
                        try:
                            if path.stat().st_nlink > 1:
                                log.debug("  kept %s (%d bytes): linked since listed", eid[:16], size)
                                continue
                            path.unlink()
                        except FileNotFoundError:
                            log.debug("  %s (%d bytes) was gone", eid[:16], size)
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            self._lockfile(eid).unlink()
                        used -= size
                        log.debug("  evicted %s (%d bytes, mtime %.6f): %d in use", eid[:16], size, mtime, used)
                if used + need > self.max_bytes and need:
                    log.warning("fetch cache %s: %s bytes in use, %s more needed, cap %s: going over the cap until "
                                "checkouts are released", self.root, f"{used:,}", f"{need:,}", f"{self.max_bytes:,}")
            if reserve is not None:
                log.debug("fetch cache %s: reserving %d bytes for %s (%d counted in use, cap %d)", self.root, need,
                          reserve.name[:16], used, self.max_bytes)
                fd = os.open(reserve, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.ftruncate(fd, need)
                except OSError as e:
                    os.close(fd)
                    reserve.unlink()
                    if e.errno == errno.ENOSPC:
                        raise LayertrackError(f"no space left on the cache's disk ({self.root})") from None
                    raise
                os.close(fd)
