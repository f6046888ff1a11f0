"""Handlers in Python for conveyor's ``http`` handler.

conveyor's ``http`` handler POSTs each task's payload to a URL with headers
``Conveyor-Task-Id``, ``Conveyor-Task-Type``, ``Conveyor-Attempt`` and
``traceparent``, and reads the answer's status: 2xx is success (the body is
the output); 408, 429 and 5xx are retried with backoff; any other status
fails the task for good, with the body in its error message.

This module turns plain functions into such endpoints::

    handlers = Handlers()

    @handlers.task("reverse")
    def reverse(payload, task):          # or just (payload)
        if not isinstance(payload.get("text"), str):
            raise Permanent("payload.text must be a string")
        return {"reversed": payload["text"][::-1]}

A function that takes the :class:`TaskInfo` can report how far it got with
``task.progress({"done": 37, "of": 120})``: the kit sends it to the gateway
(``Handlers(gateway_url=...)`` or ``$CONVEYOR_GATEWAY_URL``) with the task's
progress token, and ``GET /v1/tasks/{id}`` and its event stream show it.

``handlers`` is a WSGI application serving ``POST /<task type>``: mount it in
Bottle (``app.mount("/tasks/", handlers)``), Flask (werkzeug's
``DispatcherMiddleware``) or any WSGI server, or ``handlers.asgi`` in an ASGI
server. A function's return value becomes a 200 answer with its JSON;
:class:`Retry` a 503 (conveyor retries); :class:`Permanent` a 422 (the task
fails for good with the message); any other exception a 500 (retried).
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Tuple,
    Union,
)

log = logging.getLogger("conveyor_client.handler")

#: Largest request body read, in bytes; larger requests are refused with 413
#: (conveyor retries nothing on a 413: the task fails for good).
MAX_BODY_BYTES = 16 * 1024 * 1024


class Retry(Exception):
    """Raise to have conveyor run the task again later (answered 503)."""

    def __init__(self, message: str = "retry requested") -> None:
        super().__init__(message)
        self.message = message


class Permanent(Exception):
    """Raise to fail the task for good (answered 422); ``message`` becomes
    part of the task's error message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


#: Shortest time between two progress reports of one task sent to the
#: gateway, in seconds: reports closer together are coalesced (the last one
#: is always sent, at the latest when the handler returns).
PROGRESS_INTERVAL = 0.2


class ProgressRefused(Exception):
    """The gateway refused a progress report (too large, the task has ended,
    a stale token); ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"progress refused ({status}): {message}")
        self.status = status
        self.message = message


class _Progress:
    """One attempt's progress reports to the gateway, coalesced."""

    def __init__(self, gateway_url: str, task_id: str, token: str, interval: float) -> None:
        parts = urllib.parse.urlsplit(gateway_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gateway_url must be http(s)://host[:port], not {gateway_url!r}")
        self._parts = parts
        self._path = (
            parts.path.rstrip("/") + "/v1/tasks/" + urllib.parse.quote(task_id, safe="") + "/progress"
        )
        self._token = token
        self._interval = interval
        self._lock = threading.Lock()
        self._last: Optional[float] = None
        self._pending: Optional[bytes] = None

    def report(self, value: Any) -> None:
        try:
            body = json.dumps(value).encode()
        except (TypeError, ValueError) as error:
            raise ValueError(f"progress: the value is not JSON: {error}") from error
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last < self._interval:
                self._pending = body
                return
            self._last = now
            self._pending = None
        self._send(body)

    def flush(self) -> None:
        with self._lock:
            body, self._pending = self._pending, None
            if body is not None:
                self._last = time.monotonic()
        if body is not None:
            self._send(body)

    def _send(self, body: bytes) -> None:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self._parts.hostname or "", self._parts.port, timeout=10)
        try:
            conn.request(
                "POST",
                self._path,
                body=body,
                headers={
                    "content-type": "application/json",
                    "conveyor-progress-token": self._token,
                },
            )
            answer = conn.getresponse()
            text = answer.read(64 * 1024).decode("utf-8", errors="replace")
        finally:
            conn.close()
        if answer.status >= 300:
            message = text
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise ProgressRefused(answer.status, message)


