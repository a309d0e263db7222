"""``POST /v1/checkpoints``: queue a checkpoint for scoring."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Response
from sqlalchemy.orm import Session

from ... import submissions
from ...schemas import CheckpointIn, JobOut
from ...settings import Settings
from ..deps import SessionDep, submit_scope
from ..replies import accepted_reply

router = APIRouter(prefix="/v1", tags=["checkpoints"], dependencies=[Depends(submit_scope)])


@router.post("/checkpoints", status_code=202, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "the same checkpoint was already submitted"}})
async def submit_checkpoint(
    body: CheckpointIn,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Queue a checkpoint for scoring; the same checkpoint again returns the existing job (200)."""
    # async, with the work (file checks, database, broker) in one worker thread: a sync route
    # would also hop to a thread to check its own answer against JobOut. The settings come
    # with the session (one dependency less to resolve per request). The answer is the
    # response itself (replies.accepted_reply): JobOut's JSON, without FastAPI checking it
    # against the response model again.
    settings: Settings = session.info["settings"]
    return await anyio.to_thread.run_sync(_submit, body, session, settings, idempotency_key)


def _submit(body: CheckpointIn, session: Session, settings: Settings, idempotency_key: str | None) -> Response:
    job, created = submissions.accept_checkpoint(session, body, roots=settings.roots, idempotency_key=idempotency_key)
    return accepted_reply(settings.db_url, job, created)
