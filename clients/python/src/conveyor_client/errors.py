"""Exceptions raised by the client.

Every refusal of the gateway is a JSON body ``{"error": {"code", "field",
"message"}}``; :class:`APIError` and its subclasses keep all three, plus the
HTTP status.
"""

from __future__ import annotations

from typing import Any, List, Optional


class ConveyorError(Exception):
    """Base of every exception this package raises."""

    #: The idempotency key a failed submission was sent with (the client's
    #: own when none was given): submit again with it, and the gateway
    #: answers with the task if an earlier try did write it.
    idempotency_key: Optional[str] = None
    #: The same for each task of a failed batch, in order.
    idempotency_keys: Optional[List[str]] = None


class ConnectionFailed(ConveyorError):
    """The gateway could not be reached, or closed the connection without
    answering (after the client's retries, for submissions)."""


class APIError(ConveyorError):
    """The gateway refused a request.

    ``status`` is the HTTP status, ``code`` the API's error code (for
    example ``invalid_field``), ``field`` the request field at fault when the
    gateway named one (``type``, ``tasks[2].key``), ``message`` its text.
    """

    def __init__(
        self, status: int, code: str, message: str, field: Optional[str] = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        #: The task's status, when the refusal is about it (cancelling a task
        #: that has ended: ``succeeded``, ``failed``, ``cancelled``).
        self.task_status: Optional[str] = None
        where = f" (field `{field}`)" if field else ""
        super().__init__(f"{status} {code}{where}: {message}")


class InvalidRequest(APIError):
    """400, 413 or 422: the request itself is wrong; sending it again will
    not help. ``field`` names what to fix."""


class AuthError(APIError):
    """401: the gateway requires a bearer token and this one (or none) was
    refused."""


class NotFound(APIError):
    """404: no such task, workflow or workflow run (or the gateway's status
    view no longer keeps it)."""


class Conflict(APIError):
    """409: the idempotency key is being used by a submission right now
    (``code`` ``idempotency_key_in_use``), or a cancelled task had already
    ended (``task_finished``; ``task_status`` says how)."""


class Unavailable(APIError):
    """503: the gateway could not write to Kafka in time (nothing, or not
    everything, was written); or 502/504 from a proxy in front of it."""


def api_error(status: int, body: Any, text: str) -> APIError:
    """The exception for an error answer: ``body`` is its decoded JSON (or
    None), ``text`` the raw body for answers that are not the API's shape."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code: str = error["code"]
        message = str(error.get("message", ""))
        field = error.get("field")
        field = field if isinstance(field, str) else None
    else:
        code = f"http_{status}"
        message = text[:500] or "(no body)"
        field = None
    kind = {
        400: InvalidRequest,
        401: AuthError,
        403: AuthError,
        404: NotFound,
        409: Conflict,
        413: InvalidRequest,
        422: InvalidRequest,
        502: Unavailable,
        503: Unavailable,
        504: Unavailable,
    }.get(status, APIError)
    refusal = kind(status, code, message, field)
    task_status = body.get("status") if isinstance(body, dict) else None
    if isinstance(task_status, str):
        refusal.task_status = task_status
    return refusal


class TaskFailed(ConveyorError):
    """The task failed for good: ``kind`` is conveyor's error kind
    (``permanent``, ``retryable`` once its attempts ran out, ``timeout``,
    ``deadline``, ``output_too_large``, ...) and ``message`` its text."""

    def __init__(self, task_id: str, kind: str, message: str) -> None:
        self.task_id = task_id
        self.kind = kind
        self.message = message
        super().__init__(f"task {task_id} failed ({kind}): {message}")


class TaskCancelled(TaskFailed):
    """The task (or its workflow run) was cancelled; ``message`` says where
    it stood (``cancelled before it started``, ``cancelled while running;
    ...``)."""


class RunFailed(TaskFailed):
    """A workflow run failed; ``message`` names the step that failed."""

    def __init__(self, run_id: str, kind: str, message: str) -> None:
        super().__init__(run_id, kind, message)
        self.run_id = run_id


class ResultTimeout(ConveyorError, TimeoutError):
    """No terminal status within the timeout; the task (or run) may still
    finish later. Also a built-in ``TimeoutError``."""

    def __init__(self, what: str, timeout: float, status: str) -> None:
        self.status = status
        super().__init__(f"{what} is still {status} after {timeout:g} s")