@dataclass(frozen=True)
class TaskInfo:
    """What conveyor says about the task being run."""

    id: Optional[str]
    type: Optional[str]
    attempt: int
    """1 for the first attempt, 2 for the first retry, ..."""
    traceparent: Optional[str]
    """The W3C trace context the task was submitted with."""
    content_type: Optional[str]
    progress_token: Optional[str] = None
    """The attempt's progress token (``Conveyor-Progress-Token``); None when
    conveyor's ``[events]`` are off."""
    _progress: Optional[_Progress] = field(default=None, repr=False, compare=False)

    def progress(self, value: Any) -> None:
        """Reports how far the task got (any JSON value, such as
        ``{"done": 37, "of": 120}``): ``GET /v1/tasks/{id}`` shows the latest
        as ``progress`` and the task's event stream each one. Reports closer
        together than :data:`PROGRESS_INTERVAL` are coalesced; the last one
        is sent before the task's answer. Raises :class:`ProgressRefused`
        when the gateway refuses it (over ``events.progress_max_bytes``: 413)
        and ``RuntimeError`` when it cannot be sent at all."""
        if self._progress is None:
            if not self.progress_token:
                raise RuntimeError(
                    "progress: conveyor sent no Conveyor-Progress-Token (its [events] are off)"
                )
            raise RuntimeError(
                "progress: the gateway's URL is unknown; pass Handlers(gateway_url=...) "
                "or set CONVEYOR_GATEWAY_URL"
            )
        self._progress.report(value)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, headers, body."""

    status: int
    headers: List[Tuple[str, str]]
    body: bytes

    @property
    def status_line(self) -> str:
        return f"{self.status} {_REASONS.get(self.status, 'Unknown')}"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

HandlerFn = Callable[..., Any]


def _text(status: int, message: str) -> Reply:
    return Reply(status, [("content-type", "text/plain; charset=utf-8")], message.encode())


def _takes_task(func: HandlerFn) -> bool:
    """Whether ``func`` accepts a second positional argument (the TaskInfo)."""
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def task_info(headers: Mapping[str, str], gateway_url: Optional[str] = None) -> TaskInfo:
    """Reads conveyor's headers (names in any case). ``gateway_url`` (else
    ``$CONVEYOR_GATEWAY_URL``) is where :meth:`TaskInfo.progress` reports."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        attempt = int(lower.get("conveyor-attempt", "1"))
    except ValueError:
        attempt = 1
    task_id = lower.get("conveyor-task-id")
    token = lower.get("conveyor-progress-token")
    gateway = gateway_url or os.environ.get("CONVEYOR_GATEWAY_URL")
    progress = None
    if task_id and token and gateway:
        progress = _Progress(gateway, task_id, token, PROGRESS_INTERVAL)
    return TaskInfo(
        id=task_id,
        type=lower.get("conveyor-task-type"),
        attempt=attempt,
        traceparent=lower.get("traceparent"),
        content_type=lower.get("content-type"),
        progress_token=token,
        _progress=progress,
    )


def _flush(info: TaskInfo) -> None:
    """Sends a progress report still held back (the task ends)."""
    if info._progress is not None:
        try:
            info._progress.flush()
        except Exception:  # the task's answer matters more than its last report
            log.warning("task %s: the last progress report was not sent", info.id, exc_info=True)


