"""examples/bottle, flask, fastapi and django: the web app submits a task
with the client, conveyor's http handler runs it through the app's handler
kit endpoint (signed, in the FastAPI and Django examples), and the app
shows the result — each against its own ``conveyor dev`` with the
example's configuration."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Tuple

import pytest

from conftest import REPO, Dev, free_port, need


def ask(url: str, body: Optional[Any] = None) -> Tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        assert process.poll() is None, "the example app exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the example app did not listen on {port}")


#: What each example needs installed.
NEEDS = {
    "bottle": ["bottle"],
    "flask": ["flask"],
    "fastapi": ["fastapi", "uvicorn"],
    "django": ["django"],
}


@pytest.mark.parametrize("example", sorted(NEEDS))
def test_example_round_trip(example: str, tmp_path: pathlib.Path) -> None:
    for module in NEEDS[example]:
        need(module)
    directory = REPO / "examples" / example
    port = free_port()
    config = (directory / "conveyor.toml").read_text()
    assert "127.0.0.1:8000" in config
    config = config.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    config += '\n[gateway]\nlisten = "127.0.0.1:0"\n\n[metrics]\nlisten = "127.0.0.1:0"\n'
    config += '\n[log]\nlevel = "warn"\n'
    signed = "signing_secret_env" in config
    secret = {"CONVEYOR_SIGNING_SECRET": "example-secret-" + os.urandom(16).hex()} if signed else {}
    dev = Dev(config, tmp_path, dict(os.environ, **secret))
    env = dict(
        os.environ,
        **secret,
        PORT=str(port),
        CONVEYOR_GATEWAY=dev.api or "",
        PYTHONPATH=os.pathsep.join([str(REPO / "clients" / "python" / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    app = subprocess.Popen(
        [sys.executable, str(directory / "app.py")], env=env, stdout=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, app)
        base = f"http://127.0.0.1:{port}"
        status, submitted = ask(base + "/reverse", {"text": "conveyor"})
        assert status == 202, submitted
        status, task = ask(base + "/result/" + submitted["id"])
        assert status == 200, task
        assert task["status"] == "succeeded", task
        assert task["result"] == {"reversed": "royevnoc", "length": 8}

        status, submitted = ask(base + "/reverse", {"text": None})
        assert status == 202, submitted
        _, task = ask(base + "/result/" + submitted["id"])
        assert task["status"] == "failed", task
        assert task["error"]["kind"] == "permanent"
        assert "payload.text must be a string" in task["error"]["message"]

        if signed:
            # The kit's endpoint takes only what conveyor signed.
            request = urllib.request.Request(
                base + "/tasks/reverse", data=b'{"text": "forged"}', method="POST"
            )
            request.add_header("content-type", "application/json")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401
            assert b"unsigned request" in refused.value.read()

        status, missing = ask(base + "/result/00000000-0000-4000-8000-000000000000")
        assert status == 404, missing
        assert missing["error"]["code"] == "unknown_task"
    finally:
        app.terminate()
        app.wait(10)
        dev.stop()
