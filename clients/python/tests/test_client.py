"""The client against a real conveyor (``conveyor dev``, see conftest.py)."""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from typing import List

import pytest

from conveyor_client import (
    API_VERSION,
    AsyncClient,
    AuthError,
    Client,
    InvalidRequest,
    NotFound,
    ResultTimeout,
    RunFailed,
    TaskFailed,
    TaskState,
    Unavailable,
)

from conftest import TOKEN, Calls, Dev, FlakyProxy, wait_until


def test_submit_then_result(client: Client) -> None:
    task = client.submit("echo", {"hello": "conveyor"})
    assert client.task(task.id).id == task.id
    assert task.result(timeout=10) == {"hello": "conveyor"}
    state = task.status()
    assert state.status == "succeeded"
    assert state.attempts == 1
    assert state.output == {"hello": "conveyor"}
    assert state.error is None


def test_submit_many_keeps_the_order_of_the_batch(client: Client) -> None:
    tasks = client.submit_many(
        [{"type": "echo", "payload": n, "key": "batch"} for n in range(5)]
    )
    assert len({t.id for t in tasks}) == 5
    assert [t.result(timeout=10) for t in tasks] == [0, 1, 2, 3, 4]


def test_failing_task_raises_task_failed_with_kind_and_message(client: Client) -> None:
    task = client.submit("kit_permanent", {"image": "cat.png"})
    with pytest.raises(TaskFailed) as failed:
        task.result(timeout=10)
    assert failed.value.task_id == task.id
    assert failed.value.kind == "permanent"
    assert "no such image: cat.png" in failed.value.message
    assert task.status().attempts == 1


def test_unknown_task_is_not_found(client: Client) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as error:
        client.task(missing)
    assert error.value.status == 404
    assert error.value.code == "unknown_task"
    with pytest.raises(InvalidRequest) as error2:
        client.task("not-a-uuid")
    assert error2.value.field == "id"


def test_bad_input_names_the_field(client: Client) -> None:
    with pytest.raises(InvalidRequest) as error:
        client.submit("no_such_type", {})
    assert error.value.field == "type"
    assert "no_such_type" in error.value.message
    with pytest.raises(InvalidRequest) as error:
        client.submit("echo", {}, key="k" * 5000)
    assert error.value.field == "key"
    with pytest.raises(InvalidRequest) as error:
        client.submit_many([{"type": "echo", "payload": 1}, {"type": "", "payload": 2}])
    assert error.value.field == "tasks[1].type"
    with pytest.raises(InvalidRequest) as error:
        client.submit("echo", {}, deadline="soon")
    assert error.value.field == "deadline"


def test_token_accepted_and_refused(dev: Dev) -> None:
    assert dev.api is not None
    with Client(dev.api, token=TOKEN) as good:
        assert good.submit("echo", 1).result(timeout=10) == 1
    for token in ("wrong-token-wrong-token", None):
        with Client(dev.api, token=token) as bad:
            with pytest.raises(AuthError) as error:
                bad.submit("echo", 1)
            assert error.value.status == 401
            assert error.value.code == "unauthorized"


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_a_lost_answer_is_retried_without_a_second_task(
    dev: Dev, client: Client, proxy: FlakyProxy, calls: Calls, mode: str
) -> None:
    marker = str(uuid.uuid4())
    key = "idem-" + marker
    proxy.mode = mode
    proxy.fail_next = 1
    with Client(proxy.url, token=TOKEN, timeout=10, backoff=0.05) as through_proxy:
        task = through_proxy.submit("kit_count", {"marker": marker}, key=key)
    # The gateway got both POSTs (it wrote the task the first time), with
    # the same generated idempotency key, and answered the second from it.
    assert len(proxy.posts) == 2
    keys = {json.loads(p)["idempotency_key"] for p in proxy.posts}
    assert len(keys) == 1
    assert task.idempotent_replay
    assert task.result(timeout=10) == {"marker": marker}
    # A task behind it with the same key runs after any duplicate would
    # have: once its result is in, every copy has run.
    sentinel = client.submit("kit_count", {"marker": "sentinel"}, key=key)
    assert sentinel.result(timeout=10) == {"marker": "sentinel"}
    assert calls.markers("kit_count")[marker] == 1


def test_submission_gives_up_after_its_retries(dev: Dev, proxy: FlakyProxy) -> None:
    proxy.fail_next = 10
    with Client(proxy.url, token=TOKEN, retries=2, backoff=0.01) as c:
        with pytest.raises(Unavailable) as error:
            c.submit("echo", "x")
    assert error.value.status == 503
    assert len(proxy.posts) == 3


