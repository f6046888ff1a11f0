"""A WSGI app for gunicorn ``--preload`` (tests/test_fork.py): its
client is made, and used, in the master before the workers are forked;
each request then submits an ``echo`` task and reads it back."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable
from urllib.parse import parse_qs

from conveyor_client import Client

client = Client(os.environ["CONVEYOR_GATEWAY"], token=os.environ.get("CONVEYOR_TOKEN"))
# A connection opened in the master, which every worker inherits.
next(iter(client.tasks(page_size=1)), None)


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    request = parse_qs(environ.get("QUERY_STRING", "")).get("request", [""])[0]
    task = client.submit("echo", {"request": request}, idempotency_key="fork-" + request)
    state = client.task(task.id).wait(30)
    body = json.dumps(
        {"request": request, "id": task.id, "state_id": state.id, "output": state.output, "pid": os.getpid()}
    ).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    return [body]
