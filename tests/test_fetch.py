"""The fetch cache (workers/fetch.py) against real servers on loopback: files byte for byte,
cache hits that transfer nothing, eviction under the cap, two processes fetching the same
checkpoint at once, and cut or corrupted transfers never taken for complete files."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import Repo, files_of
from layertrack.workers import stores
from layertrack.workers.errors import CacheTooSmall, ChecksumMismatch, StoreUnreachable
from layertrack.workers.fetch import Cache
from layertrack.workers.locations import parse
from layertrack.workers.stores import checkpoint_files, open_store
from services import wait_until
from stores_fixtures import DirServer

BUCKET = "fetch-tests"


def _upload(s3, prefix: str, directory: Path) -> None:
    c = s3.client()
    if BUCKET not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
        c.create_bucket(Bucket=BUCKET)
    s3.upload_dir(BUCKET, prefix, directory)


def _same_files(fetched: Path, original: Path, keys: list[str]) -> None:
    assert sorted(p.name for p in fetched.iterdir()) == sorted(keys)
    for k in keys:
        assert (fetched / k).read_bytes() == (original / k).read_bytes(), k
        assert not (fetched / k).is_symlink()


def _entries(cache: Path) -> list[Path]:
    return [p for p in (cache / "objects").rglob("*") if p.is_file()]


def test_fetch_s3_byte_for_byte_then_cache_hit(s3_env, tiny_sharded, tmp_path):
    _upload(s3_env, "hit/ckpt", tiny_sharded)
    store = open_store(parse(f"s3://{BUCKET}/hit/ckpt"))
    files = checkpoint_files(store.list(), store)
    total = sum(f.size for f in files)
    cache = Cache(tmp_path / "cache", 10 << 20)
    seen: list[tuple[int, int]] = []
    s3_env.reset_counts()
    d = cache.fetch(store, files, progress=lambda done, tot: seen.append((done, tot)), part_size=32 << 10)
    _same_files(d, tiny_sharded, [f.key for f in files])
    assert d.is_relative_to(cache.root)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen)) and all(t == total for _, t in seen)
    assert cache.bytes_fetched == total
    served = s3_env.object_bytes
    # the largest shard came in several concurrent range requests of 32 KiB
    big = max(files, key=lambda f: f.size)
    assert s3_env.bytes_by_key[f"/{BUCKET}/hit/ckpt/{big.key}"] == big.size
    # again, from another Cache object on the same root (another worker): nothing transferred
    again = checkpoint_files(store.list(), store)  # reads the shard index (a few KiB): metadata
    s3_env.reset_counts()
    other = Cache(tmp_path / "cache", 10 << 20)
    d2 = other.fetch(store, again)
    assert other.bytes_fetched == 0
    assert s3_env.object_bytes == 0 and s3_env.object_gets == 0 and served >= total
    _same_files(d2, tiny_sharded, [f.key for f in files])
    assert d2 != d
    cache.release(d)
    other.release(d2)
    assert not d.exists() and not d2.exists()
    assert len(_entries(cache.root)) == len(files)  # the entries stay for the next hit


def _cache_report(cache: Cache, names: dict[str, str], caplog) -> str:
    """The cache's state for an assertion's message: every entry (whose file it is, size,
    mtime, links, whether its lock is held now), the parts, the checkouts, this process's
    descriptors into the cache, and the eviction decisions logged (debug) so far."""
    import fcntl

    def lock_state(eid: str) -> str:
        try:
            fd = os.open(cache.root / "locks" / f"{eid}.lock", os.O_RDWR)
        except FileNotFoundError:
            return "no lock file"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return "lock free"
        except BlockingIOError:
            return "LOCK HELD"
        finally:
            os.close(fd)

    lines = [f"usage {cache.usage():,} of cap {cache.max_bytes:,}; entries (oldest first):"]
    for path, size, mtime, nlink in sorted(cache._entries(), key=lambda e: e[2]):
        lines.append(f"  {names.get(path.name, '?'):45} {size:>8} mtime {mtime:.6f} links {nlink} "
                     f"{lock_state(path.name)}")
    lines.append(f"parts: {[(p.name, p.stat().st_size) for p in cache._parts()]}")
    lines.append(f"checkouts: {sorted(p.name for p in (cache.root / 'checkouts').iterdir())}; held {list(cache._held)}")
    fds = []
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{n}")
            if target.startswith(str(cache.root)):
                fds.append((int(n), target))
    lines.append(f"descriptors into the cache: {sorted(fds)}")
    lines.append("decisions:")
    lines += [f"  {r.threadName}: {r.getMessage()}" for r in caplog.records if r.name == "layertrack.fetch"]
    return "\n".join(lines)


def test_eviction_under_the_cap(s3_env, tiny_single, tiny_sharded, tmp_path, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="layertrack.fetch")  # the decisions, for the report on failure
    _upload(s3_env, "ev/a", tiny_single)
    _upload(s3_env, "ev/b", tiny_sharded)
    a, b = open_store(parse(f"s3://{BUCKET}/ev/a")), open_store(parse(f"s3://{BUCKET}/ev/b"))
    fa, fb = checkpoint_files(a.list(), a), checkpoint_files(b.list(), b)
    names = {Cache.entry_id(s, f): f"{label}:{f.key}" for s, fs, label in ((a, fa, "a"), (b, fb, "b")) for f in fs}
    size_a, size_b = sum(f.size for f in fa), sum(f.size for f in fb)
    cap = max(size_a, size_b) + 1000  # room for one of them, not both
    cache = Cache(tmp_path / "cache", cap)
    da = cache.fetch(a, fa)
    cache.release(da)
    db = cache.fetch(b, fb)  # a's entries, no longer in use, are evicted
    assert cache.usage() <= cap, _cache_report(cache, names, caplog)
    assert len(fb) <= len(_entries(cache.root)) < len(fa) + len(fb), _cache_report(cache, names, caplog)
    _same_files(db, tiny_sharded, [f.key for f in fb])
    # b is in use: fetching a again may not evict it; the cap is exceeded rather than failing
    da = cache.fetch(a, fa)
    _same_files(db, tiny_sharded, [f.key for f in fb])
    _same_files(da, tiny_single, [f.key for f in fa])
    cache.release(da)
    cache.release(db)
    # once released, the next fetch brings the cache back under the cap
    s3_env.reset_counts()
    db = cache.fetch(b, fb)
    assert cache.usage() <= cap, _cache_report(cache, names, caplog)
    cache.release(db)
    # a checkpoint larger than the cache is refused from its listed size
    with pytest.raises(CacheTooSmall) as e:
        Cache(tmp_path / "small", size_b - 1).fetch(b, fb)
    assert e.value.code == "cache_too_small"


def test_least_recently_used_goes_first(s3_env, tokenizer, tmp_path):
    from tiny_models import build_checkpoint

    stores_, files = [], []
    for i in range(3):
        build_checkpoint(tmp_path / f"c{i}", "llama", None, seed=10 + i)
        _upload(s3_env, f"lru/c{i}", tmp_path / f"c{i}")
        s = open_store(parse(f"s3://{BUCKET}/lru/c{i}"))
        stores_.append(s)
        files.append(checkpoint_files(s.list(), s))
    each = sum(f.size for f in files[0])
    cache = Cache(tmp_path / "cache", 2 * each + 2000)  # room for two
    for i in (0, 1):
        cache.release(cache.fetch(stores_[i], files[i]))
    cache.release(cache.fetch(stores_[0], files[0]))  # 0 used again: 1 is now the least recently used
    cache.release(cache.fetch(stores_[2], files[2]))
    s3_env.reset_counts()
    cache.release(cache.fetch(stores_[0], files[0]))
    assert s3_env.object_bytes == 0  # 0 was kept
    cache.release(cache.fetch(stores_[1], files[1]))
    assert max(f.size for f in files[1]) <= s3_env.object_bytes <= each  # 1 (its weights at least) was evicted


FETCH_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from layertrack.workers.fetch import Cache
    from layertrack.workers.locations import parse
    from layertrack.workers.stores import checkpoint_files, open_store
    store = open_store(parse(sys.argv[1]))
    files = checkpoint_files(store.list(), store)
    cache = Cache(Path(sys.argv[2]), 10 << 20)
    d = cache.fetch(store, files, part_size=16 << 10)
    print(json.dumps({"fetched": cache.bytes_fetched,
                      "sha": {f.key: hashlib.sha256((d / f.key).read_bytes()).hexdigest() for f in files}}))
""")


