"""The kit's ASGI and WSGI adapters as servers drive them: mounts,
bodies in chunks, clients that go away, chunked WSGI input, and
``Retry(delay=...)`` honoured by conveyor."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from typing import Any, Dict, List, MutableMapping

import pytest

from conveyor_client import Client, Handlers, Retry, TaskInfo

from conftest import Calls, Dev, need, serve_wsgi


def recorded() -> "tuple[Handlers, List[Any]]":
    seen: List[Any] = []
    handlers = Handlers()

    @handlers.task("kit")
    def kit(payload: Any) -> Any:
        seen.append(payload)
        return {"got": payload}

    return handlers, seen


def drive(
    handlers: Handlers, scope: Dict[str, Any], messages: List[Dict[str, Any]]
) -> List[MutableMapping[str, Any]]:
    sent: List[MutableMapping[str, Any]] = []
    queue = list(messages)

    async def receive() -> MutableMapping[str, Any]:
        return queue.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(handlers.asgi(scope, receive, send))
    return sent


def scope(path: str, root_path: str = "") -> Dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": root_path,
        "headers": [(b"content-type", b"application/json")],
    }


def test_asgi_routes_below_its_mount_point() -> None:
    handlers, seen = recorded()
    body = [{"type": "http.request", "body": b"[1]", "more_body": False}]
    # Starlette >= 0.35 keeps the prefix in `path` and sets `root_path`.
    sent = drive(handlers, scope("/tasks/kit", "/tasks"), list(body))
    assert sent[0]["status"] == 200, sent
    # Servers that strip the prefix from `path` themselves.
    sent = drive(handlers, scope("/kit", "/tasks"), list(body))
    assert sent[0]["status"] == 200, sent
    sent = drive(handlers, scope("/tasks/nope", "/tasks"), list(body))
    assert sent[0]["status"] == 404
    assert b"'nope'" in sent[1]["body"]
    assert seen == [[1], [1]]


def test_asgi_reads_every_chunk_and_runs_nothing_for_a_client_gone_mid_body() -> None:
    handlers, seen = recorded()
    chunks = [
        {"type": "http.request", "body": b'{"parts": ', "more_body": True},
        {"type": "http.request", "body": b"[1, 2", "more_body": True},
        {"type": "http.request", "body": b"]}", "more_body": False},
    ]
    sent = drive(handlers, scope("/kit"), chunks)
    assert json.loads(sent[1]["body"]) == {"got": {"parts": [1, 2]}}
    gone = [
        {"type": "http.request", "body": b'{"parts": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    assert drive(handlers, scope("/kit"), gone) == []
    assert seen == [{"parts": [1, 2]}]


def chunked_post(base: str, path: str, parts: List[bytes]) -> "tuple[int, bytes]":
    """A chunked POST sent whole in one write (a server that answers before
    reading the body, as the 411 does, cannot break the send), then the
    answer read to the connection's close."""
    host, port = base.split("://", 1)[1].split(":")
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
        "content-type: application/json\r\ntransfer-encoding: chunked\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, content = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), content


def test_wsgi_reads_a_chunked_body_where_the_server_ends_it() -> None:
    werkzeug = need("werkzeug.serving")
    handlers, seen = recorded()
    server = werkzeug.make_server("127.0.0.1", 0, handlers, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, body = chunked_post(f"http://127.0.0.1:{server.port}", "/kit", [b'{"a":', b" [1, ", b"2]}"])
    finally:
        server.shutdown()
    assert status == 200, body
    assert json.loads(body) == {"got": {"a": [1, 2]}}
    # wsgiref hands over the raw stream and does not say where it ends:
    # refused with 411 (a permanent failure naming why), never guessed.
    base, plain = serve_wsgi(handlers)
    try:
        status, body = chunked_post(base, "/kit", [b"[3]"])
    finally:
        plain.shutdown()
    assert status == 411, body
    assert b"Content-Length" in body
    assert seen == [{"a": [1, 2]}]


def test_retry_with_a_delay_holds_the_next_attempt_that_long(client: Client, calls: Calls) -> None:
    marker = str(uuid.uuid4())
    task = client.submit("kit_later", {"marker": marker, "delay": 3})
    assert task.result(timeout=20) == {"attempt": 2}
    times = [p["at"] for kind, p, t in calls.seen if kind == "kit_later" and p.get("marker") == marker]
    assert len(times) == 2, times
    assert times[1] - times[0] >= 3.0, times


def test_a_long_retry_delay_goes_through_the_retry_topic(
    dev: Dev, client: Client, calls: Calls
) -> None:
    """6 s is over the processor's retry_topic_threshold_ms (5 s): the task
    is parked in the retry topic, not waited for in place."""
    marker = str(uuid.uuid4())
    task = client.submit("kit_later", {"marker": marker, "delay": 6})
    assert task.result(timeout=30) == {"attempt": 2}
    times = [p["at"] for kind, p, t in calls.seen if kind == "kit_later" and p.get("marker") == marker]
    assert len(times) == 2 and times[1] - times[0] >= 6.0, times
    parked = [l for l in dev.lines if task.id in l and "retry topic" in l]
    assert parked, "no log line says the task was parked in the retry topic"


def test_retry_delay_is_sent_as_retry_after() -> None:
    handlers = Handlers()

    @handlers.task("later")
    def later(payload: Any, task: TaskInfo) -> Any:
        raise Retry("busy", delay=payload)

    for delay, header in ((3, "3"), (0.2, "1"), (0, "0")):
        reply = handlers.handle("POST", "/later", {}, json.dumps(delay).encode())
        assert reply.status == 503
        assert ("retry-after", header) in reply.headers, reply.headers
    with pytest.raises(ValueError, match="delay"):
        Retry("x", delay=-1)
