"""Webhook and hook-source signing secrets are stored encrypted (Fernet, keys from
LAYERTRACK_SECRET_KEYS or <data dir>/secret.key): a database row alone reveals no secret;
the API and the webhook worker refuse to start when stored secrets cannot be decrypted;
plaintext rows from before encryption are encrypted at start; `layertrack rotate-secrets`
re-encrypts every row with the newest key."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet, MultiFernet
from layertrack.service import crypto
from layertrack.service.db import get_sessionmaker, session_scope, upgrade
from layertrack.service.models import HookSource, Webhook
from layertrack.service.settings import Settings
from services import Service, layertrack_exe, wait_until
from sqlalchemy import create_engine, text

GIVEN = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def raw_rows(db_url: str, table: str) -> list[dict]:
    """Every column of every row, as a dump would have them."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(text(f"SELECT * FROM {table}"))]
    finally:
        engine.dispose()


def reveals(rows: list[dict], secret: str) -> bool:
    """Whether any column holds the secret, its base64 part, or its raw bytes in any form."""
    body = secret.removeprefix("whsec_")
    raw = base64.b64decode(body)
    needles = {secret, body, raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    return any(n in str(v) for row in rows for v in row.values() for n in needles)


def test_a_database_row_alone_reveals_no_secret(api_service):
    with api_service.http() as h:
        w = h.post("/v1/webhooks", json={"url": "http://8.8.8.8/hook", "secret": GIVEN})
        assert w.status_code == 201, w.text
        generated = h.post("/v1/webhooks", json={"url": "http://8.8.8.8/other"}).json()
        src = h.post("/v1/hook-sources", json={"name": f"secrets-{api_service.backend}"}).json()
    assert w.json()["secret"] == GIVEN
    webhook_rows, source_rows = raw_rows(api_service.db_url, "webhooks"), raw_rows(api_service.db_url, "hook_sources")
    for rows, secret in ((webhook_rows, GIVEN), (webhook_rows, generated["secret"]),
                         (source_rows, src["secret"])):
        assert not reveals(rows, secret)
    assert all(r["secret"].startswith("fernet:") for r in webhook_rows + source_rows)
    # the key the embedded setup made: in the data directory, readable by its owner only
    key_file = api_service.data_dir / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    box = Fernet(key_file.read_text().strip())
    stored = {r["id"]: r["secret"] for r in webhook_rows}
    assert box.decrypt(stored[w.json()["id"]].removeprefix("fernet:").encode()).decode() == GIVEN
    with api_service.http() as h:  # never shown again, and still usable: a test event is signed with it
        assert all(x["secret"] is None for x in h.get("/v1/webhooks").json())
        h.delete(f"/v1/webhooks/{w.json()['id']}")
        h.delete(f"/v1/webhooks/{generated['id']}")


def _sealed_database(tmp_path: Path) -> tuple[str, str, Settings]:
    """An SQLite database with one encrypted hook-source secret and one webhook secret stored
    in clear (as before encryption); the key lives in another directory than the service's."""
    db = f"sqlite:///{tmp_path / 'lt.db'}"
    upgrade(db)
    key = crypto.generate_key()
    keyed = Settings(data_dir=tmp_path / "elsewhere", database_url=db, secret_keys=key)
    with session_scope(db) as s:
        s.add(HookSource(name="sealed", secret=crypto.seal(GIVEN, keyed)))
        s.add(Webhook(url="http://8.8.8.8/hook", events=["job.succeeded"], secret=GIVEN))
    return db, key, keyed


def test_the_api_and_the_webhook_worker_refuse_to_start_without_the_key(tmp_path):
    db, key, _keyed = _sealed_database(tmp_path)
    roots = tmp_path / "ckpts"
    roots.mkdir()

    def service(name: str, env: dict[str, str] | None = None) -> Service:
        (tmp_path / name).mkdir()
        return Service(tmp=tmp_path / name, db_url=db, broker_url="filesystem://", roots=roots,
                       extra_env={"LAYERTRACK_SWEEP_INTERVAL_S": "0", **(env or {})})

    svc = service("nokey")
    try:
        with pytest.raises(RuntimeError) as e:
            svc.start_api(timeout=60)
        assert "encrypted webhook/hook-source secret(s) but there is no key" in str(e.value)
        assert "LAYERTRACK_SECRET_KEYS" in str(e.value) and "refusing to start" in str(e.value)
        assert not (svc.data_dir / "secret.key").exists()  # no new key was made up
        worker = svc.start_worker("hooks", "webhooks", pool="threads")
        code = wait_until(lambda: worker.poll() is not None and (worker.returncode,), 120,
                          what="the webhook worker to refuse to start")[0]
        log = (svc.log_dir / "worker-hooks.log").read_text()
        assert code != 0 and "layertrack worker: the database holds 1 encrypted" in log, log[-3000:]
        # a scoring worker never reads a secret: it starts
        scorer = svc.start_worker("scorer", "gpu")
        wait_until(lambda: "ready." in (svc.log_dir / "worker-scorer.log").read_text(), 120,
                   what="the scoring worker to start")
        assert scorer.poll() is None
    finally:
        svc.stop()

    svc = service("wrongkey", {"LAYERTRACK_SECRET_KEYS": crypto.generate_key()})
    try:
        with pytest.raises(RuntimeError) as e:
            svc.start_api(timeout=60)
        assert "cannot be decrypted with the configured keys (LAYERTRACK_SECRET_KEYS)" in str(e.value)
    finally:
        svc.stop()

    # with the key (after a newer one): it starts, and the secret stored in clear is encrypted
    newer = crypto.generate_key()
    svc = service("rightkey", {"LAYERTRACK_SECRET_KEYS": f"{newer},{key}"})
    try:
        svc.start_api(timeout=60)
        assert httpx.get(svc.url + "/healthz").status_code == 200
    finally:
        svc.stop()
    rows = raw_rows(db, "webhooks")
    assert rows[0]["secret"].startswith("fernet:") and not reveals(rows, GIVEN)
    assert crypto.unseal(rows[0]["secret"], Settings(data_dir=tmp_path, secret_keys=newer)) == GIVEN  # the newest


def test_plaintext_rows_are_encrypted_at_start_and_still_sign(tmp_path):
    db = f"sqlite:///{tmp_path / 'lt.db'}"
    upgrade(db)
    settings = Settings(data_dir=tmp_path / "data", database_url=db)
    with session_scope(db) as s:
        s.add(HookSource(name="legacy", secret=GIVEN))
    assert crypto.unseal(GIVEN, settings) == GIVEN  # a plaintext row still works before it is encrypted
    crypto.startup_check(settings, encrypt_plaintext=True)
    [row] = raw_rows(db, "hook_sources")
    assert row["secret"].startswith("fernet:") and not reveals([row], GIVEN)
    assert stat.S_IMODE((tmp_path / "data" / "secret.key").stat().st_mode) == 0o600
    # a hook signed with the secret is accepted through the encrypted row
    from layertrack.service import hooks
    from standardwebhooks.webhooks import Webhook as Signer

    body = b'{"run": "r", "step": 1, "uri": "/x"}'
    when = datetime.now(UTC)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(when.timestamp())),
               "webhook-signature": Signer(GIVEN).sign("msg_1", when, body.decode())}
    with get_sessionmaker(db)() as s:
        s.info["settings"] = settings
        assert hooks.verify(s, body, headers, "legacy").msg_id == "msg_1"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([layertrack_exe(), *args], env=env, capture_output=True, text=True, timeout=120)


