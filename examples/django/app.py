"""The Bottle example's round trip as a Django app, in one file.

* ``POST /reverse`` submits a ``reverse`` task through the conveyor gateway
  and answers at once with its id; ``GET /result/<id>`` shows the outcome,
  waiting up to 10 s;
* conveyor's ``http`` handler POSTs each ``reverse`` task to
  ``/tasks/reverse``, served by the handler kit's Django view. That view is
  exempt from Django's CSRF check (conveyor is not a browser); requests
  must instead be signed with ``$CONVEYOR_SIGNING_SECRET``, the variable
  conveyor signs with. Django's ``ALLOWED_HOSTS`` must hold the host of
  the ``url`` in conveyor's configuration.

Environment: ``CONVEYOR_GATEWAY`` (default http://127.0.0.1:8080),
``CONVEYOR_TOKEN``, ``CONVEYOR_SIGNING_SECRET``, ``HOST``/``PORT`` (default
127.0.0.1:8000). Needs Django and conveyor_client (clients/python). A real
project keeps the settings in settings.py and the routes in urls.py; the
two lines that matter are the ``task_view`` route and ``Handlers()``.
"""

import json
import os
import sys

from django.conf import settings

settings.configure(
    DEBUG=False,
    # Example only: a real project keeps its own secret key secret.
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "conveyor-example-not-a-secret"),
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    MIDDLEWARE=[
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ],
)

import django  # noqa: E402

django.setup()

from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402

from conveyor_client import APIError, Client, Handlers, Permanent, ResultTimeout  # noqa: E402
from conveyor_client.django import task_view  # noqa: E402

GATEWAY = os.environ.get("CONVEYOR_GATEWAY", "http://127.0.0.1:8080")
client = Client(GATEWAY, token=os.environ.get("CONVEYOR_TOKEN"))
# The signing secret comes from $CONVEYOR_SIGNING_SECRET.
handlers = Handlers()


@handlers.task("reverse")
def reverse(payload, task):
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise Permanent("payload.text must be a string")
    print("running task %s (attempt %d)" % (task.id, task.attempt), file=sys.stderr)
    return {"reversed": text[::-1], "length": len(text)}


# A JSON API for scripts (curl, the tests), not a form: no CSRF token to
# send. A page of your own keeps Django's CSRF protection.
@csrf_exempt
@require_POST
def submit(request):
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        body = None
    text = body.get("text") if isinstance(body, dict) else None
    try:
        task = client.submit("reverse", {} if text is None else {"text": text})
    except APIError as error:
        return JsonResponse({"gateway_status": error.status, "error": str(error)}, status=502)
    return JsonResponse({"id": task.id, "result_url": "/result/" + task.id}, status=202)


@require_GET
def result(request, task_id):
    try:
        task = client.task(task_id)
        try:
            state = task.wait(timeout=10)
        except ResultTimeout:
            state = task.status()
    except APIError as error:
        return JsonResponse(
            {"error": {"code": error.code, "message": error.message}}, status=error.status
        )
    return JsonResponse(state.raw)


urlpatterns = [
    path("reverse", submit),
    path("result/<str:task_id>", result),
    # conveyor POSTs each task to /tasks/<type>.
    path("tasks/<str:task_type>", task_view(handlers)),
]


if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    host, port = os.environ.get("HOST", "127.0.0.1"), os.environ.get("PORT", "8000")
    print("listening on http://%s:%s, gateway %s" % (host, port, GATEWAY), flush=True)
    execute_from_command_line([sys.argv[0], "runserver", f"{host}:{port}", "--noreload"])
