"""Jobs: read, list, cancel, retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from layertrack.workers.vocabulary import JobStatus

from ... import queries, queue, submissions
from ...schemas import JobOut
from ..deps import SessionDep, SettingsDep, current_caller, job_change, job_read
from ..params import JobId, Limit, RunQ

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(current_caller)])


@router.get("/{job_id}", dependencies=[Depends(job_read)], response_model=JobOut)
def read_job(job_id: JobId, session: SessionDep) -> JobOut:
    return JobOut.of(submissions.get_job(session, job_id))


@router.get("", dependencies=[Depends(job_read)], response_model=list[JobOut])
def list_jobs(
    session: SessionDep,
    run: RunQ = None,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Limit = 100,
) -> list[JobOut]:
    """Jobs, newest first; of one run, or in one status."""
    run_id = queries.get_run(session, run).id if run is not None else None
    return [JobOut.of(j) for j in submissions.list_jobs(session, run_id=run_id, status=status, limit=limit)]


@router.post("/{job_id}/cancel", dependencies=[Depends(job_change)], response_model=JobOut)
def cancel_job(job_id: JobId, session: SessionDep) -> JobOut:
    return JobOut.of(submissions.cancel(session, submissions.get_job(session, job_id)))


@router.post("/{job_id}/retry", dependencies=[Depends(job_change)], response_model=JobOut)
def retry_job(job_id: JobId, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a failed or cancelled job again. The answer is the state this request committed
    (queued), whatever a fast worker has done with it since."""
    out = JobOut.of(submissions.retry(session, submissions.get_job(session, job_id)))
    queue.send_job(settings.db_url, out.id)
    return out
