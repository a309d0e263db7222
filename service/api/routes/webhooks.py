"""Outbound webhook subscriptions and their deliveries."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from ... import queries, queue, webhooks
from ...schemas import DeliveryOut, DeliveryStatusName, WebhookIn, WebhookOut, WebhookPatch
from ..deps import SessionDep, SettingsDep, admin_scope
from ..params import DeliveryId, EventQ, Limit, WebhookId

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], dependencies=[Depends(admin_scope)])


@router.post("", status_code=201, response_model=WebhookOut)
def create_webhook(body: WebhookIn, session: SessionDep, settings: SettingsDep) -> WebhookOut:
    """Subscribe a URL to events. The answer holds the signing secret: it is never shown again."""
    run = queries.get_run(session, body.run) if body.run else None
    w, secret = webhooks.create(session, url=body.url, events=body.events, run=run, secret=body.secret,
                                description=body.description, allow_hosts=settings.webhook_allow_hosts)
    return WebhookOut.of(w, secret)


@router.get("", response_model=list[WebhookOut])
def list_webhooks(session: SessionDep) -> list[WebhookOut]:
    return [WebhookOut.of(w) for w in webhooks.list_subscriptions(session)]


@router.get("/{webhook_id}", response_model=WebhookOut)
def read_webhook(webhook_id: WebhookId, session: SessionDep) -> WebhookOut:
    return WebhookOut.of(webhooks.get(session, webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookOut)
def update_webhook(webhook_id: WebhookId, body: WebhookPatch, session: SessionDep) -> WebhookOut:
    """Pause or resume a subscription, or change its events or description."""
    w = webhooks.update_subscription(session, webhooks.get(session, webhook_id), active=body.active,
                                     events=body.events, description=body.description)
    return WebhookOut.of(w)


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: WebhookId, session: SessionDep) -> Response:
    """Remove the subscription and its delivery log."""
    webhooks.delete_subscription(session, webhooks.get(session, webhook_id))
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryOut])
def list_deliveries(
    webhook_id: WebhookId, session: SessionDep,
    status: DeliveryStatusName | None = None,
    event: EventQ = None,
    limit: Limit = 100,
) -> list[DeliveryOut]:
    """The subscription's deliveries, newest first, each with every attempt made."""
    webhooks.get(session, webhook_id)
    found = webhooks.list_deliveries(session, webhook_id, status=status, event=event, limit=limit)
    return [DeliveryOut.of(d) for d in found]


@router.get("/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryOut)
def read_delivery(webhook_id: WebhookId, delivery_id: DeliveryId, session: SessionDep) -> DeliveryOut:
    return DeliveryOut.of(webhooks.get_delivery(session, webhook_id, delivery_id))


@router.post("/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryOut)
def redeliver(webhook_id: WebhookId, delivery_id: DeliveryId, session: SessionDep,
              settings: SettingsDep) -> DeliveryOut:
    """Send a delivery again (same webhook-id, new timestamp and signature), with a fresh
    round of attempts; earlier attempts stay in its log."""
    d = webhooks.redeliver(session, webhooks.get_delivery(session, webhook_id, delivery_id))
    out = DeliveryOut.of(d)
    queue.send_deliveries([d.id], db_url=settings.db_url)
    return out


@router.post("/{webhook_id}/test", status_code=202, response_model=DeliveryOut)
def send_test(webhook_id: WebhookId, session: SessionDep, settings: SettingsDep) -> DeliveryOut:
    """Send a ``webhook.test`` event to the subscription's URL."""
    d = webhooks.test_delivery(session, webhooks.get(session, webhook_id))
    out = DeliveryOut.of(d)
    queue.send_deliveries([d.id], db_url=settings.db_url)
    return out
