"""Secrets at rest: the signing secrets of webhooks and hook sources are stored encrypted
with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``), so a database dump alone
cannot sign or forge a webhook.

The keys come from ``LAYERTRACK_SECRET_KEYS`` (comma separated, newest first: the newest
encrypts, every one decrypts, which is how a key is rotated), else from the file
``<data dir>/secret.key`` (one key a line, newest first). When neither holds a key, the
first secret stored creates that file (mode 600), as the embedded setup keeps its database
and broker under the data directory; ``layertrack up`` creates it at start. Production sets
``LAYERTRACK_SECRET_KEYS`` on the API and the webhook workers alike (docs/deploy.md).

A stored secret is ``fernet:`` + a Fernet token. A value without that prefix is a plaintext
secret written before encryption existed: it still works, the API encrypts every such row
when it starts (:func:`startup_check`), and ``layertrack rotate-secrets`` re-encrypts every
row with the newest key.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from .errors import ServiceError
from .models import HookSource, Webhook
from .settings import Settings, get_settings

log = logging.getLogger("layertrack.crypto")

PREFIX = "fernet:"
KEY_FILE = "secret.key"
ENV = "LAYERTRACK_SECRET_KEYS"
#: the tables and columns that hold encrypted secrets
SEALED = ((Webhook, "webhooks"), (HookSource, "hook sources"))


class SecretKeyError(ServiceError):
    """No key to encrypt or decrypt with, or a stored secret that no configured key opens.
    The message says what to set (a server-side misconfiguration: 500 in the API)."""

    title = "Secret key unavailable"


def generate_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def key_file(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE


def _parse(text: str, where: str) -> list[str]:
    from cryptography.fernet import Fernet

    keys = [k.strip() for k in text.replace("\n", ",").split(",")]
    keys = [k for k in keys if k and not k.startswith("#")]
    for i, k in enumerate(keys, 1):
        try:
            Fernet(k)
        except (ValueError, TypeError):
            raise SecretKeyError(f"key {i} in {where} is not a Fernet key (32 bytes, URL-safe base64; make one "
                                 "with 'layertrack rotate-secrets --new-key')") from None
    return keys


def configured_keys(settings: Settings) -> list[str]:
    """The keys, newest first: LAYERTRACK_SECRET_KEYS, else <data dir>/secret.key; [] when none."""
    if settings.secret_keys:
        return _parse(settings.secret_keys, ENV)
    path = key_file(settings)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SecretKeyError(f"cannot read the secret key file {path} ({e.strerror}); fix its permissions or set "
                             f"{ENV}") from None
    return _parse(text, str(path))


def ensure_key_file(settings: Settings, *, announce: bool = True) -> Path | None:
    """Create ``<data dir>/secret.key`` (mode 600) with a new key when no key is configured;
    the file's path when it was created, else None. Safe when several processes race.
    ``announce``: log a warning that says so (``layertrack up`` prints its own line)."""
    if settings.secret_keys or key_file(settings).exists():
        return None
    path = key_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(generate_key() + "\n")
    if announce:
            log.warning("%s is not set: created the key that encrypts webhook and hook-source secrets in %s (mode "
                    "600); back it up with the database, or set %s (docs/deploy.md)", ENV, path, ENV)
    return path


_boxes: dict[tuple, object] = {}


def keyring(settings: Settings, *, create: bool = False):
    """A MultiFernet of the configured keys (newest first). ``create``: make the key file when
    there is no key at all (to encrypt); otherwise no key is a SecretKeyError."""
    from cryptography.fernet import Fernet, MultiFernet

    path = key_file(settings)
    if create:
        ensure_key_file(settings)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    cache_key = (settings.secret_keys, str(path), stamp)
    box = _boxes.get(cache_key)
    if box is None:
        keys = configured_keys(settings)
        if not keys:
            raise SecretKeyError(f"no key to decrypt webhook and hook-source secrets: set {ENV} (the keys they were "
                                 f"encrypted with, newest first) or put the key file back at {path}")
        box = MultiFernet([Fernet(k) for k in keys])
        if len(_boxes) > 32:
            _boxes.clear()
        _boxes[cache_key] = box
    return box


def settings_of(session: Session) -> Settings:
    """The settings the session was opened with (the API's request sessions carry them,
    api/deps.py), else the environment's."""
    return session.info.get("settings") or get_settings()


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def seal(secret: str, settings: Settings) -> str:
    """The stored form of ``secret``: encrypted with the newest key (created if none)."""
    return PREFIX + keyring(settings, create=True).encrypt(secret.encode()).decode()


