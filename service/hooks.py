"""Signed hooks in: the sources that may send ``POST /v1/hooks/checkpoint`` and checking
their Standard Webhooks signatures.

A hook source has a name and a ``whsec_`` secret (stored encrypted: service/crypto.py). A
request is accepted when its ``webhook-signature`` matches the body signed with an active
source's secret, its ``webhook-timestamp`` is within TOLERANCE_S of the server's clock, and
its ``webhook-id`` was not accepted before. The receipt is stored with the job it created,
in the same transaction (jobs.accept_checkpoint): a submission that fails leaves no
receipt, so the sender's retry with the same webhook-id is accepted.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import crypto, webhooks
from .errors import Conflict, NotFound, ServiceError
from .models import HookReceipt, HookSource

#: how far a signed hook's webhook-timestamp may be from the server's clock (the Standard
#: Webhooks default, which the standardwebhooks library enforces)
TOLERANCE_S = 300
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class Unsigned(ServiceError):
    """The request's signature headers are missing, stale or do not match (401)."""

    title = "Invalid webhook signature"


def create_source(session: Session, *, name: str, secret: str | None) -> tuple[HookSource, str]:
    """A new sender of signed checkpoint hooks (committed); (source, its secret)."""
    if session.scalar(select(HookSource).where(HookSource.name == name)):
        raise Conflict(f"a hook source named {name!r} already exists")
    secret = webhooks.secret_or_new(secret)
    src = HookSource(name=name, secret=crypto.seal(secret, crypto.settings_of(session)), created_at=datetime.now(UTC))
    session.add(src)
    session.commit()
    return src, secret


def revoke_source(session: Session, name: str) -> HookSource:
    """Stop accepting the source's hooks (committed; idempotent)."""
    src = session.scalar(select(HookSource).where(HookSource.name == name))
    if src is None:
        raise NotFound(f"no hook source named {name!r}")
    src.revoked_at = src.revoked_at or datetime.now(UTC)
    session.commit()
    return src


def verify(session: Session, raw: bytes, headers: Mapping[str, str], source: str | None) -> HookReceipt:
    """The receipt of a correctly signed request (not yet stored), naming the source whose
    secret signed it; Unsigned otherwise, Conflict when its webhook-id was accepted before."""
    from standardwebhooks.webhooks import Webhook as Verifier
    from standardwebhooks.webhooks import WebhookVerificationError

    given = {k: headers.get(k, "") for k in SIGNATURE_HEADERS}
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise Unsigned(f"missing header(s) {', '.join(missing)}: sign the request per the Standard Webhooks "
                       "spec with the hook source's secret")
    try:
        ts = int(given["webhook-timestamp"])
    except ValueError:
        raise Unsigned("webhook-timestamp must be whole seconds since the Unix epoch") from None
    skew = datetime.now(UTC).timestamp() - ts
    if abs(skew) > TOLERANCE_S:
        raise Unsigned(f"webhook-timestamp is {abs(skew):.0f} s {'old' if skew > 0 else 'in the future'}; "
                       f"requests more than {TOLERANCE_S} s from the server's clock are refused (check the "
                       "sender's clock, and sign each request when it is sent)")
    stmt = select(HookSource).where(HookSource.revoked_at.is_(None))
    if source is not None:
        stmt = stmt.where(HookSource.name == source)
    settings = crypto.settings_of(session)
    for src in session.scalars(stmt.order_by(HookSource.id).limit(100)):
        try:
            Verifier(crypto.unseal(src.secret, settings)).verify(raw, given, json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error):
            continue
        msg_id = given["webhook-id"][:200]
        replay = session.execute(select(HookReceipt.job_id).where(HookReceipt.source_id == src.id,
                                                                  HookReceipt.msg_id == msg_id)).first()
        if replay is not None:
            raise replayed(msg_id, src.name, replay.job_id)
        return HookReceipt(source_id=src.id, msg_id=msg_id, received_at=datetime.now(UTC))
    which = f"hook source {source!r}" if source else "any active hook source"
    raise Unsigned(f"the webhook-signature does not match the body signed with the secret of {which}")


def replayed(msg_id: str, source_name: str, job_id: str | None = None) -> Conflict:
    job = f" (its job: /v1/jobs/{job_id})" if job_id else ""
    return Conflict(f"webhook id {msg_id!r} from source {source_name!r} was already accepted{job}; send a new "
                    "webhook-id for a new submission", title="Replayed webhook")
