"""HTTP routes for integrations: outbound webhook subscriptions and their deliveries, sources
of signed inbound hooks, the signed ``POST /v1/hooks/checkpoint``, and trend-alert rules."""

from __future__ import annotations

import binascii
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import alerts, webhooks
from .db import get_sessionmaker
from .http import Problem, SessionDep, SettingsDep, authed_session, check_metric, get_run
from .models import AlertFiring, AlertRule, Delivery, HookReceipt, HookSource, Webhook
from .schemas import (
    AlertFiringOut,
    AlertRuleIn,
    AlertRuleOut,
    CheckpointIn,
    DeliveryOut,
    HookSourceIn,
    HookSourceOut,
    JobOut,
    WebhookIn,
    WebhookOut,
    WebhookPatch,
)

authed = APIRouter(prefix="/v1", dependencies=[Depends(authed_session)])
signed = APIRouter(prefix="/v1/hooks")

#: how far a signed hook's webhook-timestamp may be from the server's clock (the Standard
#: Webhooks default, which the standardwebhooks library enforces)
TOLERANCE_S = 300


def _secret(given: str | None) -> str:
    if given is None:
        return webhooks.new_secret()
    try:
        return webhooks.check_secret(given)
    except ValueError as e:
        raise Problem(422, "Invalid request", str(e)) from None


# ------------------------------------------------------------------ webhook subscriptions
def webhook_out(w: Webhook, secret: str | None = None) -> WebhookOut:
    return WebhookOut(id=w.id, url=w.url, events=list(w.events), run=w.run.name if w.run else None,
                      description=w.description, active=w.active, created_at=w.created_at, secret=secret)


def get_webhook(session: Session, webhook_id: int) -> Webhook:
    w = session.get(Webhook, webhook_id)
    if w is None:
        raise Problem(404, "Not found", f"no webhook with id {webhook_id}")
    return w


@authed.post("/webhooks", status_code=201, response_model=WebhookOut)
def create_webhook(body: WebhookIn, session: SessionDep, settings: SettingsDep) -> WebhookOut:
    """Subscribe a URL to events. The answer holds the signing secret: it is never shown again."""
    try:
        webhooks.check_target(body.url, settings.webhook_allow_hosts)
    except webhooks.TargetRefused as e:
        raise Problem(422, "Webhook target refused", str(e)) from None
    run = get_run(session, body.run) if body.run else None
    secret = _secret(body.secret)
    w = Webhook(url=body.url, events=sorted(set(body.events)), run_id=run.id if run else None, secret=secret,
                description=body.description, active=True, created_at=datetime.now(UTC))
    session.add(w)
    session.commit()
    return webhook_out(w, secret)


@authed.get("/webhooks", response_model=list[WebhookOut])
def list_webhooks(session: SessionDep) -> list[WebhookOut]:
    return [webhook_out(w) for w in session.scalars(select(Webhook).order_by(Webhook.id))]


@authed.get("/webhooks/{webhook_id}", response_model=WebhookOut)
def read_webhook(webhook_id: int, session: SessionDep) -> WebhookOut:
    return webhook_out(get_webhook(session, webhook_id))


@authed.patch("/webhooks/{webhook_id}", response_model=WebhookOut)
def update_webhook(webhook_id: int, body: WebhookPatch, session: SessionDep) -> WebhookOut:
    """Pause or resume a subscription, or change its events or description."""
    w = get_webhook(session, webhook_id)
    if body.active is not None:
        w.active = body.active
    if body.events is not None:
        w.events = sorted(set(body.events))
    if body.description is not None:
        w.description = body.description
    session.commit()
    return webhook_out(w)


