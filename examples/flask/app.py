"""The Bottle example's round trip as a Flask app.

* ``POST /reverse`` submits a ``reverse`` task through the conveyor gateway
  and answers at once with its id; ``GET /result/<id>`` shows the outcome,
  waiting up to 10 s;
* conveyor's ``http`` handler POSTs each ``reverse`` task to
  ``/tasks/reverse``, served by the handler kit mounted beside the app.

Environment: ``CONVEYOR_GATEWAY`` (default http://127.0.0.1:8080),
``CONVEYOR_TOKEN``, ``HOST``/``PORT`` (default 127.0.0.1:8000). Needs Flask
and conveyor_client (clients/python).
"""

import os
import sys

from flask import Flask, jsonify, redirect, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from conveyor_client import APIError, Client, Handlers, Permanent, ResultTimeout

GATEWAY = os.environ.get("CONVEYOR_GATEWAY", "http://127.0.0.1:8080")
client = Client(GATEWAY, token=os.environ.get("CONVEYOR_TOKEN"))
handlers = Handlers()
app = Flask(__name__)
# conveyor POSTs each task to /tasks/<type>.
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/tasks": handlers})


@handlers.task("reverse")
def reverse(payload, task):
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise Permanent("payload.text must be a string")
    print("running task %s (attempt %d)" % (task.id, task.attempt), file=sys.stderr)
    return {"reversed": text[::-1], "length": len(text)}


@app.get("/")
def index():
    return (
        "<form method=post action=/reverse>"
        "<input name=text placeholder='text to reverse'> <button>Reverse</button></form>"
    )


@app.post("/reverse")
def submit():
    body = request.get_json(silent=True)
    text = body.get("text") if isinstance(body, dict) else request.form.get("text")
    try:
        task = client.submit("reverse", {} if text is None else {"text": text})
    except APIError as error:
        return jsonify(gateway_status=error.status, error=str(error)), 502
    if body is None:
        return redirect("/result/" + task.id, 303)
    return jsonify(id=task.id, result_url="/result/" + task.id), 202


@app.get("/result/<task_id>")
def result(task_id):
    try:
        task = client.task(task_id)
        try:
            state = task.wait(timeout=10)
        except ResultTimeout:
            state = task.status()
    except APIError as error:
        return jsonify(error={"code": error.code, "message": error.message}), error.status
    return jsonify(state.raw)


if __name__ == "__main__":
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    print("listening on http://%s:%d, gateway %s" % (host, port, GATEWAY), flush=True)
    app.run(host, port, threaded=True)
