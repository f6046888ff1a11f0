"""HTTP/1.1 to the gateway with the standard library: one kept-alive
connection per thread and process, TLS settings, proxies from the
environment, and the retry rules both clients share."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar, Union

from .errors import APIError, ConnectionFailed, api_error

USER_AGENT = "conveyor-client-python/1"

#: Largest answer read from the gateway (a task's output is bounded by the
#: Kafka record size, about 1 MiB by default; this leaves room for batches).
MAX_ANSWER_BYTES = 64 * 1024 * 1024

Connection = Union[http.client.HTTPConnection, http.client.HTTPSConnection]

#: Longest line of an event stream read (an event's data is bounded by the
#: gateway's task view: outputs of about 1 MiB).
MAX_EVENT_LINE = 8 * 1024 * 1024

#: Statuses a request is sent again on (when it may be: GETs, and POSTs
#: carrying an idempotency key): the gateway, or a proxy in front of it,
#: could not serve it just now.
RETRY_STATUSES = (502, 503, 504)

#: Longest pause between two retries, in seconds.
MAX_BACKOFF = 5.0

_T = TypeVar("_T")


class NoContent(Exception):
    """The server answered 204 (an event stream resumed after its end)."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it is and its ``Proxy-Authorization``."""

    host: str
    port: int
    authorization: Optional[str]


def proxy_for(scheme: str, host: str, trust_env: bool) -> Optional[Proxy]:
    """The proxy the environment names for ``scheme`` (``http_proxy``,
    ``https_proxy``), unless ``no_proxy`` lists ``host``."""
    if not trust_env:
        return None
    url = urllib.request.getproxies().get(scheme)
    if not url or urllib.request.proxy_bypass(host):
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{scheme}_proxy: only http:// proxies are supported, not {url!r}")
    authorization = None
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)


def ssl_context_of(
    ssl_context: Optional[ssl.SSLContext], ca_file: Optional[str]
) -> ssl.SSLContext:
    if ssl_context is not None and ca_file is not None:
        raise ValueError("give ssl_context or ca_file, not both")
    if ssl_context is not None:
        return ssl_context
    return ssl.create_default_context(cafile=ca_file)


def decode_answer(
    method: str, target: str, status: int, headers: Dict[str, str], raw: bytes
) -> Any:
    """A 2xx answer's JSON; raises the API's error for any other status."""
    text = raw.decode("utf-8", errors="replace")
    decoded: Any = None
    if "json" in headers.get("content-type", "") and raw:
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = None
    if 200 <= status < 300:
        if decoded is None:
            raise ConnectionFailed(f"{method} {target}: answered {status} without a JSON body")
        return decoded
    raise api_error(status, decoded, text)


def retryable(error: Exception) -> bool:
    """Whether sending the same (idempotent) request again may help."""
    if isinstance(error, ConnectionFailed):
        return True
    return isinstance(error, APIError) and error.status in RETRY_STATUSES


def pause(attempt: int, backoff: float) -> float:
    """The wait before retry ``attempt`` (from 0): ``backoff`` doubling,
    ±20 %, at most :data:`MAX_BACKOFF`."""
    return min(backoff * float(2 ** min(attempt, 16)), MAX_BACKOFF) * random.uniform(0.8, 1.2)


