"""The dashboard in a real browser (Debian's headless chromium): every page
loads with tasks, a failed task, a workflow run and a schedule; the task
page shows the handler's output and its events; a replay and a cancel
from the pages do what they say; a payload carrying markup is shown as
text and never runs; an action without the CSRF token is refused; with
tokens on, pages are refused without one.

With ``CONVEYOR_SCREENSHOTS`` set to a folder, the main pages are saved
there as PNG (how docs/dashboard/ was made).
"""

from __future__ import annotations

import os
import pathlib
import re
import time
import urllib.request
from typing import Any, Callable

from conftest import TOKEN, Dev

SCRIPT = "<script>window.__pwned = 1</script>"
IMG = '"><img src=x onerror="window.__pwned = 2">'


def until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.25)


def shown(page: Any, check: Callable[[], Any]) -> Callable[[], Any]:
    """`check` after reloading `page` (for pages that change by themselves)."""

    def again() -> Any:
        page.reload()
        return check()

    return again


def shot(page: Any, name: str) -> None:
    folder = os.environ.get("CONVEYOR_SCREENSHOTS")
    if folder:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(pathlib.Path(folder) / f"{name}.png"), full_page=True)


def failed_runs(dev: Dev, task_type: str) -> float:
    """Terminal failures of `task_type` the worker counted (conveyor dev's
    gateway serves the worker's metrics)."""
    assert dev.api is not None
    with urllib.request.urlopen(dev.api + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("conveyor_tasks_failed_total{") and f'task_type="{task_type}"' in line
    )


def letters_of(dev: Dev, page: Any, task_id: str) -> int:
    """Dead letters of `task_id` the DLQ page lists."""
    response = page.goto(f"{dev.api}/ui/dlq?task={task_id}")
    assert response.status == 200, page.content()
    return int(page.locator("input[name=letter]").count())