def test_result_timeout_is_a_timeout_error(client: Client) -> None:
    task = client.submit("sleep", {"ms": 1500})
    with pytest.raises(TimeoutError) as error:
        task.result(timeout=0.2)
    assert isinstance(error.value, ResultTimeout)
    # Not done yet: queued, or running once its started event is seen.
    assert error.value.status in ("queued", "running")
    assert task.result(timeout=10) == {"slept_ms": 1500}


def test_workflow_run(client: Client) -> None:
    run = client.start_workflow("wordcount", {"text": "one two\nthree four five\nsix"})
    assert run.result(timeout=15) == 6
    state = run.status()
    assert state.status == "succeeded"
    assert [s.type for s in state.steps] == ["split_lines", "word_count", "sum"]
    assert [s.status for s in state.steps] == ["succeeded"] * 3
    assert state.steps[1].children == {"count": 3, "succeeded": 3, "failed": 0}
    assert client.run(run.id).workflow == "wordcount"


def test_failed_workflow_run_names_the_step(client: Client) -> None:
    run = client.start_workflow("broken", {"image": "dog.png"})
    with pytest.raises(RunFailed) as failed:
        run.result(timeout=15)
    assert failed.value.kind == "step_failed"
    assert "kit_permanent" in failed.value.message
    assert "no such image: dog.png" in failed.value.message
    steps = run.status().steps
    assert [s.status for s in steps] == ["succeeded", "failed"]


def test_a_past_deadline_fails_the_task_without_running_it(client: Client, calls: Calls) -> None:
    marker = str(uuid.uuid4())
    long_ago = datetime.datetime(1970, 1, 1, 0, 0, 1, tzinfo=datetime.timezone.utc)
    task = client.submit("kit_count", {"marker": marker}, deadline=long_ago)
    with pytest.raises(TaskFailed) as failed:
        task.result(timeout=10)
    assert failed.value.kind == "deadline"
    assert calls.markers("kit_count")[marker] == 0


def test_a_run_and_a_task_with_the_same_idempotency_key_are_different(client: Client) -> None:
    key = str(uuid.uuid4())
    task = client.submit("echo", 1, idempotency_key=key)
    run = client.start_workflow("wordcount", {"text": "a b"}, idempotency_key=key)
    assert not run.idempotent_replay
    assert run.id != task.id
    assert run.result(timeout=15) == 2
    again = client.start_workflow("wordcount", {"text": "ignored"}, idempotency_key=key)
    assert (again.id, again.idempotent_replay) == (run.id, True)


def test_unknown_workflow(client: Client) -> None:
    with pytest.raises(NotFound) as error:
        client.start_workflow("no_such_workflow", {})
    assert error.value.code == "unknown_workflow"


def test_async_client(dev: Dev) -> None:
    assert dev.api is not None
    api = dev.api

    async def main() -> list[object]:
        async with AsyncClient(api, token=TOKEN) as c:
            tasks = [await c.submit("echo", {"n": n}) for n in range(3)]
            return list(await asyncio.gather(*(t.result(timeout=10) for t in tasks)))

    assert asyncio.run(main()) == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_api_version_matches_the_gateway(dev: Dev) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{dev.api}/openapi.json", timeout=10) as answer:
        document = json.load(answer)
    assert document["info"]["version"] == API_VERSION


def test_tasks_lists_every_page_newest_first(client: Client) -> None:
    """``client.tasks`` pages through the status store: the tasks of one
    type submitted here come back newest first, none twice, with filters."""
    key = "list-" + uuid.uuid4().hex
    submitted = [client.submit("echo", {"n": i}, idempotency_key=f"{key}-{i}") for i in range(7)]
    for task in submitted:
        task.wait(10)
    mine = {t.id for t in submitted}

    def listed() -> List[TaskState]:
        return [t for t in client.tasks(type="echo", page_size=2) if t.id in mine]

    assert wait_until(lambda: len(listed()) == 7, 10)
    states = listed()
    assert {t.id for t in states} == mine
    times = [t.submitted_at or 0 for t in states]
    assert times == sorted(times, reverse=True), times
    assert all(t.status == "succeeded" and t.output is None for t in states)
    one = list(client.tasks(key=f"{key}-3"))
    assert [t.id for t in one] == [submitted[3].id]
    newest = times[0]
    assert [t.id for t in client.tasks(type="echo", status="failed", since=newest, until=newest + 1)] == []
    with pytest.raises(ValueError):
        list(client.tasks(page_size=0))
