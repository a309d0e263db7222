"""What the service logic raises when a request cannot be done; the HTTP layer turns each
into a problem-details answer (NotFound → 404, Conflict → 409, Invalid → 422).

    ServiceError
    ├── NotFound      no such run, job, webhook, delivery, hook source or alert rule
    ├── Conflict      contradicts what is stored (a job's state, an Idempotency-Key, a name taken)
    └── Invalid       the request is well-formed but cannot be accepted (a checkpoint, a target)
"""

from __future__ import annotations


class ServiceError(Exception):
    #: the problem's title
    title = "Error"

    def __init__(self, message: str, *, code: str | None = None, title: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        if title is not None:
            self.title = title


class NotFound(ServiceError):
    title = "Not found"


class Conflict(ServiceError):
    title = "Conflict"


class Invalid(ServiceError):
    title = "Invalid request"
