"""Fixtures of the dashboard's browser tests: a real ``conveyor dev`` (the
embedded cluster, a worker and the gateway in one process) and Debian's
headless chromium driven by Playwright.

The binary is ``$CONVEYOR_BIN`` (tests/dashboard.rs sets it to the one
cargo built); the browser ``$CONVEYOR_CHROMIUM`` or ``/usr/bin/chromium``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "dashboard-test-token"

# A worker with the built-in handlers, the demo workflow and a schedule
# firing every 2 s; reports and lag figures every 500 ms so that pages
# show them soon.
CONFIG = """
[gateway]
listen = "127.0.0.1:0"
{auth}

[workers]
report_interval_ms = 500

[metrics]
listen = "127.0.0.1:0"
lag_interval_ms = 500

[[processors]]
name = "dev"
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

[[schedules]]
name = "heartbeat"
cron = "*/2 * * * * *"
type = "echo"
payload = '{{"beat": true}}'
"""


def conveyor_bin() -> str:
    path = os.environ.get("CONVEYOR_BIN") or str(REPO / "target" / "debug" / "conveyor")
    if not os.path.exists(path):
        pytest.fail(f"no conveyor binary at {path}: run `cargo build` or set CONVEYOR_BIN")
    return path


class Dev:
    """A running ``conveyor dev`` with the test configuration."""

    def __init__(self, auth: bool) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="conveyor-dashboard-")
        path = pathlib.Path(self.dir.name) / "conveyor.toml"
        path.write_text(CONFIG.format(auth=f'auth_tokens = ["{TOKEN}"]' if auth else ""))
        self.token = TOKEN if auth else None
        self.lines: List[str] = []
        self.process = subprocess.Popen(
            [conveyor_bin(), "dev", "--config", str(path)],
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

    def call(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """One API call (with the bearer token when auth is on)."""
        assert self.api is not None
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.api + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        if self.token:
            request.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def submit(self, task_type: str, payload: Any, **extra: Any) -> str:
        status, body = self.call("POST", "/v1/tasks", dict(type=task_type, payload=payload, **extra))
        assert status == 202, body
        return str(body["id"])

    def wait(self, task_id: str) -> Dict[str, Any]:
        status, body = self.call("GET", f"/v1/tasks/{task_id}?wait=20s")
        assert status == 200, body
        return dict(body)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.dir.cleanup()


def chromium() -> str:
    path = os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(path):
        if os.environ.get("CONVEYOR_REQUIRE_BROWSER"):
            pytest.fail(f"no chromium at {path} (apt-get install chromium)")
        pytest.skip(f"no chromium at {path}")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("CONVEYOR_REQUIRE_BROWSER"):
        from playwright.sync_api import sync_playwright
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
        sync_playwright = sync_api.sync_playwright
    path = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=path,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-quic",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    d = Dev(auth=False)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def dev_auth() -> Iterator[Dev]:
    d = Dev(auth=True)
    yield d
    d.stop()
