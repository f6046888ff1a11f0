"""The synchronous client: submit tasks, start workflow runs, read results."""

from __future__ import annotations

import base64
import datetime
import random
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
)

from ._transport import Transport
from .errors import (
    ConnectionFailed,
    Conflict,
    ResultTimeout,
    RunFailed,
    TaskFailed,
    Unavailable,
)

#: When a task must have run: milliseconds since the Unix epoch (int), a
#: duration from now (``datetime.timedelta`` or the API's text such as
#: ``"30s"``), or an aware ``datetime.datetime``.
Deadline = Union[int, str, datetime.timedelta, datetime.datetime]

TERMINAL = ("succeeded", "failed")

_State = TypeVar("_State", "TaskState", "RunState")


@dataclass(frozen=True)
class ErrorInfo:
    """Why a task, run or step failed: conveyor's error kind and message."""

    kind: str
    message: str


def _error_info(value: Any) -> Optional[ErrorInfo]:
    if not isinstance(value, dict):
        return None
    return ErrorInfo(str(value.get("kind", "")), str(value.get("message", "")))


def _output(raw: Mapping[str, Any]) -> Any:
    """A result as the gateway renders it: JSON, text, or bytes."""
    if "result" in raw:
        return raw["result"]
    encoded = raw.get("result_base64")
    if isinstance(encoded, str):
        return base64.b64decode(encoded)
    return None


@dataclass(frozen=True)
class TaskState:
    """A task as the gateway's status view knows it (``GET /v1/tasks/{id}``)."""

    id: str
    type: str
    status: str
    """``queued``, ``succeeded`` or ``failed``."""
    output: Any
    """The handler's output once succeeded: decoded JSON, text, or bytes."""
    content_type: Optional[str]
    error: Optional[ErrorInfo]
    attempts: Optional[int]
    submitted_at: Optional[int]
    finished_at: Optional[int]
    traceparent: Optional[str]
    raw: Dict[str, Any] = field(repr=False)
    """The gateway's answer, whole."""

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "TaskState":
        return cls(
            id=str(raw.get("id", "")),
            type=str(raw.get("type", "")),
            status=str(raw.get("status", "")),
            output=_output(raw),
            content_type=raw.get("content_type"),
            error=_error_info(raw.get("error")),
            attempts=raw.get("attempts"),
            submitted_at=raw.get("submitted_at"),
            finished_at=raw.get("finished_at"),
            traceparent=raw.get("traceparent"),
            raw=raw,
        )


@dataclass(frozen=True)
class StepState:
    """One step of a workflow run."""

    index: int
    type: str
    status: str
    """``pending``, ``queued``, ``running``, ``succeeded`` or ``failed``."""
    task_id: Optional[str]
    attempts: Optional[int]
    output: Any
    error: Optional[ErrorInfo]
    children: Optional[Dict[str, int]]
    """For a fan-out's children: ``count``, ``succeeded``, ``failed``."""


