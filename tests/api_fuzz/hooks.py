"""Schemathesis hooks for conveyor's gateway (SCHEMATHESIS_HOOKS=hooks).

A deadline given as an instant must lie in the future, and a delay or a
run_at at most [delays] max_delay_s (30 days) ahead, which no JSON Schema
can say: the document says it in words, and this hook moves the integer
deadlines the generator draws into the future, and delays and run_at
times beyond the maximum back within it, so that schema-valid requests
stay valid when they are sent. Only values the schema allows are moved
(a malformed delay or run_at is left for the server to refuse). Likewise
a list query's since after its until (both schema-valid integers) is
swapped. Nothing else is adjusted.
"""

import datetime
import re
import time

import schemathesis

YEAR_MS = 365 * 24 * 3600 * 1000
MAX_DELAY_S = 30 * 24 * 3600
DELAY = re.compile(r"^(0|[1-9][0-9]{0,11})(ms|s|m|h|d)?$")
UNIT_S = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}


def _within_max(task):
    delay = task.get("delay")
    if isinstance(delay, str):
        match = DELAY.match(delay)
        if match and int(match.group(1)) * UNIT_S[match.group(2) or ""] > MAX_DELAY_S - 60:
            task["delay"] = "1h"
    run_at = task.get("run_at")
    if isinstance(run_at, str):
        try:
            at = datetime.datetime.fromisoformat(run_at.replace("z", "Z"))
            beyond = at.tzinfo is not None and at.timestamp() > time.time() + MAX_DELAY_S - 60
        except (ValueError, OverflowError):
            return
        if beyond:
            later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            task["run_at"] = later.isoformat()


def _future(task):
    if isinstance(task, dict):
        _within_max(task)
        deadline = task.get("deadline")
        # Only an instant the schema allows (an int64 at least 0) is moved:
        # one beyond int64 is the generator's invalid case, left alone.
        if (
            isinstance(deadline, int)
            and not isinstance(deadline, bool)
            and 0 <= deadline <= 2**63 - 1
        ):
            now = int(time.time() * 1000)
            task["deadline"] = now + YEAR_MS + deadline % YEAR_MS


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        _future(body)
        for task in body.get("tasks") or [] if isinstance(body.get("tasks"), list) else []:
            _future(task)
    return body


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool) or (
        isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value) is not None
    )


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """The list routes: since must not be after until, which no schema can
    say. A schema-valid pair out of order is swapped, in every phase (the
    coverage phase applies no map_* hook); malformed values stay."""
    query = case.query
    if not isinstance(query, dict):
        return
    since, until = query.get("since"), query.get("until")
    if _is_int(since) and _is_int(until) and int(since) > int(until):
        query["since"], query["until"] = until, since
