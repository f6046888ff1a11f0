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
``DispatcherMiddleware``) or any WSGI server, ``handlers.asgi`` in an ASGI
app (FastAPI/Starlette ``app.mount("/tasks", handlers.asgi)``), or
:func:`conveyor_client.django.task_view` in Django's URLconf. A function's
return value becomes a 200 answer with its JSON; :class:`Retry` a 503
(conveyor retries, after ``delay`` when it gives one); :class:`Permanent` a
422 (the task fails for good with the message); any other exception a 500
(retried).

With a secret (``Handlers(secret=...)`` or ``$CONVEYOR_SIGNING_SECRET``),
every request must carry a valid ``Conveyor-Signature`` (conveyor's
``signing_secret_env``/``signing_secret_file``): unsigned, forged or stale
requests are refused with 401 before any handler runs.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import http.client
import inspect
import json
import logging
import math
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
    Sequence,
    Tuple,
    Union,
)

log = logging.getLogger("conveyor_client.handler")

#: Largest request body read, in bytes; larger requests are refused with 413
#: (conveyor retries nothing on a 413: the task fails for good).
MAX_BODY_BYTES = 16 * 1024 * 1024


#: Where :class:`Handlers` reads its signing secret(s) when none is given.
SECRET_ENV = "CONVEYOR_SIGNING_SECRET"
#: Oldest signature taken, in seconds (either way, for clock skew).
DEFAULT_TOLERANCE = 300.0
#: Most secrets in force at once (the current one and the next).
MAX_SECRETS = 2
#: Shortest secret taken, in bytes (conveyor refuses shorter ones too).
MIN_SECRET_BYTES = 16
#: Most ``v1=`` signatures of one header looked at.
_MAX_SIGNATURES = 8


