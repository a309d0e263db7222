"""Answers more than one route gives."""

from __future__ import annotations

from fastapi import Response

from .. import queue
from ..schemas import JobOut


def accepted(db_url: str, response: Response, job, created: bool) -> JobOut:
    """The answer to an accepted checkpoint: a new job is sent to the queue (202); the same
    checkpoint submitted before gives its stored job (200). ``Location``: the job's URL.
    ``job``: a ``models.Job`` or a ``submissions.NewJob``."""
    out = JobOut.of(job)
    if created:
        queue.send_job(db_url, job.id)
    else:
        response.status_code = 200
    response.headers["Location"] = out.status_url
    return out


def accepted_reply(db_url: str, job, created: bool) -> Response:
    """:func:`accepted` as the response itself: the JSON FastAPI would make of the JobOut
    (the route still declares ``response_model=JobOut`` for its schema), without FastAPI
    checking the JobOut again against that model and serializing it a second way."""
    out = JobOut.of(job)
    if created:
        queue.send_job(db_url, job.id)
    return Response(out.model_dump_json(), status_code=202 if created else 200,
                    headers={"Location": out.status_url}, media_type="application/json")
