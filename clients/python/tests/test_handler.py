"""Handlers written with the kit, run by conveyor's ``http`` handler (a
real conveyor, see conftest.py), and the WSGI/ASGI adapters on their own."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Dict, List, MutableMapping

import pytest

from conveyor_client import Client, Handlers, Permanent, Retry, TaskFailed, TaskInfo

from conftest import Calls, wait_until


def test_kit_handler_succeeds_with_conveyor_headers(client: Client, calls: Calls) -> None:
    task = client.submit("kit_ok", {"n": 21})
    output = task.result(timeout=10)
    assert output["doubled"] == 42
    assert output["id"] == task.id
    assert output["type"] == "kit_ok"
    assert output["attempt"] == 1
    # The gateway made a trace context; the handler got the task's.
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", output["traceparent"])
    assert output["traceparent"].split("-")[1] == task.status().traceparent.split("-")[1]


def test_kit_retry_then_success_on_attempt_2(client: Client, calls: Calls) -> None:
    task = client.submit("kit_flaky", {"marker": "flaky"})
    assert task.result(timeout=10) == {"attempt": 2}
    assert calls.attempts(task.id) == [1, 2]
    assert task.status().attempts == 2


def test_kit_permanent_fails_for_good_with_its_message(client: Client) -> None:
    task = client.submit("kit_permanent", {"image": "x.png"})
    with pytest.raises(TaskFailed) as failed:
        task.result(timeout=10)
    assert failed.value.kind == "permanent"
    assert "422" in failed.value.message
    assert "no such image: x.png" in failed.value.message


def test_kit_unexpected_exception_is_retried_then_fails(client: Client, calls: Calls) -> None:
    task = client.submit("kit_crash", {})
    with pytest.raises(TaskFailed) as failed:
        task.result(timeout=10)
    assert failed.value.kind == "retryable"
    assert "ValueError: the handler broke" in failed.value.message
    # max_attempts = 3 in the test configuration: every one ran.
    assert wait_until(lambda: calls.attempts(task.id) == [1, 2, 3])


def _wsgi(app: Any, path: str, body: bytes, headers: Dict[str, str], method: str = "POST") -> Any:
    import io

    environ: Dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    for k, v in headers.items():
        if k.lower() == "content-type":
            environ["CONTENT_TYPE"] = v
        else:
            environ["HTTP_" + k.upper().replace("-", "_")] = v
    answer: Dict[str, Any] = {}

    def start_response(status: str, headers: List[Any]) -> None:
        answer["status"] = int(status.split()[0])
        answer["headers"] = dict(headers)

    answer["body"] = b"".join(app(environ, start_response))
    return answer


def test_wsgi_adapter_statuses() -> None:
    handlers = Handlers(max_body_bytes=100)

    @handlers.task("t")
    def run(payload: Any, task: TaskInfo) -> Any:
        if payload == "retry":
            raise Retry("later")
        if payload == "no":
            raise Permanent("never")
        if payload == "bug":
            raise KeyError("k")
        return {"payload": payload, "attempt": task.attempt}

    def call(body: bytes, path: str = "/t", **kw: Any) -> Any:
        headers = {"content-type": "application/json", "conveyor-attempt": "3"}
        return _wsgi(handlers, path, body, headers, **kw)

    ok = call(b'"hi"')
    assert (ok["status"], json.loads(ok["body"])) == (200, {"payload": "hi", "attempt": 3})
    assert (call(b'"retry"')["status"], call(b'"retry"')["body"]) == (503, b"later")
    assert (call(b'"no"')["status"], call(b'"no"')["body"]) == (422, b"never")
    assert call(b'"bug"')["status"] == 500
    assert call(b"{not json")["status"] == 422
    assert call(b'"' + b"x" * 200 + b'"')["status"] == 413
    assert call(b"1", path="/other")["status"] == 404
    assert call(b"", method="GET")["status"] == 405


def test_asgi_adapter_awaits_coroutines() -> None:
    handlers = Handlers()

    @handlers.task("a")
    async def run(payload: Any) -> Any:
        await asyncio.sleep(0)
        return {"got": payload}

    sent: List[MutableMapping[str, Any]] = []
    chunks = [b'{"x":', b" 1}"]

    async def receive() -> MutableMapping[str, Any]:
        body = chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/a",
        "headers": [(b"content-type", b"application/json"), (b"conveyor-attempt", b"2")],
    }
    asyncio.run(handlers.asgi(scope, receive, send))
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"got": {"x": 1}}


def test_client_refuses_an_answer_over_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    from conveyor_client import Client, ConnectionFailed
    from conveyor_client import _transport

    class Big(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"id": "' + b"x" * 2000 + b'"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(_transport, "MAX_ANSWER_BYTES", 1000)
    try:
        with Client(f"http://127.0.0.1:{server.server_port}") as client:
            with pytest.raises(ConnectionFailed) as error:
                client.task("0b1c5a7e-8c1f-4f43-9d3e-2f6f1f0c9a10")
        assert "over 1000 bytes" in str(error.value)
    finally:
        server.shutdown()