class Retry(Exception):
    """Raise to have conveyor run the task again later (answered 503).
    ``delay`` (seconds or a ``timedelta``) asks for the next attempt no
    sooner than that: it is sent as ``Retry-After`` (whole seconds, rounded
    up), which conveyor honours up to the type's ``max_backoff_ms``."""

    def __init__(
        self,
        message: str = "retry requested",
        delay: Union[float, datetime.timedelta, None] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if isinstance(delay, datetime.timedelta):
            delay = delay.total_seconds()
        if delay is not None and (isinstance(delay, bool) or not delay >= 0):
            raise ValueError("Retry: delay must be >= 0 seconds")
        self.delay: Optional[float] = None if delay is None else float(delay)


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
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
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
        reply = _text(503, error.message)
        if error.delay is not None:
            reply.headers.append(("retry-after", str(math.ceil(error.delay))))
        return reply
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


def _secrets(secret: Union[str, Sequence[str], None]) -> List[bytes]:
    """The secrets given, or ``$CONVEYOR_SIGNING_SECRET``'s (one, or two
    separated by a comma or a line break); errors never quote them."""
    if secret is None:
        text = os.environ.get(SECRET_ENV, "")
        items = [p.strip() for p in text.replace("\n", ",").split(",")]
        where = "$" + SECRET_ENV
    elif isinstance(secret, str):
        items, where = [secret.strip()], "secret"
    else:
        items, where = [str(p).strip() for p in secret], "secret"
    found = [p.encode() for p in items if p]
    if len(found) > MAX_SECRETS:
        raise ValueError(f"{where}: {len(found)} secrets; at most {MAX_SECRETS} (the current one and the next)")
    for i, item in enumerate(found):
        if len(item) < MIN_SECRET_BYTES:
            raise ValueError(f"{where}: secret {i + 1} is shorter than {MIN_SECRET_BYTES} bytes")
    if secret is not None and not found:
        raise ValueError("secret: empty")
    return found


def signature(secret: Union[str, bytes], timestamp: int, body: bytes) -> str:
    """The ``v1`` signature conveyor sends: hex HMAC-SHA256 of
    ``<timestamp>.<body>`` keyed with ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(
    header: Optional[str],
    body: bytes,
    secrets: Sequence[Union[str, bytes]],
    tolerance: float = DEFAULT_TOLERANCE,
    now: Optional[float] = None,
) -> Optional[str]:
    """Checks a ``Conveyor-Signature`` header (``t=<unix seconds>,v1=<hex>``,
    maybe several ``v1``) against ``body``: ``None`` when one signature
    matches one of ``secrets`` (compared in constant time) and ``t`` is
    within ``tolerance`` seconds of ``now``; else why not."""
    if not header:
        return "unsigned request: no Conveyor-Signature header"
    stamp: Optional[str] = None
    given: List[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            stamp = value
        elif name == "v1" and len(given) < _MAX_SIGNATURES:
            given.append(value)
    if stamp is None or not stamp.isdigit() or len(stamp) > 15 or not given:
        return "malformed Conveyor-Signature: expected t=<unix seconds>,v1=<hex>"
    age = (time.time() if now is None else now) - int(stamp)
    if abs(age) > tolerance:
        return (
            f"stale Conveyor-Signature: signed {age:.0f} s from now, "
            f"beyond the {tolerance:.0f} s tolerance (replayed, or a clock is off)"
        )
    signed = stamp.encode() + b"." + body
    matched = False
    for secret in secrets:
        key = secret.encode() if isinstance(secret, str) else secret
        expected = hmac.new(key, signed, hashlib.sha256).hexdigest()
        for candidate in given:
            # Every pair is compared: how long this takes says nothing.
            matched |= hmac.compare_digest(expected, candidate)
    return None if matched else "forged request: the Conveyor-Signature matches no secret"


def read_bounded(read: Callable[[int], bytes], limit: int) -> Union[bytes, Reply]:
    """Everything ``read`` returns until it returns nothing, or the 413
    once more than ``limit`` bytes came (never holding more than that and
    one chunk)."""
    parts: List[bytes] = []
    size = 0
    while True:
        chunk = read(64 * 1024)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            return _text(413, f"the payload has more than {limit} bytes (max_body_bytes)")
        parts.append(chunk)


def _lower(headers: Mapping[str, str]) -> Dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


class Handlers:
    """Task functions by type, served as ``POST /<type>`` to WSGI (the
    object itself), ASGI (:attr:`asgi`) and Django
    (:func:`conveyor_client.django.task_view`).

    ``secret``: the signing secret (or two, while rotating) conveyor's
    ``http`` handler signs with; default ``$CONVEYOR_SIGNING_SECRET``. With
    one, unsigned, forged or stale (over ``tolerance`` seconds) requests are
    refused with 401 and no handler runs. ``gateway_url``: where
    :meth:`TaskInfo.progress` reports (else ``$CONVEYOR_GATEWAY_URL``)."""

    def __init__(
        self,
        max_body_bytes: int = MAX_BODY_BYTES,
        gateway_url: Optional[str] = None,
        secret: Union[str, Sequence[str], None] = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        self._functions: Dict[str, HandlerFn] = {}
        self.max_body_bytes = max_body_bytes
        #: The gateway :meth:`TaskInfo.progress` reports to (else
        #: ``$CONVEYOR_GATEWAY_URL``); may be set after construction.
        self.gateway_url = gateway_url
        if not tolerance > 0:
            raise ValueError("tolerance must be > 0 seconds")
        self.tolerance = tolerance
        self._secrets = _secrets(secret)

    @property
    def signed(self) -> bool:
        """Whether requests must be signed."""
        return bool(self._secrets)

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

    def _refused(self, headers: Mapping[str, str], body: bytes) -> Optional[Reply]:
        """The 401 of a request whose signature does not hold, when
        requests must be signed."""
        if not self._secrets:
            return None
        why = verify_signature(
            headers.get("conveyor-signature"), body, self._secrets, self.tolerance
        )
        if why is None:
            return None
        log.warning("refused a task request (%s): %s", headers.get("conveyor-task-id"), why)
        return _text(401, why)

    def _admit(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Union[Reply, Tuple[HandlerFn, Dict[str, str]]]:
        """The function to run and the lower-cased headers, or the answer
        refusing the request (unknown type, too large, signature)."""
        routed = self._route(method, path)
        if isinstance(routed, Reply):
            return routed
        if len(body) > self.max_body_bytes:
            return self._too_large(len(body))
        lower = _lower(headers)
        refused = self._refused(lower, body)
        if refused is not None:
            return refused
        return routed, lower

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Serves one request from any framework: ``path`` is the task
        type (``/resize`` or ``resize``), ``headers`` the request's (names in
        any case). The signature is checked first, then the function runs."""
        admitted = self._admit(method, path, headers, body)
        if isinstance(admitted, Reply):
            return admitted
        func, lower = admitted
        return run_task(func, body, lower, self.gateway_url)

    async def handle_async(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Reply:
        """:meth:`handle` for asyncio (see :func:`run_task_async`)."""
        admitted = self._admit(method, path, headers, body)
        if isinstance(admitted, Reply):
            return admitted
        func, lower = admitted
        return await run_task_async(func, body, lower, self.gateway_url)

    def _wsgi_body(self, environ: Dict[str, Any]) -> Union[bytes, Reply]:
        """The request body: ``CONTENT_LENGTH`` bytes, or, without one, all
        the server hands over when it says the input ends
        (``wsgi.input_terminated``: gunicorn, werkzeug, … de-chunk for it)."""
        stream = environ["wsgi.input"]
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared.strip():
            try:
                length = int(declared)
            except ValueError:
                return _text(400, f"Content-Length {declared!r} is not a number")
            if length > self.max_body_bytes:
                return self._too_large(length)
            body: bytes = stream.read(length) if length > 0 else b""
            return body
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked:
            return b""
        if not environ.get("wsgi.input_terminated"):
            return _text(
                411,
                "a chunked request body, and this WSGI server does not say where it "
                "ends (wsgi.input_terminated): send Content-Length or use a server that "
                "de-chunks (gunicorn, werkzeug)",
            )
        return read_bounded(stream.read, self.max_body_bytes)

    def __call__(
        self, environ: Dict[str, Any], start_response: WSGIStartResponse
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        routed = self._route(method, path)
        if isinstance(routed, Reply):
            reply = routed
        else:
            body = self._wsgi_body(environ)
            if isinstance(body, Reply):
                reply = body
            else:
                headers = {
                    key[5:].replace("_", "-"): value
                    for key, value in environ.items()
                    if key.startswith("HTTP_")
                }
                if environ.get("CONTENT_TYPE"):
                    headers["content-type"] = environ["CONTENT_TYPE"]
                reply = self.handle(method, path, headers, body)
        headers_out = reply.headers + [("content-length", str(len(reply.body)))]
        start_response(reply.status_line, headers_out)
        return [reply.body]

    async def asgi(self, scope: Dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """The ASGI application (HTTP only). Routes on the path below the
        mount point (``scope["root_path"]``: FastAPI/Starlette ``Mount``);
        reads every ``more_body`` chunk; runs nothing when the client went
        away before the body ended."""
        if scope.get("type") != "http":
            return
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        root = scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root) :]
        routed = self._route(method, path)
        if isinstance(routed, Reply):
            reply = routed
        else:
            chunks: List[bytes] = []
            size = 0
            too_large: Optional[Reply] = None
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    log.info("a task request's client went away before its body ended; not run")
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    too_large = self._too_large(size)
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            if too_large is not None:
                reply = too_large
            else:
                headers = {
                    k.decode("latin-1"): v.decode("latin-1")
                    for k, v in scope.get("headers", [])
                }
                reply = await self.handle_async(method, path, headers, b"".join(chunks))
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
    "DEFAULT_TOLERANCE",
    "Handlers",
    "MAX_BODY_BYTES",
    "SECRET_ENV",
    "PROGRESS_INTERVAL",
    "Permanent",
    "ProgressRefused",
    "Reply",
    "Retry",
    "TaskInfo",
    "run_task",
    "run_task_async",
    "signature",
    "task_info",
    "verify_signature",
]