def test_every_page_in_a_browser(dev: Dev, browser: Any) -> None:
    # What the pages should show: tasks, one with markup in its payload,
    # a failed one, a delayed one, a workflow run; the schedule fires by
    # itself.
    done = [dev.submit("echo", {"n": n}) for n in range(3)]
    # A handler that waits: its worker writes a `started` event (one that
    # answers on its first poll has none).
    slept = dev.submit("sleep", {"ms": 300})
    markup = dev.submit("echo", {"note": SCRIPT, "attr": IMG})
    failed = dev.submit("sleep", {"ms": "not a number"})
    kept = dev.submit("sleep", {"ms": 10}, delay="1h")
    status, run = dev.call("POST", "/v1/workflows/wordcount", {"payload": {"text": "a b\nc d e\nf"}})
    assert status == 202, run
    for task_id in done + [markup, slept]:
        assert dev.wait(task_id)["status"] == "succeeded"
    assert dev.wait(failed)["status"] == "failed"
    status, finished = dev.call("GET", f"/v1/workflows/{run['id']}?wait=20s")
    assert finished["status"] == "succeeded", finished

    context = browser.new_context()
    page = context.new_page()
    # What the browser reports: script errors, and every console message
    # (a blocked inline script or a CSP violation shows up here).
    problems = []
    page.on("pageerror", lambda e: problems.append(f"error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}"))

    # Workers and lag: the worker lists itself, its partitions with lag.
    response = page.goto(f"{dev.api}/ui")
    assert response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src" not in csp and "default-src 'none'" in csp, csp
    until("the worker is listed live", shown(page, lambda: page.locator("td .s-live").count() == 1))
    assert f"pid {dev.process.pid}" in page.locator("tbody").inner_text()
    shot(page, "workers")
    page.goto(f"{dev.api}/ui/lag")
    until(
        "the lag page lists partitions",
        shown(page, lambda: page.locator("td", has_text="conveyor.tasks.echo").count() > 0),
    )
    assert page.locator("h2", has_text="Processors").count() == 1
    shot(page, "lag")

    # Tasks: the list, a filter, and a task page with output and events.
    page.goto(f"{dev.api}/ui/tasks")
    listed = page.locator("tbody").inner_text()
    for task_id in done + [failed, kept]:
        assert task_id in listed, task_id
    shot(page, "tasks")
    page.goto(f"{dev.api}/ui/tasks?status=failed")
    failed_rows = page.locator("tbody tr").all_inner_texts()
    assert any(failed in row for row in failed_rows)
    assert all("failed" in row for row in failed_rows), failed_rows
    page.fill("input[name=id]", slept)
    page.click("form.filters button")
    assert page.url.endswith(f"/ui/tasks/{slept}")
    assert '"slept_ms": 300' in page.locator("pre.result").inner_text()
    assert '"ms": 300' in page.locator("pre.payload").inner_text()
    events = page.locator("table").last.inner_text()
    assert "started" in events and "conveyor-" in events, events
    shot(page, "task")
    page.goto(f"{dev.api}/ui/tasks/{done[1]}")
    assert '"n": 1' in page.locator("pre.result").inner_text()

    # A payload with markup is text: shown as written, never run.
    page.goto(f"{dev.api}/ui/tasks/{markup}")
    text = page.locator("pre.payload").inner_text()
    assert "<script>window.__pwned = 1</script>" in text, text
    assert '<img src=x onerror=\\"window.__pwned = 2\\">' in text, text
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("script").count() == 0
    assert page.locator("img").count() == 0

    # The failed task: its error, and its dead letter.
    page.goto(f"{dev.api}/ui/tasks/{failed}")
    assert "permanent" in page.locator("pre.error-text").inner_text()
    page.click("text=Its dead letter")
    assert page.locator("input[name=letter]").count() == 1
    shot(page, "dead-letters")

    # Workflow runs: the list and the run with its fan-out and join.
    page.goto(f"{dev.api}/ui/runs")
    assert run["id"] in page.locator("tbody").inner_text()
    page.click(f"text={run['id']}")
    steps = page.locator("table").nth(1).inner_text()
    assert "3 fanned out: 3 succeeded, 0 failed" in steps, steps
    assert "6" in page.locator("pre.result").inner_text()
    shot(page, "run")

    # Schedules: next and last fire times.
    page.goto(f"{dev.api}/ui/schedules")
    row = page.locator("tbody tr").first.inner_text()
    assert "heartbeat" in row and "*/2 * * * * *" in row, row
    assert re.search(r"\d{4}-\d\d-\d\dT", row), row
    until(
        "the schedule has fired",
        shown(page, lambda: len(re.findall(r"\d{4}-\d\d-\d\dT", page.locator("tbody tr").first.inner_text())) == 2),
    )
    shot(page, "schedules")

    # Cancel from the page: a task delayed by 5 s ends cancelled when it
    # comes due instead of running (its worker checks the cancellations).
    delayed = dev.submit("sleep", {"ms": 10}, delay="5s")
    page.goto(f"{dev.api}/ui/tasks/{delayed}")
    assert "scheduled" in page.locator("table.facts").inner_text()
    page.click("text=Cancel this task")
    assert "Cancellation requested" in page.locator("p.ok").inner_text()
    until("the delayed task is cancelled", lambda: dev.call("GET", f"/v1/tasks/{delayed}")[1]["status"] == "cancelled")

    # Replay from the page: a preview first, then the task runs again (it
    # fails again: a second dead letter of the same task).
    assert letters_of(dev, page, failed) == 1
    assert failed_runs(dev, "sleep") == 1
    page.check("input[name=letter]")
    page.click("text=Replay selected")
    assert "Replay: preview" in page.locator("h1").inner_text()
    assert "would replay" in page.locator("tbody").inner_text()
    time.sleep(1)
    assert letters_of(dev, page, failed) == 1, "a preview produces nothing"
    assert failed_runs(dev, "sleep") == 1
    page.check("input[name=letter]")
    page.click("text=Replay selected")
    page.click("text=Confirm: replay 1")
    assert page.locator("h1").inner_text() == "Replayed"
    assert "replayed" in page.locator("tbody").inner_text()
    until("the replayed task's second dead letter", lambda: letters_of(dev, page, failed) == 2)
    until("the worker counts the replayed task's second failure", lambda: failed_runs(dev, "sleep") == 2)
    assert any(
        "dashboard: dead letters replayed" in line and failed in line and "anonymous" in line
        for line in dev.lines
    ), "the replay is logged, with who did it"

    # An action without the session's CSRF token is refused (the browser's
    # own cookies go with these requests), and changes nothing.
    refused = context.request.post(f"{dev.api}/ui/tasks/{kept}/cancel", form={})
    assert refused.status == 403 and "CSRF" in refused.text(), refused.text()
    wrong = context.request.post(f"{dev.api}/ui/tasks/{kept}/cancel", form={"csrf": "0" * 64})
    assert wrong.status == 403, wrong.text()
    replay = context.request.post(f"{dev.api}/ui/dlq/replay", form={"letter": "conveyor.dlq/0/0", "confirm": "yes"})
    assert replay.status == 403, replay.text()
    assert dev.call("GET", f"/v1/tasks/{kept}")[1]["status"] == "scheduled"
    assert not problems, f"the browser reported {problems}"

    # Every page stays small (lists are pages of 50; outputs are cut).
    for path in [
        "/ui",
        "/ui/lag",
        "/ui/tasks",
        f"/ui/tasks/{markup}",
        "/ui/runs",
        f"/ui/runs/{run['id']}",
        "/ui/schedules",
        "/ui/dlq",
    ]:
        answer = context.request.get(f"{dev.api}{path}")
        assert answer.status == 200, path
        assert len(answer.body()) < 100_000, (path, len(answer.body()))
    context.close()


