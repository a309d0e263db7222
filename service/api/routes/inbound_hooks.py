"""``POST /v1/hooks/checkpoint``: a checkpoint submission authenticated by a Standard Webhooks
signature (a hook source's secret) instead of a bearer token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ... import hooks, submissions
from ...schemas import CheckpointIn, JobOut
from ..deps import SessionDep, SettingsDep
from ..params import HookSourceQ
from ..replies import accepted

router = APIRouter(prefix="/v1/hooks", tags=["hook sources"])


async def raw_body(request: Request) -> bytes:
    return await request.body()


@router.post("/checkpoint", status_code=202, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "the same checkpoint was already submitted"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/CheckpointIn"}}}}})
def hook_checkpoint(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep,
    raw: Annotated[bytes, Depends(raw_body)],
    source: HookSourceQ = None,
) -> JobOut:
    """Submit a checkpoint (same body as POST /v1/checkpoints) with a Standard Webhooks
    signature instead of a bearer token. Old or future timestamps and replayed ids are refused;
    a refused or failed submission can be sent again with the same webhook-id."""
    receipt = hooks.verify(session, raw, request.headers, source)
    try:
        body = CheckpointIn.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
    job, created = submissions.accept_checkpoint(session, body, roots=settings.roots, receipt=receipt)
    return accepted(settings.db_url, response, job, created)
