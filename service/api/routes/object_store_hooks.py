"""``POST /v1/hooks/object-store?source=NAME``: bucket notifications. An S3-compatible store
(MinIO, Ceph RGW, AWS S3 through a forwarder ...) posts its S3 event records here with the
hook source's secret as the bearer token; each record that names a completion marker of a
checkpoint under the source's prefix submits that checkpoint (service/hooks.py maps keys to
run, step and URI). The answer has one result per record: refusals are reported there, so the
store does not retry a record that can never be taken."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from ... import hooks, queue, submissions
from ...errors import Conflict, ServiceError
from ...models import HookSource, Job
from ...schemas import CheckpointIn, bounded_int, text
from ..deps import SessionDep, SettingsDep
from ..params import query_text
from ..problems import Problem, problem_responses

router = APIRouter(prefix="/v1/hooks", tags=["hook sources"])

#: the most records one request may carry (stores send one or a few; the body is at most 64 KiB anyway)
MAX_RECORDS = 100

hook_secret = HTTPBearer(
    scheme_name="hookSourceSecret", bearerFormat="whsec_<base64>", auto_error=False,
    description="the hook source's secret (whsec_..., from 'layertrack hook-source NAME --prefix ...'), "
                "not an API token")


# ------------------------------------------------------------------ the S3 event record format
class S3Bucket(BaseModel):
    model_config = ConfigDict(strict=True)

    name: text(min_length=1, max_length=255)


class S3Object(BaseModel):
    model_config = ConfigDict(strict=True)

    key: text(min_length=1, max_length=4096, description="the object's key, URL-encoded (as S3 sends it)")
    size: bounded_int(0, 2**63 - 1) | None = None
    eTag: text(max_length=200) | None = None
    versionId: text(max_length=1024) | None = None
    sequencer: text(max_length=200) | None = None


class S3Entity(BaseModel):
    model_config = ConfigDict(strict=True)

    bucket: S3Bucket
    object: S3Object


class S3Record(BaseModel):
    """One S3 event notification record (other fields are accepted and ignored)."""

    model_config = ConfigDict(strict=True)

    eventName: text(min_length=1, max_length=200, description="e.g. ObjectCreated:Put (MinIO: s3:ObjectCreated:Put)")
    s3: S3Entity


class S3EventNotification(BaseModel):
    """What S3 and S3-compatible stores post to a webhook target: ``Records``, one per
    object event. A message without records (S3's ``s3:TestEvent``) is answered with none."""

    model_config = ConfigDict(strict=True)

    Records: list[S3Record] = Field(default_factory=list, max_length=MAX_RECORDS)


class RecordResult(BaseModel):
    """What became of one record. ``status``: ``accepted`` (a new job), ``existing`` (the
    checkpoint was submitted before: its job), ``duplicate`` (this very record was received
    before: its job, if any), ``skipped`` (not a completion marker, or not an object
    creation: nothing to do), ``refused`` (no checkpoint this source may submit: ``code`` and
    ``detail`` say why)."""

    index: int = Field(description="the record's position in Records")
    event: str
    bucket: str
    key: str = Field(description="the object's key, decoded")
    status: Literal["accepted", "existing", "duplicate", "skipped", "refused"]
    run: str | None = None
    step: int | None = None
    uri: str | None = Field(default=None, description="the checkpoint directory the key lies in")
    file: str | None = Field(default=None, description="the object's file name in that directory")
    job_id: str | None = None
    job_status: str | None = None
    status_url: str | None = None
    code: str | None = Field(default=None, description="why a record was refused (outside_prefix, no_match, "
                             "checkpoint_outside_roots, ...)")
    detail: str


class ObjectStoreHookOut(BaseModel):
    source: str
    received: int = Field(description="how many records the request held")
    jobs_created: int
    results: list[RecordResult]


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its ``$defs`` put in place of their ``$ref`` (the records' schema is
    no other operation's, so it has no place among the document's components)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


# ------------------------------------------------------------------ the route
def hook_source(
    session: SessionDep,
    source: query_text(max_length=200, description="the hook source's name"),
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(hook_secret)],
) -> HookSource:
    """The hook source whose secret the request's bearer token is (before the body is read);
    401 otherwise."""
    if credentials is None or not credentials.credentials.strip():
        raise Problem(401, "Unauthorized", "missing hook-source secret: send 'Authorization: Bearer <the hook "
                      "source's whsec_ secret>' (the store's auth token setting)", {"WWW-Authenticate": "Bearer"})
    try:
        return hooks.authenticate(session, source, credentials.credentials.strip())
    except hooks.Unsigned as e:
        raise Problem(401, e.title, e.message, {"WWW-Authenticate": "Bearer"}) from None