def unseal(stored: str, settings: Settings) -> str:
    """The secret a stored value holds; a plaintext value (from before encryption) as it is."""
    from cryptography.fernet import InvalidToken

    if not is_sealed(stored):
        return stored
    try:
        return keyring(settings).decrypt(stored.removeprefix(PREFIX).encode()).decode()
    except InvalidToken:
        raise SecretKeyError(f"a stored secret cannot be decrypted with the configured keys ({_where(settings)}): "
                             f"{ENV} must include the key it was encrypted with") from None


def _where(settings: Settings) -> str:
    return ENV if settings.secret_keys else str(key_file(settings))


# ------------------------------------------------------------------ every row at once
@dataclass
class Census:
    """Stored secrets: how many are encrypted, how many plaintext, and whether the keys open them."""

    sealed: int = 0
    plaintext: int = 0


def census(session: Session) -> tuple[Census, str | None]:
    """Count the stored secrets; and one encrypted value (to test the keys on), if any."""
    c = Census()
    sample = None
    for model, _what in SEALED:
        for stored in session.scalars(select(model.secret)):
            if is_sealed(stored):
                c.sealed += 1
                sample = sample or stored
            else:
                c.plaintext += 1
    return c, sample


def reseal_all(session: Session, settings: Settings, *, rotate: bool) -> dict[str, int]:
    """Encrypt every plaintext secret; with ``rotate`` also re-encrypt every encrypted one with
    the newest key (after which older keys can be removed). Committed; counts per action.
    A row changed meanwhile by another process is left as that process wrote it."""
    counts = {"encrypted": 0, "rotated": 0}
    for model, _what in SEALED:
        for row_id, stored in session.execute(select(model.id, model.secret)).all():
            if is_sealed(stored):
                if not rotate:
                    continue
                from cryptography.fernet import InvalidToken

                try:
                    token = keyring(settings).rotate(stored.removeprefix(PREFIX).encode())
                except InvalidToken:
                    raise SecretKeyError(f"a stored secret cannot be decrypted with the configured keys "
                                         f"({_where(settings)}): keep the old key after the new one until "
                                         "every secret is re-encrypted") from None
                new, action = PREFIX + token.decode(), "rotated"
            else:
                new, action = seal(stored, settings), "encrypted"
            res = session.execute(update(model).where(model.id == row_id, model.secret == stored).values(secret=new))
            counts[action] += res.rowcount
    session.commit()
    return counts


def startup_check(settings: Settings, *, encrypt_plaintext: bool) -> None:
    """Refuse to start (SecretKeyError) when secrets are stored encrypted but no configured key
    decrypts them. With ``encrypt_plaintext`` (the API), plaintext rows left from before
    encryption are encrypted now. A database that cannot be reached (or has no tables yet) is
    not checked: the service answers 503 until it is back, and each secret is checked as used."""
    from .db import session_scope

    try:
        with session_scope(settings.db_url) as s:
            found, sample = census(s)
            if sample is not None:
                if not configured_keys(settings):
                    raise SecretKeyError(
                        f"the database holds {found.sealed} encrypted webhook/hook-source secret(s) but there is no "
                        f"key: set {ENV} to the keys they were encrypted with (newest first), or put the key file "
                        f"back at {key_file(settings)}; refusing to start")
                unseal(sample, settings)
            if encrypt_plaintext and found.plaintext:
                counts = reseal_all(s, settings, rotate=False)
                log.warning("encrypted %d webhook/hook-source secret(s) stored in clear", counts["encrypted"])
    except SQLAlchemyError as e:
        log.warning("secrets at rest not checked at start: %s: %s", type(e).__name__, str(e).splitlines()[0])


#: the Celery queue of webhook deliveries (layertrack.service.queue.WEBHOOK_QUEUE, which this
#: module, below the queue, cannot import)
_WEBHOOK_QUEUE = "webhooks"


def _refuse_worker_start(sender=None, **_kwargs) -> None:
    """Celery ``worker_init``: a worker that sends webhooks (consumes the webhooks queue, or
    every queue) refuses to start without the key, which every delivery needs; a scoring
    worker never reads a secret."""
    queues = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    consumed = getattr(queues, "consume_from", None)
    if consumed and _WEBHOOK_QUEUE not in consumed:
        return
    try:
        startup_check(get_settings(), encrypt_plaintext=False)
    except SecretKeyError as e:
        log.critical("%s", e)
        raise SystemExit(f"layertrack worker: {e}") from None


with contextlib.suppress(ImportError):  # the worker side: refuse to start without the key
    from celery.signals import worker_init

    worker_init.connect(_refuse_worker_start, weak=False, dispatch_uid="layertrack-secret-keys")
