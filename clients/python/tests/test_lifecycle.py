"""A task while it lives: progress from a kit handler seen through the
status and the event stream, in order; cancellation of a running task (the
``http`` handler aborts its request) and of an ended one."""

from __future__ import annotations

import pytest

from conveyor_client import Client, Conflict, NotFound, TaskCancelled

from conftest import Calls, wait_until


def test_progress_reported_by_a_kit_handler_is_streamed_in_order(client: Client) -> None:
    task = client.submit("kit_progress", {})
    events = list(task.events())
    names = [e.event for e in events]
    assert names[0] == "status"
    assert names[-1] == "succeeded" and events[-1].id == "end"
    progress = [e.progress for e in events if e.event == "progress"]
    assert progress == [{"n": 1}, {"n": 2}, {"n": 3}], names
    assert "started" in names and names.index("started") < names.index("progress")
    state = task.wait(10)
    assert state.progress == {"n": 3}
    assert state.attempt == 1 and state.worker and state.started_at
    # Resuming after the second progress event misses nothing.
    second = [e for e in events if e.event == "progress"][1]
    resumed = list(task.events(last_event_id=second.id))
    assert [e.event for e in resumed] == ["progress", "succeeded"]
    assert resumed[0].progress == {"n": 3}
    # After the end: nothing more.
    assert list(task.events(last_event_id="end")) == []


def test_cancel_a_running_task_then_an_ended_one(client: Client, calls: Calls) -> None:
    task = client.submit("kit_block", {})
    assert wait_until(lambda: task.status().status == "running", 20)
    answer = task.cancel()
    assert answer["cancel_requested"] is True and answer["status"] == "running"
    state = task.wait(15)
    assert state.status == "cancelled"
    assert state.error is not None and state.error.kind == "cancelled"
    assert "the task was cancelled" in state.error.message, state.error.message
    with pytest.raises(TaskCancelled):
        task.result(1)
    with pytest.raises(Conflict) as ended:
        client.revoke(task.id)
    assert ended.value.code == "task_finished"
    assert ended.value.task_status == "cancelled"
    with pytest.raises(NotFound):
        client.cancel("00000000-0000-4000-8000-000000000000")
