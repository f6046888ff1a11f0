"""The Bottle example's round trip as a FastAPI app, all asyncio.

* ``POST /reverse`` submits a ``reverse`` task through the conveyor gateway
  with the asyncio client and answers at once with its id;
  ``GET /result/{id}`` shows the outcome, waiting up to 10 s;
* conveyor's ``http`` handler POSTs each ``reverse`` task to
  ``/tasks/reverse``: the handler kit's ASGI app, mounted under ``/tasks``
  with Starlette's ``Mount``. Requests must be signed with
  ``$CONVEYOR_SIGNING_SECRET`` (the same variable conveyor signs with).

Environment: ``CONVEYOR_GATEWAY`` (default http://127.0.0.1:8080),
``CONVEYOR_TOKEN``, ``CONVEYOR_SIGNING_SECRET``, ``HOST``/``PORT`` (default
127.0.0.1:8000). Needs FastAPI, uvicorn and conveyor_client
(clients/python).
"""

import contextlib
import os
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conveyor_client import APIError, AsyncClient, Handlers, Permanent, ResultTimeout

GATEWAY = os.environ.get("CONVEYOR_GATEWAY", "http://127.0.0.1:8080")
client = AsyncClient(GATEWAY, token=os.environ.get("CONVEYOR_TOKEN"))
# The signing secret comes from $CONVEYOR_SIGNING_SECRET: unsigned, forged
# or stale requests are refused before any handler runs.
handlers = Handlers()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    await client.aclose()


app = FastAPI(lifespan=lifespan)
# conveyor POSTs each task to /tasks/<type>.
app.mount("/tasks", handlers.asgi)


@handlers.task("reverse")
def reverse(payload, task):
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise Permanent("payload.text must be a string")
    print("running task %s (attempt %d)" % (task.id, task.attempt), file=sys.stderr)
    return {"reversed": text[::-1], "length": len(text)}


@app.post("/reverse", status_code=202)
async def submit(request: Request):
    body = await request.json()
    text = body.get("text") if isinstance(body, dict) else None
    try:
        task = await client.submit("reverse", {} if text is None else {"text": text})
    except APIError as error:
        return JSONResponse({"gateway_status": error.status, "error": str(error)}, status_code=502)
    return {"id": task.id, "result_url": "/result/" + task.id}


@app.get("/result/{task_id}")
async def result(task_id: str):
    try:
        task = await client.task(task_id)
        try:
            state = await task.wait(timeout=10)
        except ResultTimeout:
            state = await task.status()
    except APIError as error:
        return JSONResponse(
            {"error": {"code": error.code, "message": error.message}}, status_code=error.status
        )
    return state.raw


if __name__ == "__main__":
    import uvicorn

    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    print("listening on http://%s:%d, gateway %s" % (host, port, GATEWAY), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
