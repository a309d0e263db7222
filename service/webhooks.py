"""Signed webhooks out: subscriptions, the outbox of deliveries, and sending one attempt.

Events are written as delivery rows in the same transaction as what caused them (a job's
scores, an alert firing), then handed to the ``webhooks`` Celery queue (``layertrack.service.queue``). A delivery is
signed per the Standard Webhooks spec (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64 HMAC-SHA256>``) with the ``standardwebhooks`` library, and
retried with exponential back-off on timeouts, connection errors, 429 and 5xx, up to
``webhook_max_attempts``. Every attempt is stored. ``sent_at`` records when the delivery's
current message was handed to the queue (set with the row, by the transaction that makes it
due, and cleared when sending fails); the sweeper (``layertrack.service.sweeper.sweep``) sends
the ones never sent and re-sends those whose message it presumes lost, so nothing committed
is dropped and nothing waiting is sent twice.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from layertrack.workers import netpolicy
from layertrack.workers.vocabulary import TEST_EVENT, DeliveryStatus
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from . import crypto
from .db import session_scope
from .errors import Conflict, Invalid, NotFound
from .models import Delivery, DeliveryAttempt, Run, Webhook

log = logging.getLogger("layertrack.webhooks")

#: a delivery's message is presumed lost no sooner than this (or ``requeue_after_s`` if
#: shorter) after it was sent and fell due; then twice that, four times, ... (the sweeper)
RESEND_AFTER_S = 30.0


def now() -> datetime:
    return datetime.now(UTC)


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> str:
    """The secret as given if the signing library accepts it; ValueError otherwise."""
    from standardwebhooks.webhooks import Webhook as Signer

    try:
        Signer(secret)
    except Exception:
        raise ValueError("the secret must be 'whsec_' followed by base64 (at least 24 bytes); "
                         "leave it out to have one generated") from None
    raw = base64.b64decode(secret.removeprefix("whsec_") + "==")
    if len(raw) < 24:
        raise ValueError("the secret is too short: give at least 24 random bytes, base64-encoded after 'whsec_'")
    return secret


# ------------------------------------------------------------------ where we may send
class TargetRefused(Invalid):
    """The URL is not one we send to (scheme, or a private address not allow-listed)."""

    title = "Webhook target refused"


def check_target(url: str, allow_hosts: str) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to a private, loopback,
    link-local or otherwise non-public address that ``allow_hosts`` does not list."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"webhook URL must be http:// or https:// with a host, got {url!r}")
    if parts.username or parts.password:
        raise TargetRefused("webhook URL must not carry a user name or password; sign with the secret instead")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise TargetRefused(f"webhook URL has an invalid port: {url!r}") from None
    try:
        netpolicy.resolve_checked(parts.hostname, port, allow_hosts)
    except netpolicy.Unresolvable as e:
        raise TargetRefused(f"webhook {e}") from None
    except netpolicy.AddressRefused as e:
        raise TargetRefused(f"webhook {e}; to allow it, add it (or its network) to LAYERTRACK_WEBHOOK_ALLOW_HOSTS "
                            "in the environment of the service (its API server and webhook workers, which check "
                            "every delivery again) and restart them; the client's environment does not count") \
            from None


# ------------------------------------------------------------------ subscriptions
def secret_or_new(given: str | None) -> str:
    if given is None:
        return new_secret()
    try:
        return check_secret(given)
    except ValueError as e:
        raise Invalid(str(e)) from None


def create(session: Session, *, url: str, events: list[str], run: Run | None, secret: str | None,
           description: str, allow_hosts: str) -> tuple[Webhook, str]:
    """Store a subscription (committed); (webhook, its signing secret)."""
    check_target(url, allow_hosts)
    secret = secret_or_new(secret)
    w = Webhook(url=url, events=sorted(set(events)), run_id=run.id if run else None,
                secret=crypto.seal(secret, crypto.settings_of(session)),  # encrypted at rest
                description=description, active=True, created_at=now())
    session.add(w)
    session.commit()
    return w, secret


def list_subscriptions(session: Session) -> list[Webhook]:
    return list(session.scalars(select(Webhook).order_by(Webhook.id)))


def get(session: Session, webhook_id: int) -> Webhook:
    w = session.get(Webhook, webhook_id)
    if w is None:
        raise NotFound(f"no webhook with id {webhook_id}")
    return w


def update_subscription(session: Session, w: Webhook, *, active: bool | None, events: list[str] | None,
                        description: str | None) -> Webhook:
    """Pause or resume, or change the events or description (committed)."""
    if active is not None:
        w.active = active
    if events is not None:
        w.events = sorted(set(events))
    if description is not None:
        w.description = description
    session.commit()
    return w


def delete_subscription(session: Session, w: Webhook) -> None:
    """Remove the subscription and its delivery log (committed)."""
    session.delete(w)
    session.commit()


def get_delivery(session: Session, webhook_id: int, delivery_id: str) -> Delivery:
    d = session.get(Delivery, delivery_id) if len(delivery_id) <= 40 else None
    if d is None or d.webhook_id != webhook_id:
        raise NotFound(f"webhook {webhook_id} has no delivery {delivery_id!r}")
    return d


def list_deliveries(session: Session, webhook_id: int, *, status: str | None, event: str | None,
                    limit: int) -> list[Delivery]:
    stmt = select(Delivery).where(Delivery.webhook_id == webhook_id)
    if status:
        stmt = stmt.where(Delivery.status == status)
    if event:
        stmt = stmt.where(Delivery.event == event)
    return list(session.scalars(stmt.order_by(Delivery.created_at.desc()).limit(limit)))


def test_delivery(session: Session, w: Webhook) -> Delivery:
    """Store a ``webhook.test`` delivery (committed); the caller sends it to the queue."""
    delivery_id = add_delivery(session, w, TEST_EVENT, {
        "webhook_id": w.id, "message": "a test event from layertrack: your receiver is reachable"})
    session.commit()
    return session.get(Delivery, delivery_id)


# ------------------------------------------------------------------ the outbox
def emit(session: Session, event: str, data: dict[str, Any], *, run_id: int | None) -> list[str]:
    """Store a delivery of ``event`` for every active subscription that wants it; their ids.

    Call inside the transaction that made the event happen; after the commit, ``publish``
    the ids (the sweeper sends any that were not published)."""
    subs = session.scalars(
        select(Webhook).where(Webhook.active.is_(True), or_(Webhook.run_id.is_(None), Webhook.run_id == run_id))
    ).all()
    ids = []
    t = now()
    for sub in subs:
        if event not in sub.events:
            continue
        ids.append(add_delivery(session, sub, event, data, t))
    return ids


def add_delivery(session: Session, sub: Webhook, event: str, data: dict[str, Any], t: datetime | None = None) -> str:
    t = t or now()
    d = Delivery(
        id=f"msg_{uuid.uuid4().hex}", webhook_id=sub.id, event=event,
        payload={"type": event, "timestamp": t.isoformat().replace("+00:00", "Z"), "data": data},
        status=DeliveryStatus.pending, attempts=0, next_attempt_at=t, created_at=t,
        sent_at=t,  # the caller sends it after the commit; if that fails, it clears this
    )
    session.add(d)
    return d.id


# ------------------------------------------------------------------ sending bookkeeping (the sweeper)
def unsent(db_url: str, limit: int) -> list[str]:
    """Pending deliveries due now whose message was never handed to the queue (sending
    failed, or a row from before ``sent_at`` existed), oldest first."""
    with session_scope(db_url) as s:
        return list(s.scalars(
            select(Delivery.id)
            .where(Delivery.status == DeliveryStatus.pending, Delivery.sent_at.is_(None),
                   Delivery.next_attempt_at <= now())
            .order_by(Delivery.next_attempt_at).limit(limit)
        ))


def awaiting(db_url: str, sent_before: datetime) -> int:
    """Deliveries whose message should be waiting in the queue: pending, sent before
    ``sent_before`` and due (a delivery whose retry message has a future ETA, or whose
    attempt is under way, is not counted)."""
    with session_scope(db_url) as s:
        return s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.status == DeliveryStatus.pending, Delivery.sent_at < sent_before, Delivery.next_attempt_at <= now()
        )) or 0


def resend_candidates(db_url: str, backed_off: ColumnElement[bool], limit: int) -> list[str]:
    """Up to ``limit`` sent, pending deliveries past their back-off (``backed_off``, over
    ``Delivery.sent_at``, ``Delivery.next_attempt_at`` and ``Delivery.resends``), oldest sent first."""
    if limit <= 0:
        return []
    with session_scope(db_url) as s:
        return list(s.scalars(
            select(Delivery.id)
            .where(Delivery.status == DeliveryStatus.pending, Delivery.sent_at.is_not(None), backed_off)
            .order_by(Delivery.sent_at, Delivery.id).limit(limit)
        ))


def mark_sent(db_url: str, ids: Sequence[str], *, resent: bool = False) -> None:
    """Record that messages for these deliveries were just handed to the queue (``resent``:
    again, because the last one was presumed lost)."""
    if not ids:
        return
    values: dict[str, Any] = {"sent_at": now()}
    if resent:
        values["resends"] = Delivery.resends + 1
    with session_scope(db_url) as s:
        s.execute(update(Delivery).where(Delivery.id.in_(list(ids)), Delivery.status == DeliveryStatus.pending)
                  .values(**values))


def mark_unsent(db_url: str, ids: Sequence[str]) -> None:
    """The queue could not take these deliveries' messages: the sweeper sends them once it can."""
    if not ids:
        return
    with session_scope(db_url) as s:
        s.execute(update(Delivery).where(Delivery.id.in_(list(ids)), Delivery.status == DeliveryStatus.pending)
                  .values(sent_at=None))


