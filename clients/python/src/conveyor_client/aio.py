"""The asyncio variant: the same client, its blocking calls run in worker
threads (``asyncio.to_thread``), so an asyncio app never blocks its loop.

    async with AsyncClient("http://127.0.0.1:8080") as client:
        task = await client.submit("resize", {"url": "..."})
        output = await task.result(timeout=10)
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterable, List, Mapping, Optional

from .client import Client, Deadline, Run, RunState, Task, TaskState


class AsyncTask:
    """:class:`~conveyor_client.Task` with awaitable lookups."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self.id = task.id
        self.type = task.type
        self.idempotent_replay = task.idempotent_replay

    def __repr__(self) -> str:
        return f"AsyncTask(id={self.id!r}, type={self.type!r})"

    async def status(self) -> TaskState:
        return await asyncio.to_thread(self._task.status)

    async def wait(self, timeout: float = 10.0) -> TaskState:
        return await asyncio.to_thread(self._task.wait, timeout)

    async def result(self, timeout: float = 10.0) -> Any:
        return await asyncio.to_thread(self._task.result, timeout)

    async def cancel(self) -> Dict[str, Any]:
        return await asyncio.to_thread(self._task.cancel)


class AsyncRun:
    """:class:`~conveyor_client.Run` with awaitable lookups."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.id = run.id
        self.workflow = run.workflow
        self.idempotent_replay = run.idempotent_replay

    def __repr__(self) -> str:
        return f"AsyncRun(id={self.id!r}, workflow={self.workflow!r})"

    async def status(self) -> RunState:
        return await asyncio.to_thread(self._run.status)

    async def wait(self, timeout: float = 10.0) -> RunState:
        return await asyncio.to_thread(self._run.wait, timeout)

    async def result(self, timeout: float = 10.0) -> Any:
        return await asyncio.to_thread(self._run.result, timeout)


class AsyncClient:
    """:class:`~conveyor_client.Client` for asyncio; same arguments."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.sync = Client(base_url, token, timeout, retries, backoff)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sync.close()

    async def submit(
        self,
        type: str,
        payload: Any,
        key: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        deadline: Optional[Deadline] = None,
    ) -> AsyncTask:
        task = await asyncio.to_thread(
            self.sync.submit, type, payload, key, idempotency_key, deadline
        )
        return AsyncTask(task)

    async def submit_many(self, tasks: Iterable[Mapping[str, Any]]) -> List[AsyncTask]:
        items = list(tasks)
        submitted = await asyncio.to_thread(self.sync.submit_many, items)
        return [AsyncTask(t) for t in submitted]

    async def start_workflow(
        self, name: str, payload: Any, idempotency_key: Optional[str] = None
    ) -> AsyncRun:
        run = await asyncio.to_thread(self.sync.start_workflow, name, payload, idempotency_key)
        return AsyncRun(run)

    async def task(self, id: str) -> AsyncTask:
        return AsyncTask(await asyncio.to_thread(self.sync.task, id))

    async def run(self, id: str) -> AsyncRun:
        return AsyncRun(await asyncio.to_thread(self.sync.run, id))

    async def cancel(self, id: str) -> Dict[str, Any]:
        """See :meth:`Client.cancel`."""
        return await asyncio.to_thread(self.sync.cancel, id)


__all__ = ["AsyncClient", "AsyncRun", "AsyncTask"]
