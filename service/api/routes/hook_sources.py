"""Sources of signed inbound hooks (``POST /v1/hooks/checkpoint``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select

from ... import hooks
from ...models import HookSource
from ...schemas import HookSourceIn, HookSourceOut
from ..deps import SessionDep, admin_scope
from ..params import HookSourceName

router = APIRouter(prefix="/v1/hook-sources", tags=["hook sources"], dependencies=[Depends(admin_scope)])


@router.post("", status_code=201, response_model=HookSourceOut)
def create_hook_source(body: HookSourceIn, session: SessionDep) -> HookSourceOut:
    """A sender of signed checkpoint hooks. The answer holds its secret: it is never shown again."""
    src, secret = hooks.create_source(session, name=body.name, secret=body.secret, prefix=body.prefix,
                                      pattern=body.pattern, markers=body.markers)
    return HookSourceOut.of(src, secret)


@router.get("", response_model=list[HookSourceOut])
def list_hook_sources(session: SessionDep) -> list[HookSourceOut]:
    return [HookSourceOut.of(s) for s in session.scalars(select(HookSource).order_by(HookSource.id))]


@router.delete("/{name}", response_model=HookSourceOut)
def revoke_hook_source(name: HookSourceName, session: SessionDep) -> HookSourceOut:
    """Stop accepting the source's hooks (it stays listed, with ``revoked_at``)."""
    return HookSourceOut.of(hooks.revoke_source(session, name))
