"""Azure Blob Storage and Google Cloud Storage through the service, on their emulators.

One scoring round trip per store, with real components: the API server and a Celery worker
(PostgreSQL, a private Redis), and the store's emulator on loopback (tests/stores_fixtures.py):

- ``az://`` — Azurite's blob service (the Azure Storage emulator, a Node program from the npm
  registry, installed on first use into ``~/.cache/layertrack-test/azurite``, outside the
  repository; the test fails, never skips, when it cannot be installed or started). The worker
  reaches it through the standard ``AZURE_STORAGE_CONNECTION_STRING``.
- ``gs://`` — gcp-storage-emulator, reached through ``STORAGE_EMULATOR_HOST``. obstore speaks
  only the GCS XML API, of which the emulator serves neither the listing nor downloads with the
  headers obstore requires, so the worker talks to a small XML front that answers those from
  the emulator's JSON API and passes the object bytes through (see ``GCSEmulator``).

For each, a sharded tiny checkpoint uploaded to the store and submitted as a URI is fetched
by the worker (progress: every byte fetched from the store) and scores exactly like the same
checkpoint submitted as a local path (max |Δ| ≤ 1e-12 over every stored score).
"""

from __future__ import annotations

import uuid

import pytest
from services import store_service
from stores_fixtures import assert_scored_like_local, azurite, gcs_emulator, upload_checkpoint  # noqa: F401  (fixtures)

CONTAINER = "ckpts"  # the Azure container (the GCS bucket is the fixture's, "mlckpts")
PREFIX = "runs"
CFG = {"max_tokens": 600, "seq_len": 64}
REMOTE_ENV = {
    "LAYERTRACK_FETCH_MAX_RETRIES": "3",
    "LAYERTRACK_PROGRESS_INTERVAL_S": "0.3",
}


def uid() -> str:
    return uuid.uuid4().hex[:8]


def service_for(tmp_path_factory, redis_server, name: str, root: str, store_env: dict[str, str]):
    """A live service (API + one worker) whose checkpoint roots are its local directory and
    ``root``, with the store's variables in the environment of its processes. A database of
    its own: the two services of this module run at the same time, and a service's sweeper
    requeues the jobs of its database onto its own broker."""
    return store_service(tmp_path_factory.mktemp(name), redis_server.new_url(), [root], {**store_env, **REMOTE_ENV})


@pytest.fixture(scope="module")
def az_live(tmp_path_factory, redis_server, azurite):  # noqa: F811
    azurite.create_container(CONTAINER)
    with service_for(tmp_path_factory, redis_server, "az-live", f"az://{CONTAINER}/{PREFIX}/",
                     azurite.env()) as svc:
        yield svc


@pytest.fixture(scope="module")
def gs_live(tmp_path_factory, redis_server, gcs_emulator):  # noqa: F811
    with service_for(tmp_path_factory, redis_server, "gs-live", f"gs://{gcs_emulator.bucket}/{PREFIX}/",
                     gcs_emulator.env()) as svc:
        yield svc


def round_trip(live, tokenizer, scheme: str, upload, uri_of, seed: int) -> dict:
    """Build a sharded tiny checkpoint under the service's local root, ``upload(key prefix,
    directory)`` it, submit it as ``uri_of(key prefix)`` and from its local path, and check
    that the remote job fetched it all and scored it like the local one; the remote job."""
    name = f"{scheme}-{uid()}"
    local, key_prefix = upload_checkpoint(live, tokenizer, name, upload, prefix=PREFIX, shard="60KB", seed=seed)
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert len(shards) > 1, shards
    uri = uri_of(key_prefix)
    with live.client() as c:
        remote = c.submit(run=f"{scheme}-{name}", step=1, uri=uri, config=CFG)
        assert remote["uri"] == uri and remote["content_fingerprint"] is None, remote  # the API read nothing
        local_job = c.submit(run=f"local-{name}", step=1, uri=str(local), config=CFG)
        done = c.wait(remote["id"], timeout=300, poll=0.5)
        local_done = c.wait(local_job["id"], timeout=300, poll=0.5)
    p, _weights = assert_scored_like_local(live, done, local_done, local, f"{scheme}://")
    assert p["bytes_fetched"] == p["bytes_total"], p  # a fresh cache: every byte came from the store
    return done


def test_a_checkpoint_in_azure_blob_storage_scores_like_the_local_checkpoint(az_live, azurite, tokenizer):  # noqa: F811
    round_trip(az_live, tokenizer, "az", lambda prefix, d: azurite.upload_dir(CONTAINER, prefix, d),
               lambda prefix: f"az://{CONTAINER}/{prefix}", seed=21)


def test_a_checkpoint_in_google_cloud_storage_scores_like_the_local_checkpoint(gs_live, gcs_emulator,  # noqa: F811
                                                                               tokenizer):
    before = gcs_emulator.object_bytes
    round_trip(gs_live, tokenizer, "gs", gcs_emulator.upload_dir, lambda prefix: f"gs://{gcs_emulator.bucket}/{prefix}",
               seed=22)
    assert gcs_emulator.object_bytes > before  # the objects were served from the emulator