@dataclass(frozen=True)
class RunState:
    """A workflow run, step by step (``GET /v1/workflows/{id}``)."""

    id: str
    workflow: str
    status: str
    """``queued``, ``running``, ``succeeded`` or ``failed``."""
    steps: List[StepState]
    output: Any
    """The last step's output once the run succeeded."""
    error: Optional[ErrorInfo]
    finished_at: Optional[int]
    raw: Dict[str, Any] = field(repr=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "RunState":
        steps: List[StepState] = []
        for step in raw.get("steps") or []:
            if not isinstance(step, dict):
                continue
            children = step.get("children")
            steps.append(
                StepState(
                    index=int(step.get("index", len(steps))),
                    type=str(step.get("type", "")),
                    status=str(step.get("status", "")),
                    task_id=step.get("task_id"),
                    attempts=step.get("attempts"),
                    output=step.get("output"),
                    error=_error_info(step.get("error")),
                    children=children if isinstance(children, dict) else None,
                )
            )
        return cls(
            id=str(raw.get("id", "")),
            workflow=str(raw.get("workflow", "")),
            status=str(raw.get("status", "")),
            steps=steps,
            output=_output(raw),
            error=_error_info(raw.get("error")),
            finished_at=raw.get("finished_at"),
            raw=raw,
        )


def _deadline(value: Deadline) -> Union[int, str]:
    if isinstance(value, bool):
        raise TypeError("deadline must be an int, str, timedelta or datetime, not bool")
    if isinstance(value, datetime.timedelta):
        return f"{max(1, int(value.total_seconds() * 1000))}ms"
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("deadline: a datetime must carry its time zone")
        return int(value.timestamp() * 1000)
    return value


def _output_of(state: Union["TaskState", "RunState"], failed: Type[TaskFailed]) -> Any:
    """A terminal state's output, or ``failed`` (TaskFailed or RunFailed)
    with conveyor's error kind and message."""
    if state.status == "failed":
        error = state.error or ErrorInfo("unknown", "no error recorded")
        raise failed(state.id, error.kind, error.message)
    return state.output


class Task:
    """A submitted task: its id, and how to look up its status and result."""

    def __init__(
        self,
        client: "Client",
        id: str,
        type: Optional[str] = None,
        idempotent_replay: bool = False,
    ) -> None:
        self._client = client
        self.id = id
        self.type = type
        #: True when the gateway answered an earlier task with the same
        #: idempotency key instead of writing a new one.
        self.idempotent_replay = idempotent_replay

    def __repr__(self) -> str:
        return f"Task(id={self.id!r}, type={self.type!r})"

    def status(self) -> TaskState:
        """The task's status now, without waiting."""
        return self._client._task_state(self.id, None)

    def wait(self, timeout: float = 10.0) -> TaskState:
        """Waits up to ``timeout`` seconds for the task to succeed or fail and
        returns its state; raises :class:`ResultTimeout` if it does not."""
        return self._client._wait(
            lambda wait: self._client._task_state(self.id, wait), timeout, f"task {self.id}"
        )

    def result(self, timeout: float = 10.0) -> Any:
        """The task's output (decoded JSON, text, or bytes), waiting up to
        ``timeout`` seconds; raises :class:`TaskFailed` with conveyor's error
        kind and message if it failed, :class:`ResultTimeout` (a
        ``TimeoutError``) if it is not done in time."""
        return _output_of(self.wait(timeout), TaskFailed)


class Run:
    """A started workflow run."""

    def __init__(
        self,
        client: "Client",
        id: str,
        workflow: Optional[str] = None,
        idempotent_replay: bool = False,
    ) -> None:
        self._client = client
        self.id = id
        self.workflow = workflow
        self.idempotent_replay = idempotent_replay

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, workflow={self.workflow!r})"

    def status(self) -> RunState:
        """The run and each of its steps now, without waiting."""
        return self._client._run_state(self.id, None)

    def wait(self, timeout: float = 10.0) -> RunState:
        """Waits up to ``timeout`` seconds for the run to be over."""
        return self._client._wait(
            lambda wait: self._client._run_state(self.id, wait),
            timeout,
            f"workflow run {self.id}",
        )

    def result(self, timeout: float = 10.0) -> Any:
        """The last step's output; raises :class:`RunFailed` (a
        :class:`TaskFailed`) naming the failed step, or
        :class:`ResultTimeout`."""
        return _output_of(self.wait(timeout), RunFailed)


