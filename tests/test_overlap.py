"""A remote checkpoint is scored while it is fetched (workers/remote.py): weight files come in
the order their blocks run, each block starts once its file is in the cache, and a job whose
fetch is slowed takes less than the fetch and the scoring one after the other. Against moto's
S3 server on loopback, with a delay on every object GET."""

from __future__ import annotations

import time

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


def test_a_slowed_fetch_overlaps_the_scoring(s3_env, sharded_model, tmp_path):
    store, files = _store(s3_env, "slow/ckpt", sharded_model)
    t = time.perf_counter()
    local = score_checkpoint(str(sharded_model), config=CONFIG)
    compute = time.perf_counter() - t
    # a link throttled so that fetching the weights (two files at a time) takes about as long
    # as the scoring
    weights = sum(f.size for f in files if f.key.endswith(".safetensors"))
    s3_env.bytes_per_s = weights / 2 / compute
    t = time.perf_counter()
    cache = Cache(tmp_path / "alone", 1 << 30)
    cache.release(cache.fetch(store, files, files_at_once=2))
    fetch = time.perf_counter() - t

    t = time.perf_counter()
    cache = Cache(tmp_path / "overlapped", 1 << 30)
    out = fetch_and_score(store, files, cache, config=CONFIG)
    together = time.perf_counter() - t
    cache.release(out.checkout)
    figures = f"fetch {fetch:.1f} s, scoring {compute:.1f} s, overlapped {together:.1f} s"
    # the weights fit: each module read its tensors when it first ran, and kept them
    assert out.result.plan["mode"] == "resident" and out.result.plan["loaded"] == "as the blocks first run"
    assert out.bytes_fetched == sum(f.size for f in files)
    print(figures)
    assert together < fetch + compute, figures
    assert together < 0.85 * (fetch + compute), figures  # clearly overlapped, not just a little faster
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
