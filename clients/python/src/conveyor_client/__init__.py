"""conveyor's Python client and handler kit.

* :class:`Client` submits tasks and workflow runs to a conveyor gateway and
  reads their results (:mod:`conveyor_client.aio` for asyncio);
* :class:`Handlers` turns plain functions into endpoints for conveyor's
  ``http`` handler in any WSGI or ASGI app.

Standard library only.
"""

from .aio import AsyncClient, AsyncRun, AsyncTask
from .client import (
    Client,
    Deadline,
    ErrorInfo,
    Run,
    RunState,
    StepState,
    Task,
    TaskEvent,
    TaskState,
)
from .errors import (
    APIError,
    AuthError,
    Conflict,
    ConnectionFailed,
    ConveyorError,
    InvalidRequest,
    NotFound,
    ResultTimeout,
    RunFailed,
    TaskCancelled,
    TaskFailed,
    Unavailable,
)
from .handler import (
    Handlers,
    Permanent,
    ProgressRefused,
    Reply,
    Retry,
    TaskInfo,
    run_task,
    run_task_async,
    signature,
    verify_signature,
)

__version__ = "1.0.0"
#: The gateway API version this client speaks (the /v1 routes; the
#: ``info.version`` of the gateway's /openapi.json).
API_VERSION = "1"

__all__ = [
    "API_VERSION",
    "APIError",
    "AsyncClient",
    "AsyncRun",
    "AsyncTask",
    "AuthError",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "ConveyorError",
    "Deadline",
    "ErrorInfo",
    "Handlers",
    "InvalidRequest",
    "NotFound",
    "Permanent",
    "ProgressRefused",
    "Reply",
    "ResultTimeout",
    "Retry",
    "Run",
    "RunFailed",
    "RunState",
    "StepState",
    "Task",
    "TaskCancelled",
    "TaskEvent",
    "TaskFailed",
    "TaskInfo",
    "TaskState",
    "Unavailable",
    "run_task",
    "run_task_async",
    "signature",
    "verify_signature",
]
