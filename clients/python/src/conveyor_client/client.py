"""The synchronous client: submit tasks, start workflow runs, read results."""

from __future__ import annotations

import base64
import datetime
import math
import ssl
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
)

from ._transport import NoContent, Transport, pause, retryable, with_retries
from .errors import (
    APIError,
    ConnectionFailed,
    Conflict,
    ConveyorError,
    ResultTimeout,
    RunFailed,
    TaskCancelled,
    TaskFailed,
)

#: When a task must have run: a duration from now (``datetime.timedelta``,
#: or the API's text such as ``"30s"``) or an aware ``datetime.datetime``.
#: (Seconds from now: ``expires_in=``. A bare number is refused: Python
#: means seconds from now, the API's number is ms since 1970.)
Deadline = Union[str, datetime.timedelta, datetime.datetime]

#: Longest wait asked of the gateway by one long-poll request, in seconds:
#: a longer wait is a loop of these, so a connection that died silently is
#: noticed within ``timeout`` + this, however long the caller waits.
MAX_POLL_WAIT = 20.0

#: How long a submission whose idempotency key is busy (409: another
#: submission with it is being written) is tried again, in seconds, by
#: default: longer than the gateway's ``produce_timeout_ms`` (5 s).
CONFLICT_BUDGET = 15.0

TERMINAL = ("succeeded", "failed", "cancelled")

_State = TypeVar("_State", "TaskState", "RunState")


@dataclass(frozen=True)
class ErrorInfo:
    """Why a task, run or step failed: conveyor's error kind and message."""

    kind: str
    message: str


def _epoch_ms(name: str, at: Union[int, datetime.datetime]) -> int:
    if isinstance(at, datetime.datetime):
        if at.tzinfo is None:
            raise ValueError(f"{name} must be an aware datetime (with a time zone)")
        return int(at.timestamp() * 1000)
    if isinstance(at, bool) or not isinstance(at, int):
        raise TypeError(f"{name} must be ms since the epoch (int) or an aware datetime")
    return at


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
    """``scheduled``, ``queued``, ``running``, ``retrying``, then one of
    ``succeeded``, ``failed`` or ``cancelled``."""
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
    started_at: Optional[int] = None
    """When the latest attempt started (ms since the epoch)."""
    attempt: Optional[int] = None
    """The latest attempt that started, from 1."""
    worker: Optional[str] = None
    """The worker running (or that ran) it."""
    progress: Any = None
    """The latest progress the handler reported (any JSON), if any."""

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
            started_at=raw.get("started_at"),
            attempt=raw.get("attempt"),
            worker=raw.get("worker"),
            progress=raw.get("progress"),
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


def _seconds(name: str, value: Union[float, datetime.timedelta]) -> float:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be seconds (a number) or a timedelta")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0 seconds")
    return float(value)


def _deadline(value: Optional[Deadline], expires_in: Optional[float]) -> Union[int, str, None]:
    """The API's ``deadline``: ms since the epoch, or its duration text."""
    if value is not None and expires_in is not None:
        raise ValueError("give deadline or expires_in, not both")
    if expires_in is not None:
        return f"{max(1, math.ceil(_seconds('expires_in', expires_in) * 1000))}ms"
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime.timedelta):
        return f"{max(1, math.ceil(value.total_seconds() * 1000))}ms"
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("deadline: a datetime must carry its time zone")
        return max(0, int(value.timestamp() * 1000))
    raise TypeError(
        f"deadline={value!r} is ambiguous: pass expires_in={value!r} for seconds from now, "
        "a timedelta, or an aware datetime"
    )


def _start(
    delay: Optional[Union[float, datetime.timedelta]], run_at: Optional[datetime.datetime]
) -> Dict[str, str]:
    """The API's ``delay`` or ``run_at``."""
    if delay is not None and run_at is not None:
        raise ValueError("give delay or run_at, not both")
    if delay is not None:
        return {"delay": f"{math.ceil(_seconds('delay', delay) * 1000)}ms"}
    if run_at is not None:
        if not isinstance(run_at, datetime.datetime) or run_at.tzinfo is None:
            raise ValueError("run_at must be an aware datetime (with a time zone)")
        return {"run_at": run_at.isoformat()}
    return {}