def redeliver(session: Session, d: Delivery) -> Delivery:
    """Start a new round of attempts for a delivery (same webhook-id, fresh timestamp);
    committed. The caller sends it to the queue."""
    if d.status == DeliveryStatus.pending:
        raise Conflict(f"delivery {d.id} is still being attempted; wait for it to finish")
    d.status, d.attempts, d.next_attempt_at, d.finished_at = DeliveryStatus.pending, 0, now(), None
    d.sent_at = d.next_attempt_at  # the caller sends it after the commit
    session.commit()
    return d


# ------------------------------------------------------------------ one attempt
def signed_request(secret: str, msg_id: str, payload: dict[str, Any], t: datetime | None = None) -> tuple[bytes, dict]:
    """The body and headers of a Standard Webhooks request."""
    from standardwebhooks.webhooks import Webhook as Signer

    t = t or now()
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    signature = Signer(secret).sign(msg_id, t, body)
    headers = {
        "content-type": "application/json",
        "user-agent": "layertrack-webhooks/0.1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(t.timestamp())),
        "webhook-signature": signature,
    }
    return body.encode(), headers


@dataclass
class _Due:
    id: str
    attempts: int
    payload: dict[str, Any]
    url: str
    secret: str
    active: bool


def _take(db_url: str, delivery_id: str, lease_s: float) -> _Due | None:
    """Claim the delivery's next attempt (atomically); None if it is not due or not pending."""
    t = now()
    with session_scope(db_url) as s:
        got = s.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.pending,
                   or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= t + timedelta(seconds=2)))
            .values(attempts=Delivery.attempts + 1, next_attempt_at=t + timedelta(seconds=lease_s))
            .returning(Delivery.id)
        ).first()
        if got is None:
            return None
        d = s.get(Delivery, delivery_id)
        return _Due(d.id, d.attempts, dict(d.payload), d.webhook.url, d.webhook.secret, d.webhook.active)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before attempt ``attempt + 1``: base, 2·base, 4·base, ... at most ``cap``."""
    return min(cap, base * 2 ** (attempt - 1))


def attempt(db_url: str, delivery_id: str, settings) -> float | None:
    """Make one attempt; the delay before the next one, or None when the delivery is done."""
    import httpx

    due = _take(db_url, delivery_id, settings.webhook_timeout_s + 30)
    if due is None:
        return None
    code: int | None = None
    error: str | None = None
    retryable = False
    started = time.perf_counter()
    if not due.active:
        error = "the webhook is paused (PATCH it with active: true to resume; then redeliver)"
    else:
        try:
            check_target(due.url, settings.webhook_allow_hosts)
            body, headers = signed_request(crypto.unseal(due.secret, settings), due.id, due.payload)
            with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as http:
                r = http.post(due.url, content=body, headers=headers)
            code = r.status_code
            if code == 429 or code >= 500:
                retryable, error = True, f"the receiver answered {code}"
            elif not 200 <= code < 300:
                error = f"the receiver answered {code}; only timeouts, 429 and 5xx are retried"
        except (TargetRefused, crypto.SecretKeyError) as e:
            error = str(e)
        except httpx.TimeoutException:
            retryable, error = True, f"no answer within {settings.webhook_timeout_s:g} s"
        except httpx.TransportError as e:
            retryable, error = True, f"{type(e).__name__}: {e}"
    duration_ms = (time.perf_counter() - started) * 1000
    t = now()
    delay = None
    with session_scope(db_url) as s:
        d = s.get(Delivery, delivery_id)
        s.add(DeliveryAttempt(delivery_id=delivery_id, attempted_at=t, status_code=code, error=error,
                              duration_ms=duration_ms))
        d.last_status_code, d.last_error = code, error
        if error is None:
            d.status, d.finished_at, d.next_attempt_at = DeliveryStatus.succeeded, t, None
        elif retryable and due.attempts < settings.webhook_max_attempts:
            delay = backoff(due.attempts, settings.webhook_backoff_s, settings.webhook_backoff_max_s)
            d.next_attempt_at = t + timedelta(seconds=delay)
            d.sent_at = t  # the task sends the next attempt's message (with that countdown) next
        else:
            d.status, d.finished_at, d.next_attempt_at = DeliveryStatus.failed, t, None
    log.info("webhook delivery %s attempt %d: %s", delivery_id, due.attempts, error or code)
    return delay