@authed.delete("/webhooks/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: int, session: SessionDep) -> Response:
    """Remove the subscription and its delivery log."""
    session.delete(get_webhook(session, webhook_id))
    session.commit()
    return Response(status_code=204)


def delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut(
        id=d.id, webhook_id=d.webhook_id, event=d.event, status=d.status, attempts=d.attempts,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None, last_status_code=d.last_status_code,
        last_error=d.last_error, created_at=d.created_at, finished_at=d.finished_at, payload=d.payload,
        attempt_log=[{"attempted_at": a.attempted_at, "status_code": a.status_code, "error": a.error,
                      "duration_ms": a.duration_ms} for a in d.attempt_log],
    )


@authed.get("/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryOut])
def list_deliveries(
    webhook_id: int, session: SessionDep,
    status: Annotated[str | None, Query(pattern="^(pending|succeeded|failed)$")] = None,
    event: str | None = Query(default=None, max_length=32),
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeliveryOut]:
    """The subscription's deliveries, newest first, each with every attempt made."""
    get_webhook(session, webhook_id)
    stmt = select(Delivery).where(Delivery.webhook_id == webhook_id)
    if status:
        stmt = stmt.where(Delivery.status == status)
    if event:
        stmt = stmt.where(Delivery.event == event)
    return [delivery_out(d) for d in session.scalars(stmt.order_by(Delivery.created_at.desc()).limit(limit))]


def get_delivery(session: Session, webhook_id: int, delivery_id: str) -> Delivery:
    d = session.get(Delivery, delivery_id) if len(delivery_id) <= 40 else None
    if d is None or d.webhook_id != webhook_id:
        raise Problem(404, "Not found", f"webhook {webhook_id} has no delivery {delivery_id!r}")
    return d


@authed.get("/webhooks/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryOut)
def read_delivery(webhook_id: int, delivery_id: str, session: SessionDep) -> DeliveryOut:
    return delivery_out(get_delivery(session, webhook_id, delivery_id))


@authed.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=DeliveryOut)
def redeliver(webhook_id: int, delivery_id: str, session: SessionDep) -> DeliveryOut:
    """Send a delivery again (same webhook-id, new timestamp and signature), with a fresh
    round of attempts; earlier attempts stay in its log."""
    d = get_delivery(session, webhook_id, delivery_id)
    if d.status == "pending":
        raise Problem(409, "Conflict", f"delivery {delivery_id} is still being attempted; wait for it to finish")
    webhooks.redeliver(session, d)
    session.commit()
    webhooks.publish([d.id])
    return delivery_out(d)


@authed.post("/webhooks/{webhook_id}/test", status_code=202, response_model=DeliveryOut)
def send_test(webhook_id: int, session: SessionDep) -> DeliveryOut:
    """Send a ``webhook.test`` event to the subscription's URL."""
    w = get_webhook(session, webhook_id)
    delivery_id = webhooks.add_delivery(session, w, webhooks.TEST_EVENT, {
        "webhook_id": w.id, "message": "a test event from layertrack: your receiver is reachable"})
    session.commit()
    webhooks.publish([delivery_id])
    return delivery_out(session.get(Delivery, delivery_id))


# ------------------------------------------------------------------ signed hooks in
def source_out(src: HookSource, secret: str | None = None) -> HookSourceOut:
    return HookSourceOut(id=src.id, name=src.name, created_at=src.created_at, revoked_at=src.revoked_at,
                         secret=secret)


@authed.post("/hook-sources", status_code=201, response_model=HookSourceOut)
def create_hook_source(body: HookSourceIn, session: SessionDep) -> HookSourceOut:
    """A sender of signed checkpoint hooks. The answer holds its secret: it is never shown again."""
    if session.scalar(select(HookSource).where(HookSource.name == body.name)):
        raise Problem(409, "Conflict", f"a hook source named {body.name!r} already exists")
    secret = _secret(body.secret)
    src = HookSource(name=body.name, secret=secret, created_at=datetime.now(UTC))
    session.add(src)
    session.commit()
    return source_out(src, secret)


@authed.get("/hook-sources", response_model=list[HookSourceOut])
def list_hook_sources(session: SessionDep) -> list[HookSourceOut]:
    return [source_out(s) for s in session.scalars(select(HookSource).order_by(HookSource.id))]


@authed.delete("/hook-sources/{name}", response_model=HookSourceOut)
def revoke_hook_source(name: str, session: SessionDep) -> HookSourceOut:
    src = session.scalar(select(HookSource).where(HookSource.name == name))
    if src is None:
        raise Problem(404, "Not found", f"no hook source named {name!r}")
    src.revoked_at = src.revoked_at or datetime.now(UTC)
    session.commit()
    return source_out(src)


async def raw_body(request: Request) -> bytes:
    return await request.body()


def _unsigned(detail: str) -> Problem:
    return Problem(401, "Invalid webhook signature", detail)


def verify_signed(session: Session, raw: bytes, request: Request, source: str | None) -> tuple[HookSource, str]:
    """The source whose secret signed this request, and the webhook id; 401 otherwise."""
    from standardwebhooks.webhooks import Webhook as Verifier
    from standardwebhooks.webhooks import WebhookVerificationError

    headers = {k: request.headers.get(k, "") for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    missing = [k for k, v in headers.items() if not v]
    if missing:
        raise _unsigned(f"missing header(s) {', '.join(missing)}: sign the request per the Standard Webhooks "
                        "spec with the hook source's secret")
    try:
        ts = int(headers["webhook-timestamp"])
    except ValueError:
        raise _unsigned("webhook-timestamp must be whole seconds since the Unix epoch") from None
    skew = datetime.now(UTC).timestamp() - ts
    if abs(skew) > TOLERANCE_S:
        raise _unsigned(f"webhook-timestamp is {abs(skew):.0f} s {'old' if skew > 0 else 'in the future'}; "
                        f"requests more than {TOLERANCE_S} s from the server's clock are refused (check the "
                        "sender's clock, and sign each request when it is sent)")
    stmt = select(HookSource).where(HookSource.revoked_at.is_(None))
    if source is not None:
        stmt = stmt.where(HookSource.name == source)
    for src in session.scalars(stmt.order_by(HookSource.id).limit(100)):
        try:
            Verifier(src.secret).verify(raw, headers, json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error):
            continue
        return src, headers["webhook-id"]
    which = f"hook source {source!r}" if source else "any active hook source"
    raise _unsigned(f"the webhook-signature does not match the body signed with the secret of {which}")


@signed.post("/checkpoint", status_code=202, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "the same checkpoint was already submitted"}})
def hook_checkpoint(
    request: Request, response: Response, settings: SettingsDep, raw: Annotated[bytes, Depends(raw_body)],
    source: Annotated[str | None, Query(max_length=200, description="the hook source's name")] = None,
) -> JobOut:
    """Submit a checkpoint (same body as POST /v1/checkpoints) with a Standard Webhooks
    signature instead of a bearer token. Old or future timestamps and replayed ids are refused."""
    from .app import accept_checkpoint

    session = get_sessionmaker(settings.db_url)()
    try:
        src, msg_id = verify_signed(session, raw, request, source)
        try:
            body = CheckpointIn.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
        receipt = HookReceipt(source_id=src.id, msg_id=msg_id[:200], received_at=datetime.now(UTC))
        session.add(receipt)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise Problem(409, "Replayed webhook", f"webhook id {msg_id!r} from source {src.name!r} was already "
                          "accepted; send a new webhook-id for a new submission") from None
        try:
            job = accept_checkpoint(body, response, session, settings, None)
        except Problem:
            session.rollback()
            session.execute(delete(HookReceipt).where(HookReceipt.id == receipt.id))
            session.commit()  # refused: the sender may try again with the same id
            raise
        receipt.job_id = job.id
        session.commit()
        return job
    finally:
        session.close()


# ------------------------------------------------------------------ trend alerts
def firing_out(f: AlertFiring, run_name: str) -> AlertFiringOut:
    return AlertFiringOut(id=f.id, rule_id=f.rule_id, run=run_name, step=f.step, value=f.value, message=f.message,
                          details=f.details, job_id=f.job_id, created_at=f.created_at)


@authed.post("/runs/{run}/alerts", status_code=201, response_model=AlertRuleOut)
def create_alert(run: str, body: AlertRuleIn, session: SessionDep) -> AlertRuleOut:
    """A rule checked every time one of the run's jobs succeeds; firings are stored and sent
    as ``trend.alert`` webhooks."""
    r = get_run(session, run)
    check_metric(body.metric)
    rule = AlertRule(run_id=r.id, metric=body.metric, layer=body.layer, kind=body.kind, above=body.above,
                     below=body.below, k=body.k, window=body.window, description=body.description, enabled=True,
                     created_at=datetime.now(UTC))
    session.add(rule)
    session.commit()
    return AlertRuleOut(**alerts.rule_out(rule, run))


@authed.get("/runs/{run}/alerts", response_model=list[AlertRuleOut])
def list_alerts(run: str, session: SessionDep) -> list[AlertRuleOut]:
    r = get_run(session, run)
    rules = session.scalars(select(AlertRule).where(AlertRule.run_id == r.id).order_by(AlertRule.id))
    return [AlertRuleOut(**alerts.rule_out(x, run)) for x in rules]


@authed.delete("/runs/{run}/alerts/{rule_id}", status_code=204)
def delete_alert(run: str, rule_id: int, session: SessionDep) -> Response:
    r = get_run(session, run)
    rule = session.get(AlertRule, rule_id)
    if rule is None or rule.run_id != r.id:
        raise Problem(404, "Not found", f"run {run!r} has no alert rule {rule_id}")
    session.delete(rule)
    session.commit()
    return Response(status_code=204)


@authed.get("/runs/{run}/alerts/firings", response_model=list[AlertFiringOut])
def list_firings(
    run: str, session: SessionDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[AlertFiringOut]:
    """Every firing of the run's rules, in step order."""
    r = get_run(session, run)
    rows = session.scalars(select(AlertFiring).where(AlertFiring.run_id == r.id)
                           .order_by(AlertFiring.step, AlertFiring.id).limit(limit))
    return [firing_out(f, run) for f in rows]