def opens(stored: str, *keys: str) -> bool:
    try:
        MultiFernet([Fernet(k) for k in keys]).decrypt(stored.removeprefix("fernet:").encode())
    except Exception:
        return False
    return True


def test_rotate_secrets_re_encrypts_every_row_with_the_newest_key(tmp_path):
    db = f"sqlite:///{tmp_path / 'lt.db'}"
    upgrade(db)
    data = tmp_path / "data"
    settings = Settings(data_dir=data, database_url=db)
    with session_scope(db) as s:
        s.add(HookSource(name="sealed", secret=crypto.seal(GIVEN, settings)))  # makes data/secret.key
        s.add(Webhook(url="http://8.8.8.8/hook", events=["job.succeeded"], secret=GIVEN))  # in clear
    [first] = (data / "secret.key").read_text().split()
    env = {k: v for k, v in os.environ.items() if k != "LAYERTRACK_SECRET_KEYS"}
    env.update(LAYERTRACK_DATABASE_URL=db, LAYERTRACK_DATA_DIR=str(data))

    # the key-file setup: a new key on top of the file, every row re-encrypted with it
    out = cli("rotate-secrets", "--new-key", env=env)
    assert out.returncode == 0, out.stderr
    assert "1 secret(s) re-encrypted with the newest key, 1 encrypted that were stored in clear" in out.stdout
    newest, older = (data / "secret.key").read_text().split()
    assert older == first and newest != first
    assert stat.S_IMODE((data / "secret.key").stat().st_mode) == 0o600
    stored = [r["secret"] for t in ("webhooks", "hook_sources") for r in raw_rows(db, t)]
    assert all(opens(v, newest) and not opens(v, first) for v in stored)

    # the environment setup: a new key first in LAYERTRACK_SECRET_KEYS, then rotate-secrets
    out = cli("rotate-secrets", "--print-key", env=env)
    third = out.stdout.strip()
    Fernet(third)
    refused = cli("rotate-secrets", "--new-key", env={**env, "LAYERTRACK_SECRET_KEYS": third})
    assert refused.returncode == 2 and "put a new key first in it" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    missing = cli("rotate-secrets", env={**env, "LAYERTRACK_SECRET_KEYS": third})  # the old key left out too soon
    assert missing.returncode == 3 and "keep the old key after the new one" in missing.stderr
    out = cli("rotate-secrets", env={**env, "LAYERTRACK_SECRET_KEYS": f"{third},{newest}"})
    assert out.returncode == 0 and "2 secret(s) re-encrypted" in out.stdout, out.stderr
    stored = [r["secret"] for t in ("webhooks", "hook_sources") for r in raw_rows(db, t)]
    assert all(opens(v, third) and not opens(v, newest) for v in stored)
    assert crypto.unseal(stored[0], Settings(data_dir=tmp_path, secret_keys=third)) == GIVEN
