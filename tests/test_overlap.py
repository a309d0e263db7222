"""A remote checkpoint is scored while it is fetched (workers/remote.py): weight files come in
the order their blocks run, each block reads a file only once it is complete in the cache, and
block 0 runs while the last weight file is still on its way. Against moto's S3 server on
loopback; shown by the order of the job's events, never by timing it (bench/overlap_bench.py
measures how much time the overlap saves)."""

from __future__ import annotations

import threading

import pytest
from layertrack.workers.fetch import Cache
from layertrack.workers.locations import parse
from layertrack.workers.remote import fetch_and_score, fetch_order, read_remote_header
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from layertrack.workers.stores import checkpoint_files, open_store

BUCKET = "overlap-tests"
METRICS = ("linearity", "linearity_nores", "cosine", "norm_ratio", "anisotropy")
CONFIG = ScoreConfig(max_tokens=6144, seq_len=128)


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, tokenizer):
    """A Llama of 8 blocks (d = 128) in about ten safetensors shards."""
    from tiny_models import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("overlap") / "ckpt", "llama", tokenizer, seed=5, hidden=128,
                            layers=8, max_shard_size="300KB")


def _store(s3, prefix, directory):
    c = s3.client()
    if BUCKET not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
        c.create_bucket(Bucket=BUCKET)
    s3.upload_dir(BUCKET, prefix, directory)
    store = open_store(parse(f"s3://{BUCKET}/{prefix}"))
    return store, checkpoint_files(store.list(), store)


def _max_delta(a, b) -> float:
    return max(abs(x - y) for m in METRICS for x, y in zip(a.scores.metric(m), b.scores.metric(m), strict=True))


def test_weight_files_are_fetched_in_block_order(s3_env, sharded_model):
    store, files = _store(s3_env, "order/ckpt", sharded_model)
    weights = [f for f in files if f.key.endswith(".safetensors")]
    assert len(weights) >= 5
    headers = {f.key: read_remote_header(store, f) for f in weights}
    ordered = fetch_order(files, headers, n_blocks=8)
    assert [f.key for f in ordered[: len(files) - len(weights)]] == sorted(f.key for f in files if f not in weights)
    first_block = []
    for f in ordered[len(files) - len(weights):]:
        names = [n for n in headers[f.key][0] if n != "__metadata__"]
        blocks = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
        first_block.append(-1 if any("embed_tokens" in n for n in names) else min(blocks, default=99))
    assert first_block[0] == -1  # the embeddings' file first
    assert first_block == sorted(first_block)


def _blocks_of(header: dict) -> set[int]:
    return {int(n.split(".")[2]) for n in header if n.startswith("model.layers.")}


def test_blocks_are_scored_while_later_files_still_arrive(s3_env, sharded_model, tmp_path):
    """Proven by the order of the job's events (``fetch_and_score(on_event=...)``), not by a
    clock: the time it saves is bench/overlap_bench.py's figure."""
    store, files = _store(s3_env, "slow/ckpt", sharded_model)
    local = score_checkpoint(str(sharded_model), config=CONFIG)
    weights = [f for f in files if f.key.endswith(".safetensors")]
    headers = {f.key: read_remote_header(store, f) for f in weights}
    blocks = {key: _blocks_of(h) for key, (h, _) in headers.items()}
    block0 = {key for key, b in blocks.items() if 0 in b}
    last = fetch_order(files, headers, n_blocks=8)[-1].key  # the LM head's file
    assert len(block0) >= 2 and last not in block0

    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    fetching, block0_read = threading.Event(), threading.Event()

    def on_event(kind: str, key: str) -> None:
        with lock:
            events.append((kind, key))
            fetching.set()  # the headers were all read before the first file arrives
            if block0 <= {k for e, k in events if e == "ready"}:
                block0_read.set()

    def hold_the_last_file(key: str) -> None:
        # its GET waits until block 0 has read all its tensors: a job that scored nothing before
        # its last file arrived leaves block 0 unread, and the GET goes ahead after the deadline
        if fetching.is_set() and key.endswith("/" + last):
            block0_read.wait(timeout=90)  # under the store client's request timeout

    s3_env.on_get = hold_the_last_file
    cache = Cache(tmp_path / "overlapped", 1 << 30)
    out = fetch_and_score(store, files, cache, config=CONFIG, on_event=on_event)
    cache.release(out.checkout)

    def at(kind: str, key: str) -> int:
        return events.index((kind, key))

    assert sorted(k for e, k in events if e == "arrived") == sorted(f.key for f in files)  # each file once
    wanted = [k for e, k in events if e == "wanted"]
    # the scoring waited for every file holding a tensor of its model (not the LM head's: no
    # replaceability here), each once, the embeddings' file first, then block by block
    assert sorted(wanted) == sorted(k for k, (h, _) in headers.items() if any(n.startswith("model.") for n in h))
    assert "model.embed_tokens.weight" in headers[wanted[0]][0]
    assert [min(blocks[k], default=8) for k in wanted[1:]] == sorted(min(blocks[k], default=8) for k in wanted[1:])
    for k in wanted:  # a block read a file only once it was complete
        assert at("arrived", k) < at("ready", k), k
    # block 0 had read all its tensors before the last weight file was in
    assert max(at("ready", k) for k in block0) < at("arrived", last), events
    # the weights fit: each module read its tensors when it first ran, and kept them
    assert out.result.plan["mode"] == "resident" and out.result.plan["loaded"] == "as the blocks first run"
    assert out.bytes_fetched == sum(f.size for f in files)
    assert _max_delta(out.result, local) <= 1e-10


def test_a_failed_fetch_fails_the_job_with_the_stores_error(s3_env, sharded_model, tmp_path):
    store, files = _store(s3_env, "cut/ckpt", sharded_model)
    last = sorted(f.key for f in files if f.key.endswith(".safetensors"))[-1]
    s3_env.on_get = lambda key: "cut" if key.endswith(last) else None
    cache = Cache(tmp_path / "cache", 1 << 30)
    with pytest.raises(Exception) as e:
        fetch_and_score(store, files, cache, config=CONFIG)
    assert getattr(e.value, "code", None) == "store_unreachable", repr(e.value)
    assert list((tmp_path / "cache" / "checkouts").iterdir()) == []  # nothing left checked out
