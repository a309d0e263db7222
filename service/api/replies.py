"""Answers more than one route gives."""

from __future__ import annotations

from fastapi import Response

from .. import queue
from ..models import Job
from ..schemas import JobOut


def accepted(db_url: str, response: Response, job: Job, created: bool) -> JobOut:
    """The answer to an accepted checkpoint: a new job is sent to the queue (202); the same
    checkpoint submitted before gives its stored job (200). ``Location``: the job's URL."""
    out = JobOut.of(job)
    if created:
        queue.send_job(db_url, job.id)
    else:
        response.status_code = 200
    response.headers["Location"] = out.status_url
    return out