def test_pages_need_a_token_when_the_gateway_asks_for_one(dev_auth: Dev, browser: Any) -> None:
    task = dev_auth.submit("echo", {"secret": "kept"})
    assert dev_auth.wait(task)["status"] == "succeeded"
    context = browser.new_context()
    page = context.new_page()
    for path in ["/ui", "/ui/tasks", f"/ui/tasks/{task}", "/ui/dlq", "/ui/schedules"]:
        response = page.goto(f"{dev_auth.api}{path}")
        assert response.status == 401, path
        assert page.locator("input[name=token]").count() == 1, path
        assert "kept" not in page.content(), path
    # A wrong token is refused; the right one opens the page asked for.
    page.goto(f"{dev_auth.api}/ui/tasks/{task}")
    page.fill("input[name=token]", "not-the-token")
    with page.expect_navigation():
        page.click("button:has-text('Sign in')")
    assert "not one of gateway.auth_tokens" in page.locator("main").inner_text()
    page.fill("input[name=token]", TOKEN)
    with page.expect_navigation():
        page.click("button:has-text('Sign in')")
    assert page.url.endswith(f"/ui/tasks/{task}"), page.url
    assert any(
        "dashboard: signed in" in line and "gateway.auth_tokens[0]" in line for line in dev_auth.lines
    ), "the sign-in is logged with the token's position, never the token"
    assert not any(TOKEN in line for line in dev_auth.lines), "the token is never logged"
    assert "kept" in page.locator("pre.payload").inner_text()
    cookie = [c for c in context.cookies() if c["name"] == "conveyor_ui"][0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    # A login posted without the form's CSRF token is refused too.
    other = browser.new_context()
    bare = other.request.post(f"{dev_auth.api}/ui/login", form={"token": TOKEN})
    assert bare.status in (401, 403), bare.status
    # Signing out ends the session.
    with page.expect_navigation():
        page.click("button:has-text('Sign out')")
    response = page.goto(f"{dev_auth.api}/ui")
    assert response.status == 401
    other.close()
    context.close()

