"""The asyncio client: the same calls as :class:`~conveyor_client.Client`
as coroutines, over asyncio streams (no thread per call), with a bounded
pool of kept-alive connections that ``aclose()`` (or ``async with``)
closes.

    async with AsyncClient("http://127.0.0.1:8080") as client:
        task = await client.submit("resize", {"url": "..."})
        output = await task.result(timeout=10)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
import time
import urllib.parse
import uuid
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
)

from ._transport import MAX_ANSWER_BYTES, Transport, decode_answer, pause, retryable
from .client import (
    CONFLICT_BUDGET,
    MAX_POLL_WAIT,
    Client,
    Deadline,
    RunState,
    TaskState,
    _checked_items,
    _epoch_ms,
    _output_of,
    _segment,
    _start,
    _SubmitRetries,
    _trace,
)
from .errors import APIError, ConnectionFailed, ResultTimeout, RunFailed, TaskFailed

#: Most connections one :class:`AsyncClient` opens at once; more calls in
#: flight wait for one.
MAX_CONNECTIONS = 16
#: Longest status or header line read, and most header lines.
_MAX_LINE = 64 * 1024
_MAX_HEADERS = 100

_T = TypeVar("_T")
_State = TypeVar("_State", TaskState, RunState)

_Stream = Tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Malformed(Exception):
    """The server's answer is not HTTP/1.1 as expected."""


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as error:
        raise _Malformed("a header line over the limit") from error
    if len(line) > _MAX_LINE:
        raise _Malformed("a header line over the limit")
    return line


