"""A local checkpoint's identity (workers/checkpoint.py, ``IDENTITY``) changes when its bytes
do: a checkpoint overwritten with new weights of the same shapes is a new job with its own
scores, never the old job's; the same directory untouched is the same job; and a checkpoint
rewritten between submission and scoring fails with ``checkpoint_changed``."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from datetime import datetime

import pytest
from layertrack.workers.checkpoint import inspect_checkpoint
from layertrack.workers.errors import CheckpointChanged
from layertrack.workers.scoring import ScoreConfig, score_checkpoint
from tiny_models import build_checkpoint

CFG = {"max_tokens": 1024, "seq_len": 64}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, tokenizer):
    """Two checkpoints of the same architecture and shapes, with different weights."""
    root = tmp_path_factory.mktemp("identity")
    return (build_checkpoint(root / "v1", "llama", tokenizer, seed=1),
            build_checkpoint(root / "v2", "llama", tokenizer, seed=2))


@pytest.fixture()
def ckpt(two_versions, tmp_path):
    """A fresh copy of the first version, to change."""
    path = tmp_path / "ckpt"
    shutil.copytree(two_versions[0], path)
    return path


def _overwrite(target, source) -> None:
    """Write ``source``'s weight files over ``target``'s, in place (same names, sizes, inodes)."""
    for f in sorted(source.glob("*.safetensors")):
        with open(f, "rb") as src, open(target / f.name, "r+b") as dst:
            shutil.copyfileobj(src, dst)


def _fp(path) -> str:
    return inspect_checkpoint(path, check_causal_lm=False).fingerprint


def test_the_identity_follows_the_bytes_not_the_shapes(two_versions, ckpt):
    first = _fp(ckpt)
    assert _fp(ckpt) == first  # untouched: the same
    sizes = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    inodes = {f.name: f.stat().st_ino for f in ckpt.iterdir()}
    _overwrite(ckpt, two_versions[1])
    assert {f.name: f.stat().st_size for f in ckpt.iterdir()} == sizes  # what the old fingerprint compared
    assert {f.name: f.stat().st_ino for f in ckpt.iterdir()} == inodes
    assert _fp(ckpt) != first


def test_a_rewrite_with_the_old_times_restored_still_changes_it(two_versions, ckpt):
    """mtime can be set back (cp -p, rsync -t, os.utime); the status-change time cannot."""
    first = _fp(ckpt)
    times = {f.name: (f.stat().st_atime_ns, f.stat().st_mtime_ns) for f in ckpt.glob("*.safetensors")}
    _overwrite(ckpt, two_versions[1])
    for name, ns in times.items():
        os.utime(ckpt / name, ns=ns)
    assert _fp(ckpt) != first


def test_one_changed_tensor_value_changes_it(ckpt):
    first = _fp(ckpt)
    weights = next(ckpt.glob("*.safetensors"))
    with open(weights, "r+b") as f:  # the last bytes of the data: a sampled range ends there
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    assert _fp(ckpt) != first


def test_a_copy_elsewhere_is_another_checkpoint_and_config_changes_count(two_versions, tmp_path):
    v1, _ = two_versions
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(v1, a)
    shutil.copytree(v1, b)
    assert _fp(a) != _fp(b)  # other files (inodes): scored again rather than trusted
    before = _fp(a)
    cfg = (a / "config.json").read_text()
    (a / "config.json").write_text(cfg.replace("}", ', "layertrack_note": 1}', 1) if cfg.rstrip().endswith("}")
                                   else cfg)
    assert _fp(a) != before


def test_pending_files_count_by_name_and_size(ckpt):
    weights = next(ckpt.glob("*.safetensors"))
    size = weights.stat().st_size
    weights.unlink()
    a = inspect_checkpoint(ckpt, check_causal_lm=False, pending={weights.name: size}).fingerprint
    b = inspect_checkpoint(ckpt, check_causal_lm=False, pending={weights.name: size}).fingerprint
    c = inspect_checkpoint(ckpt, check_causal_lm=False, pending={weights.name: size + 1}).fingerprint
    assert a == b != c


def test_scoring_refuses_a_checkpoint_that_is_no_longer_the_one_submitted(two_versions, ckpt):
    submitted = _fp(ckpt)
    _overwrite(ckpt, two_versions[1])
    with pytest.raises(CheckpointChanged) as e:
        score_checkpoint(str(ckpt), config=ScoreConfig(**CFG), expect_fingerprint=submitted)
    assert e.value.code == "checkpoint_changed" and "submit it again" in e.value.message
    out = score_checkpoint(str(ckpt), config=ScoreConfig(**CFG), expect_fingerprint=_fp(ckpt))
    assert out.checkpoint_fingerprint == _fp(ckpt)


# ------------------------------------------------------------------ through the service


@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_server):
    """An API server whose worker the tests start themselves (jobs wait queued until then)."""
    from services import live_service

    with live_service(tmp_path_factory.mktemp("identity-live"), redis_server.new_url(), db_url=pg_url,
                      workers=()) as svc:
        yield svc


def _one_worker(live) -> None:
    if not any(p.poll() is None for p in live.workers.values()):
        live.start_worker(f"w-{uuid.uuid4().hex[:6]}", "gpu")


def _stored(c, run: str) -> dict[int, float]:
    return {s["layer"]: s["values"][-1] for s in c.scores(run, metric="linearity")["series"]}


def test_a_rewritten_checkpoint_is_a_new_job_and_its_scores_replace_the_old(live, two_versions):
    _one_worker(live)
    v1, v2 = two_versions
    run = f"ident-{uuid.uuid4().hex[:6]}"
    path = live.roots / run / "step-1"
    shutil.copytree(v1, path)
    with live.client() as c:
        job, created = c.submit_checked(run=run, step=1, uri=str(path), config=CFG)
        assert created
        assert c.wait(job["id"], timeout=300, poll=0.2)["status"] == "succeeded", live.logs()
        again, created = c.submit_checked(run=run, step=1, uri=str(path), config=CFG)
        assert (again["id"], created) == (job["id"], False)  # the same bytes: the same job
        old = _stored(c, run)

        _overwrite(path, v2)
        new, created = c.submit_checked(run=run, step=1, uri=str(path), config=CFG)
        assert created and new["id"] != job["id"]
        assert c.wait(new["id"], timeout=300, poll=0.2)["status"] == "succeeded", live.logs()
        got = _stored(c, run)
    want = score_checkpoint(str(v2), config=ScoreConfig(**CFG)).scores.metric("linearity")
    assert max(abs(got[i] - want[i]) for i in range(len(want))) <= 1e-10
    assert max(abs(got[i] - old[i]) for i in range(len(want))) > 1e-6  # not the old scores


def test_a_checkpoint_rewritten_before_its_job_ran_fails_with_checkpoint_changed(live, two_versions):
    for name in list(live.workers):  # no worker: the job waits, queued
        live.kill_worker(name, signal.SIGTERM)
    v1, v2 = two_versions
    run = f"ident-{uuid.uuid4().hex[:6]}"
    path = live.roots / run / "step-1"
    shutil.copytree(v1, path)
    with live.client() as c:
        job, created = c.submit_checked(run=run, step=1, uri=str(path), config=CFG)
        assert created and c.job(job["id"])["status"] == "queued"
        _overwrite(path, v2)  # while it waits for a worker
        _one_worker(live)
        done = c.wait(job["id"], timeout=300, poll=0.2)
    assert done["status"] == "failed", done
    assert done["error_code"] == "checkpoint_changed" and "submit it again" in done["error"], done
    # its duration counts from the submission (the wait for a worker included), not from its start
    queued, started, finished = (datetime.fromisoformat(done[k]) for k in ("queued_at", "started_at", "finished_at"))
    assert queued < started <= finished
    assert done["duration_s"] == pytest.approx((finished - queued).total_seconds(), abs=1e-3)
    assert done["run_s"] == pytest.approx((finished - started).total_seconds(), abs=1e-3)
    assert done["duration_s"] > done["run_s"]
