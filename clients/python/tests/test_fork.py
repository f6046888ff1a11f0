"""gunicorn ``--preload`` with 4 workers sharing a client made before the
fork: 1,000 concurrent requests, each answered with its own task."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import urllib.request
import uuid
from typing import Any, Dict

from conftest import REPO, TOKEN, Dev, free_port, need
from test_examples import wait_for_port


def test_preloaded_gunicorn_workers_never_read_each_others_answers(dev: Dev) -> None:
    need("gunicorn")
    assert dev.api is not None
    port = free_port()
    here = pathlib.Path(__file__).parent
    env = dict(
        os.environ,
        CONVEYOR_GATEWAY=dev.api,
        CONVEYOR_TOKEN=TOKEN,
        PYTHONPATH=os.pathsep.join([str(REPO / "clients" / "python" / "src"), str(here)]),
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "--workers", "4",
         "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "fork_app:app"],
        env=env,
        cwd=str(here),
    )
    run = uuid.uuid4().hex[:8]

    def ask(n: int) -> Dict[str, Any]:
        request = f"{run}-{n}"
        url = f"http://127.0.0.1:{port}/?request={request}"
        with urllib.request.urlopen(url, timeout=60) as answer:
            return dict(json.load(answer), asked=request)

    try:
        wait_for_port(port, server)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(1000)))
    finally:
        server.terminate()
        server.wait(30)
    assert len(answers) == 1000
    wrong = [a for a in answers if a["request"] != a["asked"] or a["output"] != {"request": a["asked"]} or a["id"] != a["state_id"]]
    assert wrong == [], wrong[:5]
    assert len({a["id"] for a in answers}) == 1000
    assert len({a["pid"] for a in answers}) > 1, "one worker served every request"