async def _read_head(reader: asyncio.StreamReader) -> Tuple[int, Dict[str, str], str]:
    """Status, headers (lower-case names) and HTTP version of an answer."""
    status_line = (await _read_line(reader)).decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _Malformed(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers: Dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        line = (await _read_line(reader)).decode("latin-1").rstrip("\r\n")
        if not line:
            return int(parts[1]), headers, parts[0]
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    raise _Malformed(f"over {_MAX_HEADERS} header lines")


async def _read_body(
    reader: asyncio.StreamReader, headers: Dict[str, str], status: int, method: str
) -> Tuple[bytes, bool]:
    """The body, and whether the connection may be used again."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b"", True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: List[bytes] = []
        size = 0
        while True:
            line = (await _read_line(reader)).split(b";", 1)[0].strip()
            try:
                length = int(line, 16)
            except ValueError as error:
                raise _Malformed(f"a bad chunk size {line[:20]!r}") from error
            if length == 0:
                while (await _read_line(reader)).strip():
                    pass  # trailers
                return b"".join(parts), True
            size += length
            if size > MAX_ANSWER_BYTES:
                raise ConnectionFailed(f"the answer is over {MAX_ANSWER_BYTES} bytes; not read")
            parts.append(await reader.readexactly(length))
            await reader.readexactly(2)
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Malformed(f"a bad Content-Length {declared[:20]!r}")
        length = int(declared)
        if length > MAX_ANSWER_BYTES:
            raise ConnectionFailed(f"the answer is over {MAX_ANSWER_BYTES} bytes; not read")
        return await reader.readexactly(length), True
    raw = await reader.read(MAX_ANSWER_BYTES + 1)
    while raw and len(raw) <= MAX_ANSWER_BYTES:
        more = await reader.read(MAX_ANSWER_BYTES + 1 - len(raw))
        if not more:
            break
        raw += more
    if len(raw) > MAX_ANSWER_BYTES:
        raise ConnectionFailed(f"the answer is over {MAX_ANSWER_BYTES} bytes; not read")
    return raw, False


class _AsyncTransport:
    """HTTP/1.1 over asyncio streams: at most ``max_connections`` at once,
    idle ones kept for the next call."""

    def __init__(self, transport: Transport, max_connections: int) -> None:
        self._t = transport
        self._idle: List[_Stream] = []
        self._open_streams: Set[asyncio.StreamWriter] = set()
        self._slots: Optional[asyncio.Semaphore] = None
        self._max = max_connections
        self._pid = os.getpid()
        self._closed = False

    async def _open(self) -> _Stream:
        t = self._t
        proxy = t.proxy
        if proxy is None:
            if t.https:
                reader, writer = await asyncio.open_connection(
                    t.host, t.port, ssl=t.ssl, server_hostname=t.host
                )
            else:
                reader, writer = await asyncio.open_connection(t.host, t.port)
        else:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            if t.https:
                auth = (
                    f"proxy-authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
                )
                writer.write(
                    f"CONNECT {t.host}:{t.port} HTTP/1.1\r\nhost: {t.host}:{t.port}\r\n{auth}\r\n".encode(
                        "latin-1"
                    )
                )
                await writer.drain()
                status, _, _ = await _read_head(reader)
                if status != 200:
                    writer.close()
                    raise ConnectionFailed(f"the proxy refused CONNECT {t.host}:{t.port}: {status}")
                await writer.start_tls(t.ssl or ssl.create_default_context(), server_hostname=t.host)
        self._open_streams.add(writer)
        return reader, writer

    def _forget(self, stream: _Stream) -> None:
        writer = stream[1]
        self._open_streams.discard(writer)
        writer.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: float,
        headers: Optional[Dict[str, str]] = None,
    ) -> Tuple[int, Any, Dict[str, str]]:
        """As :meth:`Transport.request`, on a pooled stream."""
        if self._closed:
            raise ConnectionFailed("this AsyncClient is closed")
        if self._pid != os.getpid():
            # Inherited through fork: the parent's streams are not ours.
            self._idle, self._open_streams, self._slots = [], set(), None
            self._pid = os.getpid()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        t = self._t
        send = t.headers("application/json")
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            send["content-type"] = "application/json"
        if headers:
            send.update(headers)
        target = t.target(path)
        host = t.host if t.port in (80, 443) else f"{t.host}:{t.port}"
        head = f"{method} {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(data)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in send.items()) + "\r\n"
        message = head.encode("latin-1") + data
        async with self._slots:
            for fresh_try in (False, True):
                reused = bool(self._idle)
                try:
                    stream = self._idle.pop() if reused else await asyncio.wait_for(self._open(), timeout)
                except (OSError, asyncio.TimeoutError, _Malformed) as error:
                    raise ConnectionFailed(f"{method} {target}: {type(error).__name__}: {error}") from error
                try:
                    status, answer_headers, raw, keep = await asyncio.wait_for(
                        self._exchange(stream, message, method), timeout
                    )
                except (
                    OSError,
                    asyncio.TimeoutError,
                    asyncio.IncompleteReadError,
                    _Malformed,
                    ConnectionFailed,
                ) as error:
                    self._forget(stream)
                    if reused and not fresh_try and not isinstance(error, asyncio.TimeoutError):
                        continue
                    if isinstance(error, ConnectionFailed):
                        raise ConnectionFailed(f"{method} {target}: {error}") from error
                    raise ConnectionFailed(
                        f"{method} {target}: {type(error).__name__}: {error}"
                    ) from error
                if keep and not self._closed and len(self._idle) < self._max:
                    self._idle.append(stream)
                else:
                    self._forget(stream)
                decoded = decode_answer(method, target, status, answer_headers, raw)
                return status, decoded, answer_headers
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(
        self, stream: _Stream, message: bytes, method: str
    ) -> Tuple[int, Dict[str, str], bytes, bool]:
        reader, writer = stream
        writer.write(message)
        await writer.drain()
        status, headers, version = await _read_head(reader)
        body, reusable = await _read_body(reader, headers, status, method)
        keep = (
            reusable
            and version == "HTTP/1.1"
            and "close" not in headers.get("connection", "").lower()
        )
        return status, headers, body, keep

    async def aclose(self) -> None:
        self._closed = True
        writers = list(self._open_streams)
        self._idle, self._open_streams = [], set()
        for writer in writers:
            writer.close()
        for writer in writers:
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


class AsyncTask:
    """:class:`~conveyor_client.Task` with awaitable lookups."""

    def __init__(
        self, client: "AsyncClient", id: str, type: Optional[str], idempotent_replay: bool = False
    ) -> None:
        self._client = client
        self.id = id
        self.type = type
        self.idempotent_replay = idempotent_replay

    def __repr__(self) -> str:
        return f"AsyncTask(id={self.id!r}, type={self.type!r})"

    async def status(self) -> TaskState:
        return await self._client._task_state(self.id, None)

    async def wait(self, timeout: Optional[float] = 10.0) -> TaskState:
        return await self._client._wait(
            lambda wait: self._client._task_state(self.id, wait), timeout, f"task {self.id}"
        )

    async def result(self, timeout: Optional[float] = 10.0) -> Any:
        return _output_of(await self.wait(timeout), TaskFailed)

    async def ready(self) -> bool:
        return (await self.status()).done

    async def successful(self) -> bool:
        return (await self.status()).status == "succeeded"

    async def get(self, timeout: Optional[float] = None, propagate: bool = True) -> Any:
        try:
            return await self.result(timeout)
        except TaskFailed as failed:
            if propagate:
                raise
            return failed

    async def cancel(self) -> Dict[str, Any]:
        return await self._client.cancel(self.id)


class AsyncRun:
    """:class:`~conveyor_client.Run` with awaitable lookups."""

    def __init__(
        self,
        client: "AsyncClient",
        id: str,
        workflow: Optional[str],
        idempotent_replay: bool = False,
    ) -> None:
        self._client = client
        self.id = id
        self.workflow = workflow
        self.idempotent_replay = idempotent_replay

    def __repr__(self) -> str:
        return f"AsyncRun(id={self.id!r}, workflow={self.workflow!r})"

    async def status(self) -> RunState:
        return await self._client._run_state(self.id, None)

    async def wait(self, timeout: Optional[float] = 10.0) -> RunState:
        return await self._client._wait(
            lambda wait: self._client._run_state(self.id, wait),
            timeout,
            f"workflow run {self.id}",
        )

    async def result(self, timeout: Optional[float] = 10.0) -> Any:
        return _output_of(await self.wait(timeout), RunFailed)


class AsyncClient:
    """:class:`~conveyor_client.Client` for asyncio: the same arguments
    (plus ``max_connections``), the same retries, coroutines instead of
    calls. Use it inside one event loop; ``aclose()`` it (or ``async
    with``) to close its connections."""

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
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        # Checks the arguments and builds request bodies; never sends.
        self._bodies = Client(
            base_url,
            token,
            timeout,
            retries,
            backoff,
            ca_file=ca_file,
            ssl_context=ssl_context,
            trust_env=trust_env,
            conflict_budget=conflict_budget,
        )
        self._http = _AsyncTransport(self._bodies._transport, max_connections)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.conflict_budget = conflict_budget

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes every connection the client opened."""
        await self._http.aclose()

    async def submit(
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
    ) -> AsyncTask:
        """See :meth:`Client.submit`."""
        body = self._bodies._new_task(
            type, payload, key, idempotency_key, deadline, expires_in, delay, run_at
        )
        answer = await self._submit("/v1/tasks", body, _trace(traceparent))
        return AsyncTask(self, str(answer["id"]), type, bool(answer.get("idempotent_replay")))

    async def submit_many(
        self, tasks: Iterable[Mapping[str, Any]], *, traceparent: Optional[str] = None
    ) -> List[AsyncTask]:
        """See :meth:`Client.submit_many`."""
        items = list(tasks)
        bodies = [self._bodies._new_item(item) for item in _checked_items(items)]
        if not bodies:
            return []
        answer = await self._submit("/v1/tasks:batch", {"tasks": bodies}, _trace(traceparent))
        return [
            AsyncTask(self, str(a["id"]), b["type"], bool(a.get("idempotent_replay")))
            for a, b in zip(answer["tasks"], bodies)
        ]

    async def start_workflow(
        self,
        name: str,
        payload: Any,
        idempotency_key: Optional[str] = None,
        *,
        delay: Optional[Union[float, datetime.timedelta]] = None,
        run_at: Optional[datetime.datetime] = None,
        traceparent: Optional[str] = None,
    ) -> AsyncRun:
        """See :meth:`Client.start_workflow`."""
        body: Dict[str, Any] = {
            "payload": payload,
            "idempotency_key": idempotency_key or str(uuid.uuid4()),
        }
        body.update(_start(delay, run_at))
        answer = await self._submit("/v1/workflows/" + _segment(name), body, _trace(traceparent))
        return AsyncRun(
            self,
            str(answer["id"]),
            str(answer.get("workflow", name)),
            bool(answer.get("idempotent_replay")),
        )

    async def task(self, id: str) -> AsyncTask:
        state = await self._task_state(id, None)
        return AsyncTask(self, state.id, state.type)

    async def run(self, id: str) -> AsyncRun:
        state = await self._run_state(id, None)
        return AsyncRun(self, state.id, state.workflow)

    async def cancel(self, id: str) -> Dict[str, Any]:
        """See :meth:`Client.cancel`."""
        path = "/v1/tasks/" + _segment(id) + ":cancel"
        _, answer, _ = await self._retried(
            lambda: self._http.request("POST", path, None, self.timeout)
        )
        return dict(answer)

    revoke = cancel

    async def tasks(
        self,
        type: Optional[str] = None,
        status: Optional[str] = None,
        key: Optional[str] = None,
        since: Optional[Union[int, datetime.datetime]] = None,
        until: Optional[Union[int, datetime.datetime]] = None,
        page_size: int = 100,
    ) -> AsyncIterator[TaskState]:
        """See :meth:`Client.tasks`."""
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be from 1 to 1000")
        query = {k: v for k, v in {"type": type, "status": status, "key": key}.items() if v}
        for name, at in (("since", since), ("until", until)):
            if at is not None:
                query[name] = str(_epoch_ms(name, at))
        query["limit"] = str(page_size)
        while True:
            _, answer, _ = await self._get("/v1/tasks?" + urllib.parse.urlencode(query), None)
            for item in answer.get("tasks") or []:
                yield TaskState.from_json(dict(item))
            cursor = answer.get("next_cursor")
            if not isinstance(cursor, str):
                return
            query["cursor"] = cursor

    # -- internals ----------------------------------------------------

    async def _retried(self, call: Callable[[], Awaitable[_T]]) -> _T:
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except (ConnectionFailed, APIError) as error:
                if attempt == self.retries or not retryable(error):
                    raise
            await asyncio.sleep(pause(attempt, self.backoff))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _submit(
        self, path: str, body: Dict[str, Any], headers: Optional[Dict[str, str]]
    ) -> Dict[str, Any]:
        again = _SubmitRetries(self.retries, self.backoff, self.conflict_budget, body)
        while True:
            try:
                _, answer, _ = await self._http.request("POST", path, body, self.timeout, headers)
                if not isinstance(answer, dict):
                    raise ConnectionFailed(f"POST {path}: answered {answer!r}")
                return answer
            except (ConnectionFailed, APIError) as error:
                wait = again.wait_after(error)
            await asyncio.sleep(wait)

    async def _get(self, path: str, wait_ms: Optional[int]) -> Tuple[int, Any, Dict[str, str]]:
        timeout = self.timeout
        if wait_ms is not None:
            path += f"?wait={wait_ms}ms"
            timeout += wait_ms / 1000
        return await self._retried(lambda: self._http.request("GET", path, None, timeout))

    async def _task_state(self, id: str, wait_ms: Optional[int]) -> TaskState:
        _, answer, _ = await self._get("/v1/tasks/" + _segment(id), wait_ms)
        return TaskState.from_json(answer)

    async def _run_state(self, id: str, wait_ms: Optional[int]) -> RunState:
        _, answer, _ = await self._get("/v1/workflows/" + _segment(id), wait_ms)
        return RunState.from_json(answer)

    async def _wait(
        self,
        fetch: Callable[[int], Awaitable[_State]],
        timeout: Optional[float],
        what: str,
    ) -> _State:
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be >= 0 seconds, or None to wait until it ends")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = MAX_POLL_WAIT if end is None else end - time.monotonic()
            wait = max(0.0, min(remaining, MAX_POLL_WAIT))
            state = await fetch(int(wait * 1000))
            if state.done:
                return state
            if end is not None and timeout is not None and end - time.monotonic() <= 0:
                raise ResultTimeout(what, timeout, state.status)


__all__ = ["AsyncClient", "AsyncRun", "AsyncTask", "MAX_CONNECTIONS"]
