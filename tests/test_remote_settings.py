"""Remote checkpoint locations on the API side, without a store: the allowed locations
(LAYERTRACK_CHECKPOINT_ROOTS, `up --roots`), what the API checks and stores for a remote URI,
and how the CLI shows a job's progress."""

from __future__ import annotations

import pytest
from layertrack.service import jobs
from layertrack.service.cli.remote import progress_line
from layertrack.service.cli.up import checkpoint_roots
from layertrack.service.settings import Settings
from layertrack.workers import locations
from layertrack.workers.errors import CheckpointOutsideRoots, CredentialsInURI, InvalidCheckpointURI


def test_roots_take_directories_and_uri_prefixes_separated_by_commas_or_colons(tmp_path):
    s = Settings(checkpoint_roots=f"{tmp_path}:s3://ml-ckpts/runs/,hf://EleutherAI/:http://10.0.0.5:8080/ckpts",
                 data_dir=tmp_path)
    assert s.roots == [tmp_path]
    assert [r.uri() for r in s.remote_roots] == ["s3://ml-ckpts/runs", "hf://EleutherAI/",
                                                 "http://10.0.0.5:8080/ckpts"]
    assert s.cache_root == tmp_path / "cache"
    assert Settings(data_dir=tmp_path, cache_dir=str(tmp_path / "c")).cache_root == tmp_path / "c"
    only_remote = Settings(checkpoint_roots="s3://ml-ckpts/runs/", data_dir=tmp_path)
    assert only_remote.roots == [] and len(only_remote.remote_roots) == 1


def test_a_root_with_credentials_is_refused_without_repeating_them(tmp_path):
    with pytest.raises(ValueError) as e:
        Settings(checkpoint_roots="s3://AKIA:hunter2secret@ml-ckpts/runs/", data_dir=tmp_path)
    assert "LAYERTRACK_CHECKPOINT_ROOTS" in str(e.value) and "hunter2secret" not in str(e.value)


def test_defaults_of_the_fetch_settings(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert s.cache_max_bytes == 50 * 2**30 and s.incomplete_deadline_s == 3600 and s.fetch_allow_hosts == ""


def test_up_roots_keep_uri_prefixes_and_refuse_credentials(tmp_path):
    assert checkpoint_roots([str(tmp_path), "s3://ml-ckpts/runs/", "hf://EleutherAI/"]) == [
        tmp_path, "s3://ml-ckpts/runs", "hf://EleutherAI/"]
    from layertrack.service.cli.common import CliError

    with pytest.raises(CliError, match="credentials in URIs are refused") as e:
        checkpoint_roots(["s3://key:topsecret@ml-ckpts/runs/"])
    assert "topsecret" not in str(e.value)
    with pytest.raises(CliError, match="not a directory"):
        checkpoint_roots([str(tmp_path / "missing")])


@pytest.mark.parametrize(("uri", "remote"), [
    ("/ckpts/step-1", False), ("relative/step-1", False), ("file:///ckpts/step-1", False),
    ("FILE:///ckpts/step-1", False), ("C:\\ckpts", False), ("s3://b/x", True), ("hf://org/repo", True),
    ("https://host/x/", True), ("ftp://host/x", True),
])
def test_is_remote(uri, remote):
    assert jobs.is_remote(uri) is remote


def test_check_remote_normalizes_and_matches_on_segment_boundaries():
    roots = locations.parse_roots("s3://ml-ckpts/runs/,hf://EleutherAI/")
    uri, fp = jobs.check_remote("s3://ml-ckpts/runs/a/step-1/", roots)
    assert uri == "s3://ml-ckpts/runs/a/step-1"
    assert fp == jobs.provisional_fingerprint(uri) and fp.startswith("uri:") and len(fp) == 68
    assert jobs.check_remote("s3://ml-ckpts/runs/a/step-1", roots) == (uri, fp)  # the same job again
    assert jobs.check_remote("hf://EleutherAI/pythia-70m@step1000", roots)[0] == "hf://EleutherAI/pythia-70m@step1000"
    for outside in ("s3://ml-ckpts/runs-evil/a", "s3://ml-ckpts/other", "s3://other/runs/a",
                    "hf://EleutherAIx/pythia", "gs://ml-ckpts/runs/a"):
        with pytest.raises(CheckpointOutsideRoots, match="LAYERTRACK_CHECKPOINT_ROOTS"):
            jobs.check_remote(outside, roots)
    with pytest.raises(CredentialsInURI):
        jobs.check_remote("s3://k:s@ml-ckpts/runs/a", roots)
    with pytest.raises(InvalidCheckpointURI, match="unsupported URI scheme 'ftp'"):
        jobs.check_remote("ftp://host/x", roots)


def test_no_allowed_directory_means_no_local_checkpoint():
    with pytest.raises(CheckpointOutsideRoots, match="local checkpoints are not allowed"):
        jobs.require_roots([])


def test_progress_lines():
    job = {"status": "running", "progress": {"phase": "fetching", "bytes_done": 3 * 2**20,
                                             "bytes_total": 12 * 2**20, "seconds": 2.25, "message": "x"}}
    assert progress_line(job) == "  fetching 3.0 MiB / 12.0 MiB (25 %), 2.2 s"
    job = {"status": "queued", "progress": {"phase": "waiting", "message": "waiting for the upload"}}
    assert progress_line(job) == "  waiting: waiting for the upload"
    assert progress_line({"status": "succeeded", "progress": {"phase": "scoring"}}) is None
    assert progress_line({"status": "running", "progress": None}) is None


@pytest.mark.parametrize(("value", "expected"), [
    ("268435456", 268435456), ("256MiB", 256 * 2**20), ("24GiB", 24 * 2**30), ("512MB", 512 * 10**6),
    ("1.5G", int(1.5 * 2**30)), ("", None),
])
def test_max_memory_takes_bytes_or_a_size(tmp_path, monkeypatch, value, expected):
    monkeypatch.setenv("LAYERTRACK_MAX_MEMORY", value)
    assert Settings(data_dir=tmp_path).max_memory == expected


@pytest.mark.parametrize("value", ["lots", "-5", "0", "12 parsecs"])
def test_a_max_memory_that_is_not_a_size_is_refused_with_the_variable_named(tmp_path, monkeypatch, value):
    monkeypatch.setenv("LAYERTRACK_MAX_MEMORY", value)
    with pytest.raises(ValueError, match="LAYERTRACK_MAX_MEMORY"):
        Settings(data_dir=tmp_path)
