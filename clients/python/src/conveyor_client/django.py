"""The handler kit in Django: one view serving ``POST <prefix>/<task type>``.

    # urls.py
    from django.urls import path
    from conveyor_client.django import task_view
    from myapp.tasks import handlers          # a conveyor_client.Handlers

    urlpatterns = [path("tasks/<str:task_type>", task_view(handlers))]

The view is exempt from Django's CSRF check: conveyor is not a browser and
has no CSRF token. Sign the requests instead (``Handlers(secret=...)`` with
the worker's ``signing_secret_env``): with a secret set, an unsigned,
forged or stale request is refused with 401 before any handler runs.
Django still checks the ``Host`` header: the host of the ``url`` in
conveyor's configuration must be in ``ALLOWED_HOSTS``.

The body is read from the request stream (not ``request.body``), bounded by
the kit's ``max_body_bytes`` rather than Django's
``DATA_UPLOAD_MAX_MEMORY_SIZE`` (2.5 MB by default), which is meant for
forms.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from .handler import Handlers, Reply, read_bounded


def task_view(handlers: Handlers) -> Callable[..., Any]:
    """A Django view running ``handlers``' functions; route it with a
    ``task_type`` path parameter."""
    from django.http import HttpResponse
    from django.views.decorators.csrf import csrf_exempt

    def view(request: Any, task_type: str) -> Any:
        body = (
            read_bounded(request.read, handlers.max_body_bytes)
            if request.method == "POST"
            else b""
        )
        if isinstance(body, Reply):
            reply = body
        else:
            headers = {k: v for k, v in request.headers.items()}
            reply = handlers.handle(request.method or "GET", task_type, headers, body)
        response = HttpResponse(reply.body, status=reply.status)
        for name, value in reply.headers:
            response[name] = value
        return response

    return cast(Callable[..., Any], csrf_exempt(view))


__all__ = ["task_view"]