def _output_of(state: Union["TaskState", "RunState"], failed: Type[TaskFailed]) -> Any:
    """A terminal state's output, or ``failed`` (TaskFailed or RunFailed)
    with conveyor's error kind and message."""
    if state.status == "cancelled":
        error = state.error or ErrorInfo("cancelled", "cancelled")
        raise TaskCancelled(state.id, error.kind, error.message)
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

    def wait(self, timeout: Optional[float] = 10.0) -> TaskState:
        """Waits up to ``timeout`` seconds (``None``: until it ends) for the
        task to end and returns its state; raises :class:`ResultTimeout` if
        it does not."""
        return self._client._wait(
            lambda wait: self._client._task_state(self.id, wait), timeout, f"task {self.id}"
        )

    def result(self, timeout: Optional[float] = 10.0) -> Any:
        """The task's output (decoded JSON, text, or bytes), waiting up to
        ``timeout`` seconds (``None``: until it ends); raises
        :class:`TaskFailed` with conveyor's error kind and message if it
        failed (:class:`TaskCancelled` if it was cancelled),
        :class:`ResultTimeout` (a ``TimeoutError``) if it is not done in
        time."""
        return _output_of(self.wait(timeout), TaskFailed)

    def ready(self) -> bool:
        """Celery's ``ready()``: whether the task has ended (succeeded,
        failed or cancelled), now."""
        return self.status().done

    def successful(self) -> bool:
        """Celery's ``successful()``: whether it has ended and succeeded."""
        return self.status().status == "succeeded"

    def get(self, timeout: Optional[float] = None, propagate: bool = True) -> Any:
        """Celery's ``get()``: :meth:`result`, waiting until the task ends
        by default; with ``propagate=False`` a failure's
        :class:`TaskFailed` is returned instead of raised."""
        try:
            return self.result(timeout)
        except TaskFailed as failed:
            if propagate:
                raise
            return failed

    def cancel(self) -> Dict[str, Any]:
        """Cancels the task (Celery's ``revoke``): not yet started, it never
        runs; running, its handler is asked to stop; waiting for a retry, it
        is cancelled where it waits. Returns the gateway's answer (``status``
        then, ``cancel_requested``); the task's end says what happened.
        Raises :class:`Conflict` (``error.status`` = its status) when the
        task has already ended, :class:`NotFound` when the gateway does not
        know it."""
        return self._client.cancel(self.id)

    def events(
        self, last_event_id: Optional[str] = None, timeout: float = 300.0
    ) -> Iterator["TaskEvent"]:
        """The task's life as it happens (``GET /v1/tasks/{id}/events``):
        ``status`` first (unless resuming), then ``started``, ``progress``,
        ``retrying``, ``cancelled`` events, then its end (``succeeded``,
        ``failed`` or ``cancelled``, id ``"end"``), after which the iterator
        stops. A connection that breaks is opened again after the last event
        seen (``Last-Event-ID``), so nothing is missed; pass
        ``last_event_id`` to resume yourself. ``timeout``: longest silence
        (the gateway sends a keep-alive every 15 s)."""
        return self._client._events(self.id, last_event_id, timeout)


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

    def wait(self, timeout: Optional[float] = 10.0) -> RunState:
        """Waits up to ``timeout`` seconds (``None``: until it ends) for the
        run to be over."""
        return self._client._wait(
            lambda wait: self._client._run_state(self.id, wait),
            timeout,
            f"workflow run {self.id}",
        )

    def result(self, timeout: Optional[float] = 10.0) -> Any:
        """The last step's output; raises :class:`RunFailed` (a
        :class:`TaskFailed`) naming the failed step, or
        :class:`ResultTimeout`."""
        return _output_of(self.wait(timeout), RunFailed)