def test_two_processes_fetch_the_same_checkpoint(s3_env, tiny_sharded, tmp_path):
    _upload(s3_env, "two/ckpt", tiny_sharded)
    s3_env.reset_counts()
    s3_env.delay_s = 0.05  # each object GET waits: the two processes overlap
    env = {**os.environ}
    procs = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, f"s3://{BUCKET}/two/ckpt",
                                           str(tmp_path / "cache")],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True))
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # not left running when the other failed or either timed out
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = []
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    expected = {k: hashlib.sha256((tiny_sharded / k).read_bytes()).hexdigest() for k in results[0]["sha"]}
    assert results[0]["sha"] == results[1]["sha"] == expected  # both complete and correct
    total = sum((tiny_sharded / k).stat().st_size for k in expected)
    # fetched once: each file by one process or the other, never both
    assert results[0]["fetched"] + results[1]["fetched"] == total
    index = (tiny_sharded / "model.safetensors.index.json").stat().st_size
    assert s3_env.object_bytes == total + 2 * index  # + each process's listing read the index
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_cut_transfer_is_never_an_entry(s3_env, tiny_sharded, tmp_path, monkeypatch):
    """The S3 server dies in the middle of a shard: the fetch fails (store_unreachable), no
    entry or part file is left; with the server back, the fetch completes correctly."""
    _upload(s3_env, "cut/ckpt", tiny_sharded)
    monkeypatch.setattr(stores, "RETRY_TIMEOUT_S", 1.0)
    store = open_store(parse(f"s3://{BUCKET}/cut/ckpt"))
    files = checkpoint_files(store.list(), store)
    big = max(files, key=lambda f: f.size)
    s3_env.on_get = lambda key: "cut" if key.endswith(big.key) else None
    cache = Cache(tmp_path / "cache", 10 << 20)
    with pytest.raises(StoreUnreachable):
        cache.fetch(store, files, concurrency=1)
    s3_env.on_get = None
    for p in _entries(cache.root):  # whatever was completed before the cut is complete and correct
        assert any(p.read_bytes() == (tiny_sharded / f.key).read_bytes() for f in files)
    assert not list((cache.root / "tmp").iterdir())
    assert not list((cache.root / "checkouts").iterdir())
    wait_until(lambda: not s3_env.running, 10, what="the S3 server to stop")
    s3_env.start()
    d = cache.fetch(store, files)
    _same_files(d, tiny_sharded, [f.key for f in files])


