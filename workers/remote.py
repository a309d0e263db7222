"""Scoring a remote checkpoint while it is fetched.

The fetch and the forward pass are both long and use different resources (the network,
the device), so a remote job overlaps them: the small files (config, tokenizer, index) come
first, then the weight files in the order their blocks run, the one with the embeddings
first; the job runs streamed (``workers.streaming``) and each block waits only until the
file holding its tensors is complete in the cache, checked against the store's checksum.
A job then takes about max(fetch, compute) instead of their sum.

``fetch_and_score(on_event=...)`` reports that interleaving as it happens, one call per event
(the tests assert its order; bench/overlap_bench.py measures the time it saves):

    ("arrived", key)  file ``key`` is complete and verified in the checkout (fetch thread)
    ("wanted", key)   the scoring needs weight file ``key`` for the first time: the module
                      about to run (the embeddings, or a block) has tensors in it
    ("ready", key)    that wait is over: the module reads its tensors from the file

The safetensors headers are read from the store first (two ranged reads per file), so the
memory plan is made, and a checkpoint that cannot fit refused, before any weight is fetched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .errors import CacheTooSmall
from .fetch import Cache
from .planner import block_of, find_block_prefix
from .stores import ObjectInfo, Store

#: weight files fetched at once in block order (each in parallel parts): two keep the link
#: busy between files while the next block's file still comes before later ones
FILES_AT_ONCE = 2


#: bytes read at the start of each weight file for its header: one request for most files
HEADER_PROBE = 64 << 10


def read_remote_header(store: Store, f: ObjectInfo, cache: Cache | None = None) -> tuple[dict, int]:
    """A safetensors file's header, from the cache when the file is there, else from the
    store (one ranged read, two when the header is longer than HEADER_PROBE); checked like
    a local file's."""
    local = cache.cached(store, f) if cache is not None else None
    if local is not None:
        try:
            return ckpt.check_safetensors(local)
        except FileNotFoundError:  # evicted meanwhile
            pass
    shown = f"{f.key!r} of {store.location.uri()}"
    head = store.read(f.key, 0, min(HEADER_PROBE, f.size), version=f.version)
    n = ckpt.header_length(head[:8], f.size, shown)
    raw = head[8:8 + n]
    if len(raw) < n:
        raw += store.read(f.key, len(head), 8 + n, version=f.version)
    return ckpt.parse_safetensors_header(raw, f.size, shown), 8 + n


def read_headers(store: Store, files: list[ObjectInfo], cache: Cache | None = None) -> dict[str, tuple[dict, int]]:
    """``read_remote_header`` of every file, up to 16 at once."""
    if not files:
        return {}
    with ThreadPoolExecutor(min(16, len(files)), thread_name_prefix="headers") as pool:
        return dict(zip([f.key for f in files], pool.map(lambda f: read_remote_header(store, f, cache), files),
                        strict=True))


def fetch_order(files: list[ObjectInfo], headers: dict[str, tuple[dict, int]], n_blocks: int | None) -> list[
        ObjectInfo]:
    """Small files first, then the weight files by the first block that needs them: the
    embeddings' file first, the final norm's and the LM head's last."""
    if not headers or n_blocks is None:
        return sorted(files, key=lambda f: (f.key in headers, f.key))
    names = [n for h, _ in headers.values() for n in h if n != "__metadata__"]
    try:
        prefix = find_block_prefix(names, n_blocks)
    except ValueError:
        prefix = ""

    def rank(name: str) -> int:
        i = block_of(name, prefix)
        if i is not None:
            return i
        return -1 if any(w in name for w in ("embed", "wte", "wpe", "word_embeddings")) else n_blocks

    first = {key: min((rank(n) for n in h if n != "__metadata__"), default=n_blocks)
             for key, (h, _) in headers.items()}
    return sorted(files, key=lambda f: (f.key in headers, first.get(f.key, -2), f.key))


class _Arrivals:
    """Which files of a fetch are complete; ``wait(key)`` blocks until one is, or raises the
    fetch's error."""

    def __init__(self):
        self._cond = threading.Condition()
        self._done: set[str] = set()
        self.error: BaseException | None = None
        self.finished = False

    def arrived(self, f: ObjectInfo) -> None:
        with self._cond:
            self._done.add(f.key)
            self._cond.notify_all()

    def end(self, error: BaseException | None) -> None:
        with self._cond:
            self.error, self.finished = error, True
            self._cond.notify_all()

    def wait(self, key: str) -> None:
        with self._cond:
            while key not in self._done:
                if self.error is not None:
                    raise self.error
                if self.finished:
                    raise RuntimeError(f"the fetch ended without {key!r}")
                self._cond.wait()


