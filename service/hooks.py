"""Signed hooks in: the sources that may send ``POST /v1/hooks/checkpoint`` and checking
their Standard Webhooks signatures.

A hook source has a name and a ``whsec_`` secret (stored encrypted: service/crypto.py). A
request is accepted when its ``webhook-signature`` matches the body signed with an active
source's secret, its ``webhook-timestamp`` is within TOLERANCE_S of the server's clock, and
its ``webhook-id`` was not accepted before. The receipt is stored with the job it created,
in the same transaction (submissions.accept_checkpoint): a submission that fails leaves no
receipt, so the sender's retry with the same webhook-id is accepted.

Bucket notifications (``POST /v1/hooks/object-store?source=NAME``): a source may also map
object keys to checkpoints (``prefix``, ``pattern``, ``markers``, :func:`check_mapping`).
Such a request carries the source's secret itself as its bearer token (S3-compatible stores
send a fixed ``Authorization`` header, not a signature), compared in constant time
(:func:`authenticate`). Each S3 event record names one object; :func:`map_object` says which
checkpoint it belongs to (run, step, directory URI) and whether it is one of the source's
completion markers. Only a marker's arrival submits the checkpoint; shards still in flight
then are the worker's to wait for (the job waits, progress phase ``waiting``). A record's
receipt (:func:`record_receipt`, an id from bucket, key, version, sequencer and ETag) is
stored with the job like a signed hook's, so a replay is told apart from a second record
of the same checkpoint; either way the submission is idempotent by URI: one job.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote_plus

from layertrack.workers import locations  # stdlib only: no store client
from layertrack.workers.errors import LayertrackError
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import crypto, webhooks
from .errors import Conflict, Invalid, NotFound, ServiceError
from .models import HookReceipt, HookSource

#: how far a signed hook's webhook-timestamp may be from the server's clock (the Standard
#: Webhooks default, which the standardwebhooks library enforces)
TOLERANCE_S = 300
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class Unsigned(ServiceError):
    """The request's signature headers are missing, stale or do not match (401)."""

    title = "Invalid webhook signature"


def create_source(session: Session, *, name: str, secret: str | None, prefix: str | None = None,
                  pattern: str | None = None, markers: Sequence[str] | None = None) -> tuple[HookSource, str]:
    """A new sender of signed checkpoint hooks (committed); (source, its secret). With
    ``prefix`` (and optionally ``pattern``, ``markers``: :func:`check_mapping`) it may also
    post bucket notifications to /v1/hooks/object-store."""
    if session.scalar(select(HookSource).where(HookSource.name == name)):
        raise Conflict(f"a hook source named {name!r} already exists")
    prefix, pattern, markers = check_mapping(prefix, pattern, markers)
    secret = webhooks.secret_or_new(secret)
    src = HookSource(name=name, secret=crypto.seal(secret, crypto.settings_of(session)), created_at=datetime.now(UTC),
                     prefix=prefix, pattern=pattern, markers=markers)
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


# ------------------------------------------------------------------ bucket notifications
#: the layout the Hugging Face Trainer writes under its output directory (run/checkpoint-N/)
DEFAULT_PATTERN = r"(?P<run>[^/]+)/checkpoint-(?P<step>[0-9]+)/"
#: the files whose arrival submits a checkpoint by default: the weights' last file, as
#: save_pretrained writes them (the shard index after every shard; a single-file model)
DEFAULT_MARKERS = ("model.safetensors.index.json", "model.safetensors")
MAX_PATTERN = 1000
_MARKER = re.compile(r"[^/\\\x00-\x1f\x7f]{1,200}")