class Client:
    """A conveyor gateway's client.

    ``base_url`` is the gateway (``http://127.0.0.1:8080``); ``token`` the
    bearer token when the gateway sets ``auth_tokens``; ``timeout`` the
    seconds one HTTP request may take (a long poll adds its wait, at most
    :data:`MAX_POLL_WAIT` per request: longer waits poll again).

    Submissions always carry an idempotency key (yours, or one the client
    makes) and, like every lookup, are sent again up to ``retries`` times,
    ``backoff`` seconds apart and doubling, when the connection fails or
    the gateway (or a proxy) answers 502, 503 or 504: the gateway answers a
    repeated key with the first task, so a retry never makes a second one.
    A key busy with another submission (409) is tried again for up to
    ``conflict_budget`` seconds. A submission that fails for good raises
    with ``idempotency_key`` set, to submit again with.

    ``ca_file`` or ``ssl_context``: how an ``https://`` gateway is checked
    (default: the system's CAs). ``trust_env``: use ``https_proxy`` /
    ``http_proxy`` / ``no_proxy`` from the environment.

    A client may be shared by threads, and survives ``fork`` (gunicorn
    ``--preload``, multiprocessing): each thread of each process keeps its
    own connection.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        *,
        ca_file: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        trust_env: bool = True,
        conflict_budget: float = CONFLICT_BUDGET,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be > 0 seconds")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if not backoff >= 0:
            raise ValueError("backoff must be >= 0 seconds")
        if not conflict_budget >= 0:
            raise ValueError("conflict_budget must be >= 0 seconds")
        self._transport = Transport(base_url, token, ssl_context, ca_file, trust_env)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.conflict_budget = conflict_budget

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
        *,
        expires_in: Optional[float] = None,
        delay: Optional[Union[float, datetime.timedelta]] = None,
        run_at: Optional[datetime.datetime] = None,
        traceparent: Optional[str] = None,
    ) -> Task:
        """Submits one task (``POST /v1/tasks``) and returns it once the
        broker has it. ``payload`` is any JSON value; ``key`` orders tasks
        that share it; ``deadline`` (a ``timedelta`` or an aware
        ``datetime``) or ``expires_in`` (seconds) is when the task must have
        run; ``delay`` (seconds or a ``timedelta``) or ``run_at`` (an aware
        ``datetime``) when it may start (Celery's ``countdown``/``eta``);
        ``traceparent`` the W3C trace context it carries."""
        body = self._new_task(
            type, payload, key, idempotency_key, deadline, expires_in, delay, run_at
        )
        answer = self._submit("/v1/tasks", body, _trace(traceparent))
        return Task(self, str(answer["id"]), type, bool(answer.get("idempotent_replay")))

    def submit_many(
        self, tasks: Iterable[Mapping[str, Any]], *, traceparent: Optional[str] = None
    ) -> List[Task]:
        """Submits a batch (``POST /v1/tasks:batch``): each item a mapping
        with ``type`` and ``payload`` and optionally the other arguments of
        :meth:`submit` by name. Every task is checked before any is written;
        a refusal names the item (``tasks[2].type``)."""
        bodies = [self._new_item(item) for item in _checked_items(list(tasks))]
        if not bodies:
            return []
        answer = self._submit("/v1/tasks:batch", {"tasks": bodies}, _trace(traceparent))
        return [
            Task(self, str(accepted["id"]), body["type"], bool(accepted.get("idempotent_replay")))
            for accepted, body in zip(answer["tasks"], bodies)
        ]

    def start_workflow(
        self,
        name: str,
        payload: Any,
        idempotency_key: Optional[str] = None,
        *,
        delay: Optional[Union[float, datetime.timedelta]] = None,
        run_at: Optional[datetime.datetime] = None,
        traceparent: Optional[str] = None,
    ) -> Run:
        """Starts a run of the workflow ``name`` (``POST /v1/workflows/{name}``)
        with ``payload`` as its first step's input; retried like
        :meth:`submit`."""
        body: Dict[str, Any] = {
            "payload": payload,
            "idempotency_key": idempotency_key or str(uuid.uuid4()),
        }
        body.update(_start(delay, run_at))
        answer = self._submit("/v1/workflows/" + _segment(name), body, _trace(traceparent))
        return Run(
            self,
            str(answer["id"]),
            str(answer.get("workflow", name)),
            bool(answer.get("idempotent_replay")),
        )

    # -- control ------------------------------------------------------

    def cancel(self, id: str) -> Dict[str, Any]:
        """Cancels a task or a workflow run by id (see :meth:`Task.cancel`;
        a run starts no further step)."""
        path = "/v1/tasks/" + _segment(id) + ":cancel"
        # Cancelling twice is cancelling once: safe to send again.
        _, answer, _ = with_retries(
            lambda: self._transport.request("POST", path, None, self.timeout),
            self.retries,
            self.backoff,
        )
        return dict(answer)

    #: Celery's name for :meth:`cancel`.
    revoke = cancel

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

    def tasks(
        self,
        type: Optional[str] = None,
        status: Optional[str] = None,
        key: Optional[str] = None,
        since: Optional[Union[int, datetime.datetime]] = None,
        until: Optional[Union[int, datetime.datetime]] = None,
        page_size: int = 100,
    ) -> Iterator[TaskState]:
        """Tasks the gateway's status store keeps, newest first, filtered
        by ``type``, ``status``, idempotency ``key`` and creation time
        (``since`` inclusive, ``until`` exclusive: ms since the epoch or an
        aware ``datetime``), fetched ``page_size`` (1 to 1000) at a time as
        the iteration goes. Outputs are not in the list (``client.task(id)``
        has them)."""
        query = {"type": type, "status": status, "key": key}
        return (
            TaskState.from_json(item)
            for item in self._pages("/v1/tasks", "tasks", query, since, until, page_size)
        )

    def runs(
        self,
        name: Optional[str] = None,
        status: Optional[str] = None,
        since: Optional[Union[int, datetime.datetime]] = None,
        until: Optional[Union[int, datetime.datetime]] = None,
        page_size: int = 100,
    ) -> Iterator[Dict[str, Any]]:
        """Workflow runs newest first (``id``, ``workflow``, ``status``,
        ``created_at``, ``finished_at``), filtered like :meth:`tasks`."""
        query = {"name": name, "status": status}
        return self._pages("/v1/workflows", "workflows", query, since, until, page_size)

    # -- internals ----------------------------------------------------

    def _pages(
        self,
        path: str,
        items: str,
        filters: Dict[str, Optional[str]],
        since: Optional[Union[int, datetime.datetime]],
        until: Optional[Union[int, datetime.datetime]],
        page_size: int,
    ) -> Iterator[Dict[str, Any]]:
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be from 1 to 1000")
        query: Dict[str, str] = {k: v for k, v in filters.items() if v is not None}
        for name, at in (("since", since), ("until", until)):
            if at is not None:
                query[name] = str(_epoch_ms(name, at))
        query["limit"] = str(page_size)
        while True:
            _, answer, _ = self._get(path + "?" + urllib.parse.urlencode(query), None)
            for item in answer.get(items) or []:
                yield dict(item)
            cursor = answer.get("next_cursor")
            if not isinstance(cursor, str):
                return
            query["cursor"] = cursor


    def _new_task(
        self,
        type: str,
        payload: Any,
        key: Optional[str],
        idempotency_key: Optional[str],
        deadline: Optional[Deadline],
        expires_in: Optional[float] = None,
        delay: Optional[Union[float, datetime.timedelta]] = None,
        run_at: Optional[datetime.datetime] = None,
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {"type": type, "payload": payload}
        if key is not None:
            body["key"] = key
        body["idempotency_key"] = idempotency_key or str(uuid.uuid4())
        when = _deadline(deadline, expires_in)
        if when is not None:
            body["deadline"] = when
        body.update(_start(delay, run_at))
        return body

    def _new_item(self, item: Mapping[str, Any]) -> Dict[str, Any]:
        """The body of one item of a batch (checked by _checked_items)."""
        return self._new_task(
            item["type"],
            item["payload"],
            item.get("key"),
            item.get("idempotency_key"),
            item.get("deadline"),
            item.get("expires_in"),
            item.get("delay"),
            item.get("run_at"),
        )

    def _submit(
        self, path: str, body: Dict[str, Any], headers: Optional[Dict[str, str]]
    ) -> Dict[str, Any]:
        """POSTs a submission, sending it again (same idempotency key) on
        a connection failure or a 502/503/504 up to ``retries`` times, and
        on a busy key (409) for up to ``conflict_budget`` seconds."""
        again = _SubmitRetries(self.retries, self.backoff, self.conflict_budget, body)
        while True:
            try:
                _, answer, _ = self._transport.request("POST", path, body, self.timeout, headers)
                if not isinstance(answer, dict):
                    raise ConnectionFailed(f"POST {path}: answered {answer!r}")
                return answer
            except (ConnectionFailed, APIError) as error:
                wait = again.wait_after(error)
            time.sleep(wait)

    def _task_state(self, id: str, wait_ms: Optional[int]) -> TaskState:
        _, answer, _ = self._get("/v1/tasks/" + _segment(id), wait_ms)
        return TaskState.from_json(answer)

    def _run_state(self, id: str, wait_ms: Optional[int]) -> RunState:
        _, answer, _ = self._get("/v1/workflows/" + _segment(id), wait_ms)
        return RunState.from_json(answer)

    def _events(
        self, id: str, last_event_id: Optional[str], timeout: float
    ) -> Iterator["TaskEvent"]:
        last = last_event_id
        reconnects = 0
        while True:
            stream = self._transport.stream("/v1/tasks/" + _segment(id) + "/events", last, timeout)
            try:
                for name, event_id, data in stream:
                    reconnects = 0
                    if event_id is not None:
                        last = event_id
                    yield TaskEvent(name, event_id, data)
                    if event_id == "end":
                        return
                # Closed without an end: the gateway stopped; resume.
            except ConnectionFailed:
                pass
            except NoContent:
                return
            reconnects += 1
            if reconnects > self.retries:
                raise ConnectionFailed(
                    f"the event stream of task {id} broke {reconnects} times in a row"
                )
            time.sleep(self.backoff)

    def _get(self, path: str, wait_ms: Optional[int]) -> Any:
        """A GET, retried like a submission; ``wait_ms`` is the long poll
        (at most :data:`MAX_POLL_WAIT`), added to the socket's timeout."""
        timeout = self.timeout
        if wait_ms is not None:
            path += f"?wait={wait_ms}ms"
            timeout += wait_ms / 1000
        return with_retries(
            lambda: self._transport.request("GET", path, None, timeout),
            self.retries,
            self.backoff,
        )

    def _wait(
        self, fetch: Callable[[int], _State], timeout: Optional[float], what: str
    ) -> _State:
        """Long-polls with ``?wait=`` (at most :data:`MAX_POLL_WAIT` a
        request) until the state is terminal and returns it; raises
        :class:`ResultTimeout` naming ``what`` once ``timeout`` seconds have
        passed (``None``: never)."""
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be >= 0 seconds, or None to wait until it ends")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = MAX_POLL_WAIT if end is None else end - time.monotonic()
            # The gateway shortens waits over its max_wait_ms and answers
            # the current state then: ask again until the time is up.
            wait = max(0.0, min(remaining, MAX_POLL_WAIT))
            state = fetch(int(wait * 1000))
            if state.done:
                return state
            if end is not None and timeout is not None and end - time.monotonic() <= 0:
                raise ResultTimeout(what, timeout, state.status)


@dataclass(frozen=True)
class TaskEvent:
    """One server-sent event of a task's stream."""

    event: str
    """``status``, ``started``, ``progress``, ``retrying``, ``cancelled``,
    or the end: ``succeeded``, ``failed``, ``cancelled`` (with id ``end``)."""
    id: Optional[str]
    """The event's id (resume after it with ``last_event_id``)."""
    data: Any
    """Its JSON: the task for ``status`` and the end; ``{kind, at,
    attempt, worker, progress?, due?, message?}`` otherwise."""

    @property
    def progress(self) -> Any:
        """A ``progress`` event's value."""
        return self.data.get("progress") if isinstance(self.data, dict) else None


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


#: What an item of :meth:`Client.submit_many` may hold.
_ITEM_FIELDS = {
    "type",
    "payload",
    "key",
    "idempotency_key",
    "deadline",
    "expires_in",
    "delay",
    "run_at",
}


def _checked_items(items: List[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    """``items`` of a batch, each refused unless it has ``type`` and
    ``payload`` and nothing unknown (naming the item)."""
    for i, item in enumerate(items):
        unknown = set(item) - _ITEM_FIELDS
        if unknown or "type" not in item or "payload" not in item:
            raise ValueError(
                f"tasks[{i}]: needs `type` and `payload`, "
                f"may have {', '.join(sorted(_ITEM_FIELDS - {'type', 'payload'}))}; "
                f"got {sorted(item)}"
            )
    return items


def _trace(traceparent: Optional[str]) -> Optional[Dict[str, str]]:
    """The ``traceparent`` header passed through (the gateway checks it)."""
    if traceparent is None:
        return None
    if not isinstance(traceparent, str) or "\n" in traceparent or "\r" in traceparent:
        raise ValueError("traceparent must be a W3C trace context string")
    return {"traceparent": traceparent}


class _SubmitRetries:
    """When a submission is sent again (the same body: the same idempotency
    key): on a connection failure or a 502/503/504, ``retries`` times; on a
    busy key (409), for ``budget`` seconds."""

    def __init__(self, retries: int, backoff: float, budget: float, body: Dict[str, Any]) -> None:
        self.retries = retries
        self.backoff = backoff
        self.budget = budget
        self.body = body
        self.started = time.monotonic()
        self.failures = 0
        self.conflicts = 0

    def wait_after(self, error: Exception) -> float:
        """Seconds to wait before sending again after ``error``; raises it
        (carrying the idempotency keys) when it is not to be sent again."""
        if isinstance(error, Conflict):
            wait = pause(min(self.conflicts, 4), self.backoff or 0.05)
            self.conflicts += 1
            spent = time.monotonic() - self.started
            if error.code != "idempotency_key_in_use" or spent + wait > self.budget:
                raise _with_keys(error, self.body)
            return wait
        if not retryable(error) or self.failures >= self.retries:
            raise _with_keys(error, self.body) if isinstance(error, ConveyorError) else error
        wait = pause(self.failures, self.backoff)
        self.failures += 1
        return wait


_E = TypeVar("_E", bound=ConveyorError)


def _with_keys(error: _E, body: Dict[str, Any]) -> _E:
    """``error`` carrying the idempotency key(s) the submission was sent
    with."""
    if "tasks" in body:
        error.idempotency_keys = [str(t.get("idempotency_key")) for t in body["tasks"]]
    else:
        error.idempotency_key = body.get("idempotency_key")
    return error


__all__: Sequence[str] = [
    "CONFLICT_BUDGET",
    "Client",
    "Deadline",
    "MAX_POLL_WAIT",
    "ErrorInfo",
    "Run",
    "RunState",
    "StepState",
    "Task",
    "TaskEvent",
    "TaskState",
]
