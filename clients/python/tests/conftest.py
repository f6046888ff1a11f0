"""Fixtures: a real conveyor (``conveyor dev``: the embedded Kafka-protocol
cluster, a worker and the gateway in one process) and a WSGI server running
handlers written with the kit, which that conveyor's ``http`` handler calls.

The conveyor binary is ``$CONVEYOR_BIN`` (``tests/python_client.rs`` sets it
to the one cargo built), else ``target/debug/conveyor`` of this repository.
"""

from __future__ import annotations

import http.client
import http.server
import importlib
import json
import os
import pathlib
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from conveyor_client import Client, Handlers, Permanent, Retry, TaskInfo

REPO = pathlib.Path(__file__).resolve().parents[3]
TOKEN = "python-client-test-token"


def conveyor_bin() -> str:
    path = os.environ.get("CONVEYOR_BIN") or str(REPO / "target" / "debug" / "conveyor")
    if not os.path.exists(path):
        pytest.fail(f"no conveyor binary at {path}: run `cargo build` or set CONVEYOR_BIN")
    return path


def need(module: str) -> Any:
    """``module`` imported; skipped when missing, unless CI asks for every
    Python piece (``CONVEYOR_REQUIRE_PYTHON``): then the test fails."""
    if os.environ.get("CONVEYOR_REQUIRE_PYTHON"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_wsgi(app: Any) -> Tuple[str, Any]:
    """Serves ``app`` on a free loopback port in a thread; returns its base
    URL and the server (``shutdown()`` it)."""
    server = make_server("127.0.0.1", 0, app, _ThreadingServer, _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


class Dev:
    """A running ``conveyor dev`` with a configuration file."""

    def __init__(
        self, config: str, tmp: pathlib.Path, env: Optional[Dict[str, str]] = None
    ) -> None:
        path = tmp / "conveyor.toml"
        path.write_text(config)
        self.lines: List[str] = []
        self.process = subprocess.Popen(
            [conveyor_bin(), "dev", "--config", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        self.api: Optional[str] = None

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip())
                if line.strip().startswith("gateway: http://"):
                    self.api = line.split()[1]
                if "Ctrl-C stops" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.api is None or self.process.poll() is not None:
            self.stop()
            pytest.fail("conveyor dev did not start:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Calls:
    """What the kit's handlers saw, by task type (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: List[Tuple[str, Any, TaskInfo]] = []

    def add(self, kind: str, payload: Any, task: TaskInfo) -> None:
        with self._lock:
            self.seen.append((kind, payload, task))

    def markers(self, kind: str) -> Counter[Any]:
        with self._lock:
            return Counter(
                p.get("marker") for k, p, _ in self.seen if k == kind and isinstance(p, dict)
            )

    def attempts(self, task_id: str) -> List[int]:
        with self._lock:
            return [t.attempt for _, _, t in self.seen if t.id == task_id]


def kit_handlers(calls: Calls) -> Handlers:
    """The handlers the tests run through conveyor, written with the kit."""
    handlers = Handlers()

    @handlers.task("kit_ok")
    def ok(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_ok", payload, task)
        return {
            "doubled": payload["n"] * 2,
            "id": task.id,
            "type": task.type,
            "attempt": task.attempt,
            "traceparent": task.traceparent,
        }

    @handlers.task("kit_flaky")
    def flaky(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_flaky", payload, task)
        if task.attempt < 2:
            raise Retry("not yet: attempt %d" % task.attempt)
        return {"attempt": task.attempt}

    @handlers.task("kit_permanent")
    def permanent(payload: Any) -> Any:
        raise Permanent("no such image: %s" % payload.get("image"))

    @handlers.task("kit_crash")
    def crash(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_crash", payload, task)
        raise ValueError("the handler broke")

    @handlers.task("kit_progress")
    def progress(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_progress", payload, task)
        for n in (1, 2, 3):
            task.progress({"n": n})
            time.sleep(0.3)
        return {"reported": 3}

    @handlers.task("kit_block")
    def block(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_block", payload, task)
        time.sleep(8)
        return {"finished": True}

    @handlers.task("kit_count")
    def count(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_count", payload, task)
        return {"marker": payload.get("marker")}

    @handlers.task("kit_later")
    def later(payload: Any, task: TaskInfo) -> Any:
        calls.add("kit_later", dict(payload, at=time.monotonic()), task)
        if task.attempt < 2:
            raise Retry("the provider said: in 3 s", delay=payload.get("delay", 3))
        return {"attempt": task.attempt}

    return handlers


#: The signing secrets of the tests (conveyor reads them from files).
OLD_SECRET = "old-secret-of-the-tests-0001"
NEW_SECRET = "new-secret-of-the-tests-0002"
#: Task types whose requests conveyor signs: with the old secret, both,
#: the new one, none.
SIGNED_TYPES = ("signed_old", "signed_both", "signed_new", "signed_none")


class SignedKit:
    """A kit server whose requests must be signed; ``use(secret)`` swaps
    the secret(s) it takes (as a redeploy of the app would)."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self._current = self._handlers(OLD_SECRET)
        self.url, self.server = serve_wsgi(_mounted_by(lambda: self._current))

    def _handlers(self, secret: Any) -> Handlers:
        handlers = Handlers(secret=secret)
        for kind in SIGNED_TYPES:

            def run(payload: Any, task: TaskInfo, kind: str = kind) -> Any:
                self.calls.add(kind, payload, task)
                return {"signed": kind}

            handlers.add(kind, run)
        return handlers

    def use(self, secret: Any) -> None:
        self._current = self._handlers(secret)


def config(
    kit_url: str, extra: str = "", signed_url: str = "", secrets: Optional[pathlib.Path] = None
) -> str:
    def http(kind: str, more: str = "", base: str = kit_url) -> str:
        return (
            f'[processors.tasks.{kind}]\nhandler = "http"\n'
            f'url = "{base}/tasks/{kind}"\ntimeout_ms = 10000\n{more}'
        )

    # Its Retry-After of 3 s must not be capped at the processor's 200 ms.
    later = http("kit_later", "max_backoff_ms = 10000\n")
    signed = ""
    if secrets is not None:
        (secrets / "old").write_text(OLD_SECRET + "\n")
        (secrets / "both").write_text(OLD_SECRET + "," + NEW_SECRET)
        (secrets / "new").write_text(NEW_SECRET)
        for kind in SIGNED_TYPES:
            name = kind.split("_", 1)[1]
            file = f'signing_secret_file = "{secrets / name}"\n' if name != "none" else ""
            signed += http(kind, file, signed_url) + "\n"

    return f"""
[log]
level = "warn"

[metrics]
listen = "127.0.0.1:0"

[gateway]
listen = "127.0.0.1:0"
auth_tokens = ["{TOKEN}"]
max_wait_ms = 2000

[[processors]]
name = "py"
ordering = "key"
max_attempts = 3
initial_backoff_ms = 50
max_backoff_ms = 200

[processors.tasks.echo]
handler = "echo"

[processors.tasks.sleep]
handler = "sleep"

[processors.tasks.split_lines]
handler = "split_lines"

[processors.tasks.word_count]
handler = "word_count"

[processors.tasks.sum]
handler = "sum"

{http("kit_ok")}
{http("kit_flaky")}
{http("kit_permanent")}
{http("kit_crash")}
{http("kit_count")}
{http("kit_progress")}
{http("kit_block")}
{later}
{signed}

[[workflows]]
name = "wordcount"

[[workflows.steps]]
task = "split_lines"
fan_out = true

[[workflows.steps]]
task = "word_count"

[[workflows.steps]]
task = "sum"
join = true

[[workflows]]
name = "broken"

[[workflows.steps]]
task = "echo"

[[workflows.steps]]
task = "kit_permanent"
{extra}
"""


@pytest.fixture(scope="session")
def calls() -> Calls:
    return Calls()


@pytest.fixture(scope="session")
def signed_kit(calls: Calls) -> Iterator[SignedKit]:
    kit = SignedKit(calls)
    yield kit
    kit.server.shutdown()


@pytest.fixture(scope="session")
def dev(
    calls: Calls, signed_kit: SignedKit, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dev]:
    handlers = kit_handlers(calls)
    kit_url, kit_server = serve_wsgi(_mounted(handlers))
    secrets = tmp_path_factory.mktemp("secrets")
    running = Dev(
        config(kit_url, signed_url=signed_kit.url, secrets=secrets),
        tmp_path_factory.mktemp("dev"),
    )
    # Progress reports go to this gateway, known once it listens.
    handlers.gateway_url = running.api
    yield running
    running.stop()
    kit_server.shutdown()


def _mounted(handlers: Handlers) -> Any:
    """``handlers`` under /tasks/, as a web app would mount it."""
    return _mounted_by(lambda: handlers)


def _mounted_by(current: Any) -> Any:
    """The handlers ``current()`` returns under /tasks/."""

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/tasks/"):
            start_response("404 Not Found", [("content-type", "text/plain")])
            return [b"not here"]
        environ = dict(environ, PATH_INFO=path[len("/tasks") :])
        return current()(environ, start_response)

    return app


@pytest.fixture()
def client(dev: Dev) -> Iterator[Client]:
    assert dev.api is not None
    with Client(dev.api, token=TOKEN, timeout=10) as c:
        yield c


class FlakyProxy:
    """An HTTP proxy in front of the gateway that, for the next
    ``fail_next`` requests of a method in ``fail_methods`` (POST), forwards
    the request (so the gateway does write the task) and then answers with
    the status ``mode`` (``"503"``, ``"502"``, ``"409"``: a busy key) — or,
    in mode ``"drop"``, closes the connection without answering — as if the
    gateway's answer were lost. Records the body of every POST it
    forwarded and the target of every request (an absolute URL when a
    client uses it as its ``http_proxy``)."""

    def __init__(self, upstream: str, tls: Optional[Tuple[str, str]] = None) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.fail_next = 0
        self.fail_methods = ("POST",)
        self.mode = "503"
        self.posts: List[bytes] = []
        self.targets: List[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "content-length")
                }
                proxy.targets.append(f"{self.command} {self.path}")
                path = self.path
                if path.startswith("http://"):
                    parts = urllib.parse.urlsplit(path)
                    path = parts.path + ("?" + parts.query if parts.query else "")
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                status, reason = answer.status, answer.reason
                answer_headers = [
                    (k, v)
                    for k, v in answer.getheaders()
                    if k.lower() not in ("connection", "transfer-encoding", "content-length")
                ]
                if self.command == "POST":
                    proxy.posts.append(body or b"")
                if self.command in proxy.fail_methods and proxy.fail_next > 0:
                    proxy.fail_next -= 1
                    if proxy.mode == "drop":
                        self.close_connection = True
                        return
                    status, reason = int(proxy.mode), "Lost"
                    answer_headers = [("content-type", "application/json")]
                    code = "idempotency_key_in_use" if status == 409 else "unavailable"
                    data = json.dumps(
                        {"error": {"code": code, "message": "lost on purpose"}}
                    ).encode()
                self.send_response(status, reason)
                for k, v in answer_headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = forward
            do_POST = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxy(dev: Dev) -> Iterator[FlakyProxy]:
    assert dev.api is not None
    p = FlakyProxy(dev.api)
    yield p
    p.close()


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())