class RecordRefused(Exception):
    """An S3 event record that names no checkpoint this source may submit (reported in the
    answer's per-record results, never an HTTP error)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def check_mapping(prefix: str | None, pattern: str | None,
                  markers: Sequence[str] | None) -> tuple[str | None, str | None, list[str] | None]:
    """A hook source's object-key mapping, checked and normalised: (prefix, pattern, markers),
    all None for a source without one. Invalid (422) says what is wrong.

    - ``prefix``: an ``s3://bucket/path/`` location the keys lie under (S3 event records
      name S3 buckets; MinIO, Ceph and other S3-compatible stores send the same records),
      without credentials; stored normalised (``s3://bucket/path/``).
    - ``pattern``: a Python regular expression matched at the start of the key below the
      prefix, with the named groups ``run`` and ``step`` (digits), ending with ``/``: what it
      matches is the checkpoint's directory, and the rest of the key is the file in it.
      Default :data:`DEFAULT_PATTERN` (``RUN/checkpoint-STEP/``).
    - ``markers``: the file names whose arrival submits the checkpoint, default
      :data:`DEFAULT_MARKERS`.
    """
    if prefix is None:
        if pattern is not None or markers is not None:
            raise Invalid("'pattern' and 'markers' map the object keys under a 'prefix': give the prefix too "
                          "(e.g. s3://ml-ckpts/runs/)")
        return None, None, None
    try:
        loc = locations.parse(prefix)
    except LayertrackError as e:
        raise Invalid(f"prefix: {e.message}", code=e.code) from None
    if loc.scheme != "s3":
        raise Invalid(f"prefix {loc.uri()!r} is not an s3:// location: bucket notifications are S3 event records, "
                      "which S3 and S3-compatible stores (MinIO, Ceph RGW, ...) send; give s3://bucket/path/")
    pattern = DEFAULT_PATTERN if pattern is None else pattern
    if len(pattern) > MAX_PATTERN:
        raise Invalid(f"pattern is {len(pattern)} characters long; at most {MAX_PATTERN} are taken")
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise Invalid(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    missing = [g for g in ("run", "step") if g not in compiled.groupindex]
    if missing:
        raise Invalid(f"pattern {pattern!r} has no named group {' or '.join(repr(g) for g in missing)}: write "
                      "(?P<run>...) for the run's name and (?P<step>[0-9]+) for the training step, e.g. "
                      f"{DEFAULT_PATTERN}")
    if not pattern.endswith("/"):
        raise Invalid(f"pattern {pattern!r} must end with '/': it matches the checkpoint's directory below the "
                      f"prefix, and the object's file name follows it (e.g. {DEFAULT_PATTERN})")
    names = list(DEFAULT_MARKERS if markers is None else markers)
    if not names:
        raise Invalid("markers: give at least one file name (default: " + ", ".join(DEFAULT_MARKERS) + ")")
    odd = [m for m in names if not _MARKER.fullmatch(m) or m in (".", "..")]
    if odd:
        raise Invalid(f"marker {odd[0]!r} is not a file name: markers are names of files in the checkpoint's "
                      "directory (config.json, model.safetensors.index.json, a _SUCCESS file ...), without '/'")
    return loc.uri().rstrip("/") + "/", pattern, sorted(set(names), key=names.index)


@dataclass(frozen=True)
class ObjectTarget:
    """The checkpoint an object belongs to, and whether the object is a completion marker."""

    run: str
    step: int
    uri: str
    file: str
    marker: bool


def map_object(src: HookSource, bucket: str, key: str) -> ObjectTarget:
    """The checkpoint object ``key`` (as an S3 event record gives it: URL-encoded, ``+`` for
    spaces) of ``bucket`` belongs to, by the source's prefix and pattern; RecordRefused
    (``outside_prefix``, ``no_match``, ``invalid_step``, ``not_in_directory``) when none."""
    if src.prefix is None or src.pattern is None:
        raise RecordRefused("no_mapping", f"hook source {src.name!r} maps no object keys")
    root = locations.parse(src.prefix)
    shown = src.prefix if src.prefix.endswith("/") else src.prefix + "/"
    name = unquote_plus(key)
    where = f"s3://{bucket}/{name}"
    base = root.path + "/" if root.path else ""
    if bucket != root.container or not name.startswith(base):
        raise RecordRefused("outside_prefix", f"{where} is not under the source's prefix {shown}")
    rest = name[len(base):]
    m = re.match(src.pattern, rest)
    if m is None or not m.group(0):
        raise RecordRefused("no_match", f"{where}: the key below {shown} ({rest!r}) does not match the "
                            f"source's pattern {src.pattern!r}")
    run, step = m.group("run"), m.group("step")
    if not step or not step.isascii() or not step.isdigit() or len(step) > 19:
        raise RecordRefused("invalid_step", f"{where}: the pattern's step group matched {step!r}, which is not a "
                            "training step (digits)")
    directory, file = m.group(0), rest[m.end():]
    if not directory.endswith("/") or not file or "/" in file:
        raise RecordRefused("not_in_directory", f"{where} is not a file directly in the checkpoint directory the "
                            f"pattern matched ({directory!r})")
    uri = f"{src.prefix.rstrip('/')}/{directory.rstrip('/')}"
    return ObjectTarget(run=run or "", step=int(step), uri=uri, file=file, marker=file in (src.markers or ()))


def record_receipt(src: HookSource, bucket: str, key: str, *, version: str | None, sequencer: str | None,
                   etag: str | None) -> HookReceipt:
    """The receipt of one S3 event record (not yet stored): its id hashes what names this
    write of the object, so the same record sent again has the same id."""
    ident = "\0".join([bucket, unquote_plus(key), version or "", sequencer or "", etag or ""])
    msg_id = "s3:" + hashlib.sha256(ident.encode()).hexdigest()
    return HookReceipt(source_id=src.id, msg_id=msg_id, received_at=datetime.now(UTC))


def receipt_job(session: Session, receipt: HookReceipt) -> tuple[bool, str | None]:
    """(whether this receipt was stored before, the id of its job)."""
    row = session.execute(select(HookReceipt.job_id).where(HookReceipt.source_id == receipt.source_id,
                                                           HookReceipt.msg_id == receipt.msg_id)).first()
    return (row is not None, row.job_id if row is not None else None)


def authenticate(session: Session, name: str, token: str) -> HookSource:
    """The active source named ``name`` whose secret ``token`` is (compared in constant time);
    Unsigned otherwise, with the same answer for an unknown name as for a wrong secret."""
    src = session.scalar(select(HookSource).where(HookSource.name == name, HookSource.revoked_at.is_(None)))
    secret = crypto.unseal(src.secret, crypto.settings_of(session)) if src is not None else "whsec_" + "-" * 32
    if hmac.compare_digest(token.encode("utf-8", "surrogatepass"), secret.encode()) and src is not None:
        return src
    hint = "" if token.startswith("whsec_") else " (an API token is not it: this route takes the hook source's secret)"
    raise Unsigned(f"the bearer token is not the secret of an active hook source named {name!r}{hint}; send "
                   "'Authorization: Bearer <the hook source's whsec_ secret>' (from 'layertrack hook-source')",
                   title="Invalid hook secret")
