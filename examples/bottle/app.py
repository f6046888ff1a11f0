"""A Bottle web app that hands slow work to conveyor and shows the result.

It plays both parts of the round trip:

* the web app: ``POST /reverse`` submits a ``reverse`` task through the
  conveyor gateway and answers at once with the task id; ``GET /result/<id>``
  asks the gateway for the outcome, waiting up to 10 s for it;
* the handler: ``POST /tasks/reverse`` is the endpoint conveyor's ``http``
  handler calls to run each task, so the work itself is written in Python.

Configuration, from the environment:

* ``CONVEYOR_GATEWAY``: the gateway's base URL (default http://127.0.0.1:8080)
* ``CONVEYOR_TOKEN``: a bearer token, when the gateway sets auth_tokens
* ``HOST`` / ``PORT``: where this app listens (default 127.0.0.1:8000)

Only the standard library and Bottle are used. See README.md beside it.
"""

import json
import os
import socketserver
import sys
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle

GATEWAY = os.environ.get("CONVEYOR_GATEWAY", "http://127.0.0.1:8080").rstrip("/")
TOKEN = os.environ.get("CONVEYOR_TOKEN")

app = bottle.Bottle()


def gateway(method, path, body=None):
    """Calls the gateway; returns (status, decoded JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(GATEWAY + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if TOKEN:
        request.add_header("authorization", "Bearer " + TOKEN)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def answer(status, value):
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(value)


@app.get("/")
def index():
    return (
        "<form method=post action=/reverse>"
        "<input name=text placeholder='text to reverse'> <button>Reverse</button>"
        "</form>"
    )


@app.post("/reverse")
def submit():
    """The web app's side: submit the slow work and answer at once."""
    text = (bottle.request.json or {}).get("text") if bottle.request.json else None
    if text is None:
        text = bottle.request.forms.getunicode("text")
    payload = {} if text is None else {"text": text}
    status, task = gateway("POST", "/v1/tasks", {"type": "reverse", "payload": payload})
    if status != 202:
        return answer(502, {"gateway_status": status, "gateway_answer": task})
    if bottle.request.json is None:
        bottle.redirect("/result/" + task["id"])
    return answer(202, {"id": task["id"], "result_url": "/result/" + task["id"]})


@app.get("/result/<task_id>")
def result(task_id):
    """Looks the task up, waiting up to 10 s for it to finish."""
    status, task = gateway("GET", "/v1/tasks/%s?wait=10s" % task_id)
    return answer(status, task)


@app.post("/tasks/reverse")
def run_reverse():
    """The handler's side: conveyor's http handler POSTs the payload here.

    A 2xx answer is the task's output; a 4xx fails the task for good; a 5xx
    (or no answer) is retried by conveyor with backoff.
    """
    payload = bottle.request.json
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        return answer(422, {"error": "payload.text must be a string"})
    task_id = bottle.request.get_header("Conveyor-Task-Id")
    attempt = bottle.request.get_header("Conveyor-Attempt")
    print("running task %s (attempt %s)" % (task_id, attempt), file=sys.stderr)
    return answer(200, {"reversed": text[::-1], "length": len(text)})


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request: a page waiting on the gateway must not stop
    conveyor's handler call from being served."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def main():
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    server = make_server(host, port, app, ThreadingServer, QuietHandler)
    print("listening on http://%s:%d, gateway %s" % (host, port, GATEWAY), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
