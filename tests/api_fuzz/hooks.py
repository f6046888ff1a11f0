"""Schemathesis hooks for conveyor's gateway (SCHEMATHESIS_HOOKS=hooks).

A deadline given as an instant must lie in the future, which no JSON
Schema can say: the document says it in words, and this hook moves the
integer deadlines the generator draws into the future so that schema-valid
requests stay valid when they are sent. Nothing else is adjusted.
"""

import time

import schemathesis

YEAR_MS = 365 * 24 * 3600 * 1000


def _future(task):
    if isinstance(task, dict):
        deadline = task.get("deadline")
        if isinstance(deadline, int) and not isinstance(deadline, bool) and deadline >= 0:
            now = int(time.time() * 1000)
            task["deadline"] = now + YEAR_MS + deadline % YEAR_MS


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        _future(body)
        for task in body.get("tasks") or [] if isinstance(body.get("tasks"), list) else []:
            _future(task)
    return body
