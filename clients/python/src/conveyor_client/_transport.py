"""HTTP/1.1 to the gateway with the standard library, one kept-alive
connection per thread."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from .errors import ConnectionFailed, api_error

USER_AGENT = "conveyor-client-python/1"

#: Largest answer read from the gateway (a task's output is bounded by the
#: Kafka record size, about 1 MiB by default; this leaves room for batches).
MAX_ANSWER_BYTES = 64 * 1024 * 1024

Connection = Union[http.client.HTTPConnection, http.client.HTTPSConnection]

#: Longest line of an event stream read (an event's data is bounded by the
#: gateway's task view: outputs of about 1 MiB).
MAX_EVENT_LINE = 8 * 1024 * 1024


class NoContent(Exception):
    """The server answered 204 (an event stream resumed after its end)."""


class Transport:
    def __init__(self, base_url: str, token: Optional[str]) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"base_url must be http://host[:port] or https://host[:port], not {base_url!r}"
            )
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._local = threading.local()

    def _connection(self, timeout: float) -> Tuple[Connection, bool]:
        """This thread's connection, and whether it was used before."""
        conn: Optional[Connection] = getattr(self._local, "conn", None)
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._local.conn = conn
        return conn, False

    def _drop(self) -> None:
        conn: Optional[Connection] = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Closes the calling thread's connection."""
        self._drop()

    def stream(
        self, path: str, last_event_id: Optional[str], timeout: float
    ) -> Iterator[Tuple[str, Optional[str], Any]]:
        """Reads a ``text/event-stream`` on a connection of its own; yields
        (event, id, decoded JSON data) per event until the server closes.
        Raises :class:`NoContent` on 204, the API's error on another
        non-2xx answer, ``ConnectionFailed`` when the connection breaks."""
        headers = {"accept": "text/event-stream", "user-agent": USER_AGENT}
        if self._token:
            headers["authorization"] = "Bearer " + self._token
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        target = self._prefix + path
        if self._https:
            conn: Connection = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as error:
                raise ConnectionFailed(f"GET {target}: {type(error).__name__}: {error}") from error
            if response.status == 204:
                raise NoContent()
            if response.status != 200:
                raw = response.read(MAX_ANSWER_BYTES)
                text = raw.decode("utf-8", errors="replace")
                try:
                    decoded = json.loads(text)
                except ValueError:
                    decoded = None
                raise api_error(response.status, decoded, text)
            event: str = "message"
            event_id: Optional[str] = None
            data: List[str] = []
            while True:
                try:
                    line = response.readline(MAX_EVENT_LINE + 1)
                except (OSError, http.client.HTTPException) as error:
                    raise ConnectionFailed(
                        f"GET {target}: {type(error).__name__}: {error}"
                    ) from error
                if not line:
                    return
                if len(line) > MAX_EVENT_LINE:
                    raise ConnectionFailed(f"GET {target}: an event line over {MAX_EVENT_LINE} bytes")
                text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                if text == "":
                    if data:
                        payload = "\n".join(data)
                        try:
                            decoded = json.loads(payload)
                        except ValueError:
                            decoded = payload
                        yield event, event_id, decoded
                    event, event_id, data = "message", None, []
                    continue
                if text.startswith(":"):
                    continue
                name, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "id":
                    event_id = value
                elif name == "data":
                    data.append(value)
        finally:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 30.0,
        headers: Optional[Dict[str, str]] = None,
    ) -> Tuple[int, Any, Dict[str, str]]:
        """Sends one request; returns (status, decoded JSON or None,
        headers) for a 2xx answer and raises the API's error otherwise.

        A request that fails on a connection that was idle since an earlier
        request is sent once more on a fresh one (the server may have closed
        it meanwhile); the gateway's POSTs sent here always carry an
        idempotency key, so that cannot make a second task.
        """
        send_headers = {"accept": "application/json", "user-agent": USER_AGENT}
        data: Optional[bytes] = None
        if body is not None:
            data = json.dumps(body).encode()
            send_headers["content-type"] = "application/json"
        if self._token:
            send_headers["authorization"] = "Bearer " + self._token
        if headers:
            send_headers.update(headers)
        target = self._prefix + path
        for fresh_try in (False, True):
            conn, reused = self._connection(timeout)
            try:
                conn.request(method, target, body=data, headers=send_headers)
                response = conn.getresponse()
                raw = response.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException) as error:
                self._drop()
                if reused and not fresh_try:
                    continue
                raise ConnectionFailed(
                    f"{method} {target}: {type(error).__name__}: {error}"
                ) from error
            if len(raw) > MAX_ANSWER_BYTES:
                self._drop()
                raise ConnectionFailed(
                    f"{method} {target}: the answer is over {MAX_ANSWER_BYTES} bytes; not read"
                )
            if response.will_close:
                self._drop()
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
            text = raw.decode("utf-8", errors="replace")
            decoded: Any = None
            if "json" in answer_headers.get("content-type", "") and raw:
                try:
                    decoded = json.loads(text)
                except ValueError:
                    decoded = None
            if 200 <= response.status < 300:
                if decoded is None:
                    raise ConnectionFailed(
                        f"{method} {target}: answered {response.status} without a JSON body"
                    )
                return response.status, decoded, answer_headers
            raise api_error(response.status, decoded, text)
        raise AssertionError("unreachable")  # pragma: no cover
