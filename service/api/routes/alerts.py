"""Trend alert rules of a run, and their firings."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from ... import alerts, queries
from ...schemas import AlertFiringOut, AlertRuleIn, AlertRuleOut
from ..deps import SessionDep, admin_scope, current_caller, read_scope
from ..params import AlertRuleId, FiringsLimit, RunPath

router = APIRouter(prefix="/v1/runs", tags=["alerts"], dependencies=[Depends(current_caller)])


@router.post("/{run:path}/alerts", dependencies=[Depends(admin_scope)], status_code=201, response_model=AlertRuleOut)
def create_alert(run: RunPath, body: AlertRuleIn, session: SessionDep) -> AlertRuleOut:
    """A rule checked every time one of the run's jobs succeeds; firings are stored and sent
    as ``trend.alert`` webhooks."""
    r = queries.get_run(session, run)
    rule = alerts.create_rule(session, r, metric=body.metric, layer=body.layer, kind=body.kind, above=body.above,
                              below=body.below, k=body.k, window=body.window, description=body.description)
    return AlertRuleOut.of(rule, r.name)


@router.get("/{run:path}/alerts", dependencies=[Depends(read_scope)], response_model=list[AlertRuleOut])
def list_alerts(run: RunPath, session: SessionDep) -> list[AlertRuleOut]:
    r = queries.get_run(session, run)
    return [AlertRuleOut.of(rule, r.name) for rule in alerts.list_rules(session, r)]


@router.get("/{run:path}/alerts/firings", dependencies=[Depends(read_scope)], response_model=list[AlertFiringOut])
def list_firings(
    run: RunPath, session: SessionDep, limit: FiringsLimit = 1000,
) -> list[AlertFiringOut]:
    """Every firing of the run's rules, in step order."""
    r = queries.get_run(session, run)
    return [AlertFiringOut.of(f, r.name) for f in alerts.firings(session, r, limit=limit)]


@router.delete("/{run:path}/alerts/{rule_id:int}", dependencies=[Depends(admin_scope)],
               status_code=204)  # :int, so that DELETE …/alerts/firings is 405
def delete_alert(run: RunPath, rule_id: AlertRuleId, session: SessionDep) -> Response:
    alerts.delete_rule(session, queries.get_run(session, run), rule_id)
    return Response(status_code=204)