async def raw_body(request: Request) -> bytes:
    return await request.body()


@router.post(
    "/object-store", status_code=202, response_model=ObjectStoreHookOut,
    responses={
        200: {"model": ObjectStoreHookOut, "description": "no job was created (every record skipped, refused, or "
              "for a checkpoint already submitted)"},
        202: {"description": "at least one record submitted a checkpoint (a new job)"},
        401: {**problem_responses(401)[401], "description": "missing or wrong hook-source secret"},
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _inlined(
        S3EventNotification.model_json_schema())}}}},
)
def object_store_hook(
    response: Response, session: SessionDep, settings: SettingsDep,
    src: Annotated[HookSource, Depends(hook_source)],
    raw: Annotated[bytes, Depends(raw_body)],
) -> ObjectStoreHookOut:
    """Bucket notifications: S3 event records, authenticated by the hook source's secret as
    the bearer token. A record whose key maps (by the source's prefix and pattern) to a
    checkpoint directory and names one of its completion markers submits that checkpoint; a
    shard still being uploaded then makes the job wait (progress phase ``waiting``). The
    same checkpoint again, or the same record again, gives no second job. Per-record results
    in the answer: 202 when a job was created, else 200."""
    if src.prefix is None:
        raise Conflict(f"hook source {src.name!r} has no object-key mapping; create a source with one for bucket "
                       "notifications: layertrack hook-source NAME --prefix s3://bucket/path/ [--pattern REGEX]")
    try:
        event = S3EventNotification.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False, include_context=False)]) from None
    results = [_record(session, settings, src, i, rec) for i, rec in enumerate(event.Records)]
    created = sum(r.status == "accepted" for r in results)
    response.status_code = 202 if created else 200
    return ObjectStoreHookOut(source=src.name, received=len(results), jobs_created=created, results=results)


def _record(session: Session, settings, src: HookSource, index: int, rec: S3Record) -> RecordResult:
    bucket, key = rec.s3.bucket.name, rec.s3.object.key
    out = {"index": index, "event": rec.eventName, "bucket": bucket, "key": unquote_plus(key)}
    if not rec.eventName.removeprefix("s3:").startswith("ObjectCreated:"):
        return RecordResult(**out, status="skipped", detail="not an object creation: only ObjectCreated events "
                            "submit checkpoints")
    try:
        target = hooks.map_object(src, bucket, key)
    except hooks.RecordRefused as e:
        return RecordResult(**out, status="refused", code=e.code, detail=e.detail)
    out |= {"run": target.run, "step": target.step, "uri": target.uri, "file": target.file}
    if not target.marker:
        return RecordResult(**out, status="skipped", detail=f"{target.file!r} is not a completion marker of this "
                            f"source ({', '.join(src.markers or ())}): the checkpoint is submitted when one lands")
    try:
        body = CheckpointIn(run=target.run, step=target.step, uri=target.uri)
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return RecordResult(**out, status="refused", code="invalid_checkpoint", detail=why)
    receipt = hooks.record_receipt(src, bucket, key, version=rec.s3.object.versionId,
                                   sequencer=rec.s3.object.sequencer, etag=rec.s3.object.eTag)
    seen, job_id = hooks.receipt_job(session, receipt)
    if seen:
        return _job_result(session, out, "duplicate", job_id, "this record was received before (a replay): no new job")
    try:
        job, created = submissions.accept_checkpoint(session, body, roots=settings.roots, receipt=receipt)
    except Conflict:  # a twin of this record, sent at the same moment, was taken first
        return _job_result(session, out, "duplicate", hooks.receipt_job(session, receipt)[1],
                           "this record was received before (a replay): no new job")
    except ServiceError as e:
        return RecordResult(**out, status="refused", code=e.code or "invalid_checkpoint", detail=e.message)
    if created:
        queue.send_job(settings.db_url, job.id)
        return _job_result(session, out, "accepted", job.id, "submitted: a new job (it waits while files named in "
                           "the shard index are still being uploaded)")
    return _job_result(session, out, "existing", job.id, "the checkpoint was submitted before (the same URI): its "
                       "job, no new one")


def _job_result(session: Session, out: dict, status: str, job_id: str | None, detail: str) -> RecordResult:
    job = session.get(Job, job_id) if job_id else None
    return RecordResult(**out, status=status, job_id=job_id, detail=detail,
                        job_status=job.status.value if job is not None else None,
                        status_url=f"/v1/jobs/{job_id}" if job_id else None)