def test_short_http_body_is_never_an_entry(tiny_single, tmp_path):
    server = DirServer(tiny_single.parent)
    try:
        store = open_store(parse(f"{server.url}/ckpt"), allow_hosts="127.0.0.1")
        files = checkpoint_files(store.list(), store)
        server.short_by = 100  # every body 100 bytes short of its Content-Length, then the connection closes
        cache = Cache(tmp_path / "cache", 10 << 20)
        with pytest.raises(StoreUnreachable):
            cache.fetch(store, files)
        assert _entries(cache.root) == [] or all(
            any(p.read_bytes() == (tiny_single / f.key).read_bytes() for f in files) for p in _entries(cache.root))
        assert not list((cache.root / "tmp").iterdir())
        server.short_by = 0
        _same_files(cache.fetch(store, files, part_size=4096), tiny_single, [f.key for f in files])
    finally:
        server.close()


def test_killed_fetch_leaves_no_complete_looking_file(tiny_single, tmp_path):
    """A worker killed mid-download leaves a .part file; another never takes it for an entry,
    sweeps it away and fetches the file whole."""
    server = DirServer(tiny_single.parent)
    try:
        server.delay_s = 0.2  # 64 KiB every 0.2 s
        uri = f"{server.url}/ckpt"
        script = FETCH_SCRIPT.replace("open_store(parse(sys.argv[1]))",
                                      "open_store(parse(sys.argv[1]), allow_hosts='127.0.0.1')")
        p = subprocess.Popen([sys.executable, "-c", script, uri, str(tmp_path / "cache")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: server.bytes_served > 70_000, 60, what="the download to be under way")
        finally:  # killed mid-download, or when it never got under way
            p.send_signal(signal.SIGKILL)
            p.wait()
        parts = list((tmp_path / "cache" / "tmp").iterdir())
        assert parts, "the killed fetch left its part file"
        server.delay_s = 0
        store = open_store(parse(uri), allow_hosts="127.0.0.1")
        files = checkpoint_files(store.list(), store)
        cache = Cache(tmp_path / "cache", sum(f.size for f in files) + 10_000)  # a tight cap: the sweep runs
        d = cache.fetch(store, files)
        _same_files(d, tiny_single, [f.key for f in files])
        assert not list((tmp_path / "cache" / "tmp").iterdir())  # the stale part file was swept away
    finally:
        server.close()


def test_hub_checksum_mismatch_is_refused(hub, tiny_single, tmp_path):
    """A file whose bytes are not those the Hub lists (its LFS sha256) is refused, never cached."""
    files = files_of(tiny_single)
    repo = Repo()
    repo.commit(files)
    hub.repos["org/ok"] = repo
    store = open_store(parse("hf://org/ok"))
    listing = checkpoint_files(store.list(), store)
    cache = Cache(tmp_path / "cache", 10 << 20)
    _same_files(cache.fetch(store, listing, part_size=50_000), tiny_single, [f.key for f in listing])
    # the same listing, but the server now holds other bytes for the weights: sha256 mismatch
    bad = dict(files)
    raw = bytearray(bad["model.safetensors"])
    raw[-1] ^= 0xFF
    bad["model.safetensors"] = bytes(raw)
    corrupt = Repo()
    sha = corrupt.commit(bad)
    hub.repos["org/corrupt"] = corrupt
    store2 = open_store(parse("hf://org/corrupt"))
    store2._sha = sha
    good_listing = checkpoint_files(store.list(), store)
    with pytest.raises(ChecksumMismatch) as e:
        cache.fetch(store2, good_listing)
    assert e.value.code == "checksum_mismatch"
    assert not list((cache.root / "tmp").iterdir())


def test_usage_never_misses_a_download_renamed_while_it_counts(tmp_path, monkeypatch):
    """A count outside the eviction lock (``release`` decides with one whether to trim) while a
    download finishes: the part is renamed into its entry between the count's two listings.
    Events force that interleaving: the count lists one kind, waits until the fetch has
    renamed its file and returned, then lists the other. The file is counted (twice, at worst),
    never missed, whichever listing comes first."""
    import threading

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes(b"{}" + b" " * 4998)
    size = 5000
    store = open_store(parse(str(src)))
    files = store.list()
    read_may_return = threading.Event()
    real_read = store.read

    def held_read(*args, **kwargs):
        assert read_may_return.wait(60), "the test never let the read return"
        return real_read(*args, **kwargs)

    monkeypatch.setattr(store, "read", held_read)
    cache = Cache(tmp_path / "cache", 10 << 20)
    fetched: dict[str, Path] = {}
    fetcher = threading.Thread(target=lambda: fetched.setdefault("dir", cache.fetch(store, files)))
    fetcher.start()
    try:
        wait_until(lambda: list((cache.root / "tmp").glob("*.part")), 60, what="the download's part file")

        listed_once, may_go_on = threading.Event(), threading.Event()
        calls: list[str] = []

        def pausing(name, real):
            def wrapper(self):
                out = real(self)
                if threading.current_thread().name == "counter":
                    calls.append(name)
                    if len(calls) == 1:  # between the count's two listings
                        listed_once.set()
                        assert may_go_on.wait(60), "the test never let the count go on"
                return out
            return wrapper

        monkeypatch.setattr(Cache, "_entries", pausing("entries", Cache._entries))
        monkeypatch.setattr(Cache, "_parts_size", pausing("parts", Cache._parts_size))
        counted: list[int] = []
        counter = threading.Thread(target=lambda: counted.append(cache.usage()), name="counter")
        counter.start()
        assert listed_once.wait(60), "the count did not start"
        read_may_return.set()  # the download completes: its part is renamed into its entry
        fetcher.join(60)
        assert not fetcher.is_alive() and "dir" in fetched
        assert not list((cache.root / "tmp").glob("*.part")) and len(_entries(cache.root)) == 1
        may_go_on.set()
        counter.join(60)
        assert sorted(calls) == ["entries", "parts"]
        assert counted and counted[0] >= size, (calls, counted)  # the renamed file was not missed
    finally:
        read_may_return.set()
        fetcher.join(60)
    monkeypatch.undo()
    assert cache.usage() == size  # quiet: exact
    cache.release(fetched["dir"])


def test_a_lock_not_taken_never_closes_a_descriptor_twice(tmp_path, monkeypatch):
    """``_flock(blocking=False)`` on a lock held elsewhere closes its descriptor and yields
    None. When the with-body then raises, the descriptor may not be closed a second time: by
    then its number may be another thread's open file (a lock whose flock would silently go,
    a part being written). The body opens a file, which takes that lowest free number, and
    raises; every close the lock makes in this thread is recorded."""
    import fcntl
    import threading

    from layertrack.workers.fetch import _flock

    lock = tmp_path / "entry.lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)  # held elsewhere
    other = tmp_path / "other"
    other.write_bytes(b"another thread's file")
    me = threading.get_ident()
    opened: list[int] = []
    closed: list[int] = []
    real_open, real_close = os.open, os.close

    def recording_open(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        if threading.get_ident() == me:
            opened.append(fd)
        return fd

    def recording_close(fd):
        if threading.get_ident() == me:
            closed.append(fd)
        return real_close(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "close", recording_close)
    reused = None
    try:
        with pytest.raises(RuntimeError, match="the body failed"), _flock(lock, blocking=False) as fd:
            assert fd is None
            (number,) = opened
            reused = real_open(other, os.O_RDONLY)  # the number just closed, most likely
            raise RuntimeError("the body failed")
    finally:
        monkeypatch.undo()
    try:
        assert closed == [number], f"the lock closed {closed} (its descriptor was {number})"
        assert os.fstat(reused).st_ino == other.stat().st_ino  # the other file is still open
    finally:
        with contextlib.suppress(OSError):  # closed already when the lock closed it
            os.close(reused)
        os.close(holder)