class Client:
    """A conveyor gateway's client.

    ``base_url`` is the gateway (``http://127.0.0.1:8080``); ``token`` the
    bearer token when the gateway sets ``auth_tokens``; ``timeout`` the
    seconds one HTTP request may take (a result's long poll adds its wait).

    Submissions always carry an idempotency key (yours, or one the client
    makes), and are sent again up to ``retries`` times, ``backoff`` seconds
    apart and doubling, when the gateway answers 503, when the key is busy
    (409) or when the connection fails: the gateway answers a repeated key
    with the first task, so a retry never makes a second one.

    A client may be shared by threads: each thread keeps its own connection.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._transport = Transport(base_url, token)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def close(self) -> None:
        """Closes the calling thread's connection (others close with the
        client's threads)."""
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting ---------------------------------------------------

    def submit(
        self,
        type: str,
        payload: Any,
        key: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        deadline: Optional[Deadline] = None,
    ) -> Task:
        """Submits one task (``POST /v1/tasks``) and returns it once the
        broker has it. ``payload`` is any JSON value; ``key`` orders tasks
        that share it; ``deadline`` is when the task must have run."""
        body = self._new_task(type, payload, key, idempotency_key, deadline)
        answer = self._submit("/v1/tasks", body)
        return Task(self, str(answer["id"]), type, bool(answer.get("idempotent_replay")))

    def submit_many(self, tasks: Iterable[Mapping[str, Any]]) -> List[Task]:
        """Submits a batch (``POST /v1/tasks:batch``): each item a mapping
        with ``type`` and ``payload`` and optionally ``key``,
        ``idempotency_key`` and ``deadline``. Every task is checked before
        any is written; a refusal names the item (``tasks[2].type``)."""
        bodies: List[Dict[str, Any]] = []
        for item in tasks:
            unknown = set(item) - {"type", "payload", "key", "idempotency_key", "deadline"}
            if unknown or "type" not in item or "payload" not in item:
                raise ValueError(
                    f"tasks[{len(bodies)}]: needs `type` and `payload`, "
                    f"may have `key`, `idempotency_key`, `deadline`; got {sorted(item)}"
                )
            bodies.append(
                self._new_task(
                    item["type"],
                    item["payload"],
                    item.get("key"),
                    item.get("idempotency_key"),
                    item.get("deadline"),
                )
            )
        if not bodies:
            return []
        answer = self._submit("/v1/tasks:batch", {"tasks": bodies})
        return [
            Task(self, str(accepted["id"]), body["type"], bool(accepted.get("idempotent_replay")))
            for accepted, body in zip(answer["tasks"], bodies)
        ]

    def start_workflow(
        self, name: str, payload: Any, idempotency_key: Optional[str] = None
    ) -> Run:
        """Starts a run of the workflow ``name`` (``POST /v1/workflows/{name}``)
        with ``payload`` as its first step's input; retried like
        :meth:`submit`."""
        body = {
            "payload": payload,
            "idempotency_key": idempotency_key or str(uuid.uuid4()),
        }
        answer = self._submit("/v1/workflows/" + _segment(name), body)
        return Run(
            self,
            str(answer["id"]),
            str(answer.get("workflow", name)),
            bool(answer.get("idempotent_replay")),
        )

    # -- looking up ---------------------------------------------------

    def task(self, id: str) -> Task:
        """A task by id, to look up (``client.task(id).result()``). Raises
        :class:`NotFound` if the gateway does not know it."""
        state = self._task_state(id, None)
        return Task(self, state.id, state.type)

    def run(self, id: str) -> Run:
        """A workflow run by id."""
        state = self._run_state(id, None)
        return Run(self, state.id, state.workflow)

    # -- internals ----------------------------------------------------

    def _new_task(
        self,
        type: str,
        payload: Any,
        key: Optional[str],
        idempotency_key: Optional[str],
        deadline: Optional[Deadline],
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {"type": type, "payload": payload}
        if key is not None:
            body["key"] = key
        body["idempotency_key"] = idempotency_key or str(uuid.uuid4())
        if deadline is not None:
            body["deadline"] = _deadline(deadline)
        return body

    def _submit(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                _, answer, _ = self._transport.request("POST", path, body, self.timeout)
                if not isinstance(answer, dict):
                    raise ConnectionFailed(f"POST {path}: answered {answer!r}")
                return answer
            except (Unavailable, ConnectionFailed):
                if attempt == self.retries:
                    raise
            except Conflict as error:
                if error.code != "idempotency_key_in_use" or attempt == self.retries:
                    raise
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _task_state(self, id: str, wait_ms: Optional[int]) -> TaskState:
        _, answer, _ = self._get("/v1/tasks/" + _segment(id), wait_ms)
        return TaskState.from_json(answer)

    def _run_state(self, id: str, wait_ms: Optional[int]) -> RunState:
        _, answer, _ = self._get("/v1/workflows/" + _segment(id), wait_ms)
        return RunState.from_json(answer)

    def _get(self, path: str, wait_ms: Optional[int]) -> Any:
        timeout = self.timeout
        if wait_ms is not None:
            path += f"?wait={wait_ms}ms"
            timeout += wait_ms / 1000
        return self._transport.request("GET", path, None, timeout)

    def _wait(self, fetch: Callable[[int], _State], timeout: float, what: str) -> _State:
        """Long-polls with ``?wait=`` until the state is terminal and returns
        it; raises :class:`ResultTimeout` naming ``what`` once ``timeout``
        seconds have passed."""
        if timeout < 0:
            raise ValueError("timeout must be >= 0 seconds")
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            # The gateway shortens waits over its max_wait_ms and answers
            # the current state then: ask again until the time is up.
            state = fetch(max(0, int(remaining * 1000)))
            if state.done:
                return state
            if end - time.monotonic() <= 0:
                raise ResultTimeout(what, timeout, state.status)


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


__all__: Sequence[str] = [
    "Client",
    "Deadline",
    "ErrorInfo",
    "Run",
    "RunState",
    "StepState",
    "Task",
    "TaskState",
]