@dataclass
class RemoteResult:
    result: Any  # scoring.ScoreResult
    checkout: Path
    fetch_s: float
    bytes_fetched: int


def fetch_and_score(store: Store, files: list[ObjectInfo], cache: Cache, *, config: Any,
                    progress: Callable[[int, int], None] | None = None,
                    on_fetched: Callable[[float], None] | None = None,
                    score_progress: Callable[[int, int], None] | bool = False,
                    on_event: Callable[[str, str], None] | None = None) -> RemoteResult:
    """Fetch ``files`` of ``store`` into ``cache`` and score them (``ScoreConfig`` ``config``),
    overlapped (module doc). ``progress(done, total)`` follows the fetch's bytes;
    ``on_fetched(seconds)`` is called when the last file is in; ``on_event(kind, key)`` is
    called for each file arriving and each wait of the scoring (module doc). The checkout directory in the
    result is the caller's to ``cache.release``. A failed fetch raises its own error (the
    scoring's error is then a consequence)."""
    from .scoring import score_checkpoint  # torch

    weights = [f for f in files if f.key.endswith(".safetensors")]
    total = sum(f.size for f in files)
    if total > cache.max_bytes:
        raise CacheTooSmall(
            f"checkpoint {store.location.uri()} is {total:,} bytes, more than the fetch cache may hold "
            f"({cache.max_bytes:,} bytes): raise LAYERTRACK_CACHE_MAX_BYTES above the checkpoint's size")
    headers = read_headers(store, weights, cache)
    n_blocks = _n_blocks(store, files, cache)
    ordered = fetch_order(files, headers, n_blocks)
    small = [f for f in ordered if f.key not in headers]
    large = [f for f in ordered if f.key in headers]
    small_total = sum(f.size for f in small)
    checkout = cache.new_checkout()
    arrivals = _Arrivals()
    before = cache.bytes_fetched
    t0 = time.perf_counter()
    fetch_s: list[float] = []
    arrived, ready = arrivals.arrived, arrivals.wait
    if on_event is not None:
        wanted: set[str] = set()
        wanted_lock = threading.Lock()

        def arrived(f: ObjectInfo) -> None:
            on_event("arrived", f.key)  # before the waiting scoring is woken: events stay in order
            arrivals.arrived(f)

        def ready(key: str) -> None:
            with wanted_lock:
                first = key not in wanted
                wanted.add(key)
            if first:
                on_event("wanted", key)
            arrivals.wait(key)
            if first:
                on_event("ready", key)

    def offset(base: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, _total: progress(base + done, total)

    def run_fetch() -> None:
        error = None
        try:  # the small files all at once, then the weights in block order
            if small:
                cache.fetch(store, small, progress=offset(0), checkout=checkout, on_file=arrived)
            if large:
                cache.fetch(store, large, progress=offset(small_total), checkout=checkout, on_file=arrived,
                            files_at_once=FILES_AT_ONCE)
            fetch_s.append(time.perf_counter() - t0)
            if on_fetched is not None:
                on_fetched(fetch_s[0])
        except BaseException as e:
            error = e
        arrivals.end(error)

    fetcher = threading.Thread(target=run_fetch, name="fetch", daemon=True)
    fetcher.start()
    try:
        for f in small:
            arrivals.wait(f.key)
        result = score_checkpoint(str(checkout), config=config, roots=[cache.root], headers=headers or None,
                                  ready=ready if headers else None, progress=score_progress)
    except BaseException:
        fetcher.join()
        if arrivals.error is not None:
            raise arrivals.error from None
        cache.release(checkout)
        raise
    fetcher.join()
    if arrivals.error is not None:  # the fetch failed after every tensor was read: nothing is kept
        raise arrivals.error
    return RemoteResult(result=result, checkout=checkout, fetch_s=fetch_s[0] if fetch_s else 0.0,
                        bytes_fetched=cache.bytes_fetched - before)


def _n_blocks(store: Store, files: list[ObjectInfo], cache: Cache) -> int | None:
    """The config's number of blocks (to order the weight files), or None."""
    import json

    for f in files:
        if f.key == "config.json":
            local = cache.cached(store, f)
            try:
                raw = local.read_bytes() if local is not None and f.size <= ckpt.MAX_JSON_BYTES else store.read(
                    f.key, 0, min(f.size, ckpt.MAX_JSON_BYTES), version=f.version)
                config = json.loads(raw)
            except (ValueError, OSError):
                return None
            if not isinstance(config, dict):
                return None
            for k in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(config.get(k), int):
                    return config[k]
    return None