class Transport:
    def __init__(
        self,
        base_url: str,
        token: Optional[str],
        ssl_context: Optional[ssl.SSLContext] = None,
        ca_file: Optional[str] = None,
        trust_env: bool = True,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"base_url must be http://host[:port] or https://host[:port], not {base_url!r}"
            )
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.ssl = ssl_context_of(ssl_context, ca_file) if self.https else None
        if not self.https and (ssl_context is not None or ca_file is not None):
            raise ValueError("ssl_context and ca_file are for https:// gateways")
        self.proxy = proxy_for(parts.scheme, self.host, trust_env)
        self._local = threading.local()

    def target(self, path: str) -> str:
        """The request target: the path, or the whole URL through a plain
        HTTP proxy."""
        if self.proxy is not None and not self.https:
            return f"http://{self.host}:{self.port}{self.prefix}{path}"
        return self.prefix + path

    def headers(self, accept: str) -> Dict[str, str]:
        headers = {"accept": accept, "user-agent": USER_AGENT}
        if self.token:
            headers["authorization"] = "Bearer " + self.token
        if self.proxy is not None and self.proxy.authorization and not self.https:
            headers["proxy-authorization"] = self.proxy.authorization
        return headers

    def _open(self, timeout: float) -> Connection:
        proxy = self.proxy
        if self.https:
            if proxy is None:
                return http.client.HTTPSConnection(
                    self.host, self.port, timeout=timeout, context=self.ssl
                )
            conn = http.client.HTTPSConnection(
                proxy.host, proxy.port, timeout=timeout, context=self.ssl
            )
            tunnel = {"proxy-authorization": proxy.authorization} if proxy.authorization else None
            conn.set_tunnel(self.host, self.port, headers=tunnel)
            return conn
        if proxy is None:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)

    def _connection(self, timeout: float) -> Tuple[Connection, bool]:
        """This thread's connection in this process, and whether it was
        used before. A connection inherited through ``fork`` (gunicorn
        ``--preload``, multiprocessing) is never used: parent and child
        would read each other's answers on it."""
        conn: Optional[Connection] = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        # Another process's socket is left alone (closing it here would
        # not close it there, and nothing must be written on it).
        conn = self._open(timeout)
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn, False

    def _drop(self) -> None:
        conn: Optional[Connection] = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
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
        headers = self.headers("text/event-stream")
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        target = self.target(path)
        conn = self._open(timeout)
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
                answer_headers = {k.lower(): v for k, v in response.getheaders()}
                decode_answer("GET", target, response.status, answer_headers, raw)
            yield from parse_events(lambda: response.readline(MAX_EVENT_LINE + 1), target)
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
        """Sends one request; returns (status, decoded JSON, headers) for a
        2xx answer and raises the API's error otherwise.

        A request that fails on a connection that was idle since an earlier
        request is sent once more on a fresh one (the server may have closed
        it meanwhile); the gateway's POSTs sent here always carry an
        idempotency key, so that cannot make a second task.
        """
        send_headers = self.headers("application/json")
        data: Optional[bytes] = None
        if body is not None:
            data = json.dumps(body).encode()
            send_headers["content-type"] = "application/json"
        if headers:
            send_headers.update(headers)
        target = self.target(path)
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
            decoded = decode_answer(method, target, response.status, answer_headers, raw)
            return response.status, decoded, answer_headers
        raise AssertionError("unreachable")  # pragma: no cover


def with_retries(call: Callable[[], _T], retries: int, backoff: float) -> _T:
    """``call()``, sent again up to ``retries`` times on a connection failure
    or a 502/503/504, ``backoff`` seconds apart and doubling; the last
    error is raised."""
    for attempt in range(retries + 1):
        try:
            return call()
        except (ConnectionFailed, APIError) as error:
            if attempt == retries or not retryable(error):
                raise
        time.sleep(pause(attempt, backoff))
    raise AssertionError("unreachable")  # pragma: no cover


def parse_events(
    readline: Callable[[], bytes], target: str
) -> Iterator[Tuple[str, Optional[str], Any]]:
    """Server-sent events from lines read by ``readline`` (empty at the
    end): (event, id, decoded JSON data)."""
    event: str = "message"
    event_id: Optional[str] = None
    data: List[str] = []
    while True:
        try:
            line = readline()
        except (OSError, http.client.HTTPException) as error:
            raise ConnectionFailed(f"GET {target}: {type(error).__name__}: {error}") from error
        if not line:
            return
        if len(line) > MAX_EVENT_LINE:
            raise ConnectionFailed(f"GET {target}: an event line over {MAX_EVENT_LINE} bytes")
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        if text == "":
            if data:
                payload = "\n".join(data)
                decoded: Any
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
