"""A Bottle web app that hands slow work to conveyor and shows the result.

It plays both parts of the round trip:

* the web app: ``POST /reverse`` submits a ``reverse`` task through the
  conveyor gateway and answers at once with the task id; ``GET /result/<id>``
  shows the outcome, waiting up to 10 s for it;
* the handler: conveyor's ``http`` handler POSTs each ``reverse`` task to
  ``/tasks/reverse``, served here by the handler kit, so the work itself is
  written in Python.

Environment: ``CONVEYOR_GATEWAY`` (default http://127.0.0.1:8080),
``CONVEYOR_TOKEN`` (when the gateway sets auth_tokens), ``HOST``/``PORT``
(default 127.0.0.1:8000). Needs Bottle and conveyor_client (clients/python).
"""

import json
import os
import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle
from conveyor_client import APIError, Client, Handlers, Permanent, ResultTimeout

GATEWAY = os.environ.get("CONVEYOR_GATEWAY", "http://127.0.0.1:8080")
client = Client(GATEWAY, token=os.environ.get("CONVEYOR_TOKEN"))
handlers = Handlers()
app = bottle.Bottle()
app.mount("/tasks/", handlers)  # conveyor POSTs each task to /tasks/<type>


@handlers.task("reverse")
def reverse(payload, task):
    """The slow work. A Permanent error fails the task for good; any other
    exception is retried by conveyor with backoff."""
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise Permanent("payload.text must be a string")
    print("running task %s (attempt %d)" % (task.id, task.attempt), file=sys.stderr)
    return {"reversed": text[::-1], "length": len(text)}


def answer(status, value):
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(value)


@app.get("/")
def index():
    return (
        "<form method=post action=/reverse>"
        "<input name=text placeholder='text to reverse'> <button>Reverse</button></form>"
    )


@app.post("/reverse")
def submit():
    """Hand the work to conveyor and answer at once."""
    body = bottle.request.json
    text = body.get("text") if isinstance(body, dict) else bottle.request.forms.getunicode("text")
    try:
        task = client.submit("reverse", {} if text is None else {"text": text})
    except APIError as error:
        return answer(502, {"gateway_status": error.status, "error": str(error)})
    if body is None:
        bottle.redirect("/result/" + task.id)
    return answer(202, {"id": task.id, "result_url": "/result/" + task.id})


@app.get("/result/<task_id>")
def result(task_id):
    """The task as conveyor knows it, once finished or after 10 s."""
    try:
        task = client.task(task_id)
        try:
            state = task.wait(timeout=10)
        except ResultTimeout:
            state = task.status()
    except APIError as error:
        return answer(error.status, {"error": {"code": error.code, "message": error.message}})
    return answer(200, state.raw)


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a page waiting on a result must not block a task


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


if __name__ == "__main__":
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    server = make_server(host, port, app, ThreadingServer, QuietHandler)
    print("listening on http://%s:%d, gateway %s" % (host, port, GATEWAY), flush=True)
    server.serve_forever()