def _decode(body: bytes, info: TaskInfo) -> Any:
    """The payload: JSON when it says so (or has no content type), else
    text, else bytes."""
    kind = (info.content_type or "application/json").split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise Permanent(f"the payload is not JSON: {error}") from error
    if kind.startswith("text/"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return body
    return body


def _encode(value: Any) -> Reply:
    if isinstance(value, Reply):
        return value
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as error:
        # A handler bug, not the task's: retried, and visible in its message.
        return _text(500, f"the handler's return value is not JSON: {error}")
    return Reply(200, [("content-type", "application/json")], text.encode())


def _failure(error: BaseException, info: TaskInfo) -> Reply:
    if isinstance(error, Permanent):
        return _text(422, error.message)
    if isinstance(error, Retry):
        return _text(503, error.message)
    log.exception(
        "task %s (%s), attempt %d: the handler raised", info.id, info.type, info.attempt,
        exc_info=error,
    )
    return _text(500, f"{type(error).__name__}: {error}")


def run_task(
    func: HandlerFn, body: bytes, headers: Mapping[str, str], gateway_url: Optional[str] = None
) -> Reply:
    """Runs ``func`` for one request of conveyor's ``http`` handler and
    returns the answer to send: use it from a route of any framework.
    ``gateway_url``: where the task's progress goes (see :func:`task_info`)."""
    info = task_info(headers, gateway_url)
    try:
        payload = _decode(body, info)
        value = func(payload, info) if _takes_task(func) else func(payload)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
    except Exception as error:  # every failure becomes an answer conveyor understands
        _flush(info)
        return _failure(error, info)
    _flush(info)
    return _encode(value)


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


async def run_task_async(
    func: HandlerFn, body: bytes, headers: Mapping[str, str], gateway_url: Optional[str] = None
) -> Reply:
    """:func:`run_task` for asyncio: coroutine functions are awaited, plain
    ones run in a worker thread. (Progress reports are sent synchronously.)"""
    info = task_info(headers, gateway_url)
    try:
        payload = _decode(body, info)
        args = (payload, info) if _takes_task(func) else (payload,)
        if inspect.iscoroutinefunction(func):
            value = await func(*args)
        else:
            value = await asyncio.to_thread(func, *args)
            if inspect.isawaitable(value):
                value = await value
    except Exception as error:
        await asyncio.to_thread(_flush, info)
        return _failure(error, info)
    await asyncio.to_thread(_flush, info)
    return _encode(value)


WSGIStartResponse = Callable[..., Any]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Handlers:
    """Task functions by type, served as ``POST /<type>`` to WSGI (the
    object itself) and ASGI (:attr:`asgi`) servers."""

    def __init__(
        self, max_body_bytes: int = MAX_BODY_BYTES, gateway_url: Optional[str] = None
    ) -> None:
        self._functions: Dict[str, HandlerFn] = {}
        self.max_body_bytes = max_body_bytes
        #: The gateway :meth:`TaskInfo.progress` reports to (else
        #: ``$CONVEYOR_GATEWAY_URL``); may be set after construction.
        self.gateway_url = gateway_url

    def task(self, type: str) -> Callable[[HandlerFn], HandlerFn]:
        """Decorator: ``func`` runs tasks of ``type``."""

        def register(func: HandlerFn) -> HandlerFn:
            self.add(type, func)
            return func

        return register

    def add(self, type: str, func: HandlerFn) -> None:
        if not type or "/" in type:
            raise ValueError(f"task type {type!r}: must be non-empty, without '/'")
        if type in self._functions:
            raise ValueError(f"task type {type!r} already has a handler")
        self._functions[type] = func

    @property
    def types(self) -> List[str]:
        return sorted(self._functions)

    def _route(self, method: str, path: str) -> Union[HandlerFn, Reply]:
        name = path.strip("/")
        func = self._functions.get(name)
        if func is None:
            known = ", ".join(self.types) or "none"
            return _text(404, f"no handler for task type {name!r} here (known: {known})")
        if method != "POST":
            return Reply(405, [("allow", "POST"), ("content-type", "text/plain")], b"POST only")
        return func

    def _too_large(self, length: int) -> Reply:
        return _text(413, f"the payload has {length} bytes, over {self.max_body_bytes}")

    def __call__(
        self, environ: Dict[str, Any], start_response: WSGIStartResponse
    ) -> Iterable[bytes]:
        routed = self._route(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""))
        if isinstance(routed, Reply):
            reply = routed
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > self.max_body_bytes:
                reply = self._too_large(length)
            else:
                body = environ["wsgi.input"].read(length) if length > 0 else b""
                headers = {
                    key[5:].replace("_", "-"): value
                    for key, value in environ.items()
                    if key.startswith("HTTP_")
                }
                if environ.get("CONTENT_TYPE"):
                    headers["content-type"] = environ["CONTENT_TYPE"]
                reply = run_task(routed, body, headers, self.gateway_url)
        headers_out = reply.headers + [("content-length", str(len(reply.body)))]
        start_response(reply.status_line, headers_out)
        return [reply.body]

    async def asgi(self, scope: Dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """The ASGI application (HTTP only)."""
        if scope.get("type") != "http":
            return
        routed = self._route(scope.get("method", "GET"), scope.get("path", ""))
        if isinstance(routed, Reply):
            reply = routed
        else:
            chunks: List[bytes] = []
            size = 0
            reply_or_none: Optional[Reply] = None
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    reply_or_none = self._too_large(size)
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            if reply_or_none is not None:
                reply = reply_or_none
            else:
                headers = {
                    k.decode("latin-1"): v.decode("latin-1")
                    for k, v in scope.get("headers", [])
                }
                reply = await run_task_async(
                    routed, b"".join(chunks), headers, self.gateway_url
                )
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in reply.headers + [("content-length", str(len(reply.body)))]
                ],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})


__all__ = [
    "Handlers",
    "MAX_BODY_BYTES",
    "PROGRESS_INTERVAL",
    "Permanent",
    "ProgressRefused",
    "Reply",
    "Retry",
    "TaskInfo",
    "run_task",
    "run_task_async",
    "task_info",
]
