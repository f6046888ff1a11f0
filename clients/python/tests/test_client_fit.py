"""The client in a server's life: retries through a proxy that answers
502, busy idempotency keys, long waits, unambiguous deadlines, trace
context, TLS, proxies from the environment, Celery's calls, and the
asyncio client's connections."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from typing import Any, List

import pytest

import conveyor_client.client as client_module
from conveyor_client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    TaskFailed,
)

from conftest import TOKEN, Calls, Dev, FlakyProxy


def test_a_gateway_answering_502_twice_then_202_makes_one_task(
    proxy: FlakyProxy, calls: Calls
) -> None:
    marker = str(uuid.uuid4())
    proxy.mode = "502"
    proxy.fail_next = 2
    with Client(proxy.url, token=TOKEN, backoff=0.05) as c:
        task = c.submit("kit_count", {"marker": marker})
        assert task.result(timeout=10) == {"marker": marker}
    assert len(proxy.posts) == 3
    assert len({json.loads(p)["idempotency_key"] for p in proxy.posts}) == 1
    assert task.idempotent_replay
    assert calls.markers("kit_count")[marker] == 1


def test_lookups_are_retried_on_502_504_and_503(client: Client, proxy: FlakyProxy) -> None:
    task = client.submit("echo", {"n": 7})
    assert task.result(timeout=10) == {"n": 7}
    proxy.fail_methods = ("GET",)
    for mode in ("502", "504", "503"):
        proxy.mode = mode
        proxy.fail_next = 2
        with Client(proxy.url, token=TOKEN, backoff=0.05) as c:
            assert c.task(task.id).result(timeout=10) == {"n": 7}
        assert proxy.fail_next == 0
    gets = [t for t in proxy.targets if t.startswith("GET ")]
    assert len(gets) >= 9, gets


def test_a_busy_key_is_tried_for_its_budget_and_the_error_carries_the_key(
    proxy: FlakyProxy,
) -> None:
    proxy.mode = "409"
    proxy.fail_next = 1000
    key = "busy-" + str(uuid.uuid4())
    # retries=0: the budget, not the retry count, governs a busy key.
    with Client(proxy.url, token=TOKEN, retries=0, backoff=0.05, conflict_budget=1.0) as c:
        with pytest.raises(Conflict) as error:
            c.submit("echo", 1, idempotency_key=key)
    assert error.value.code == "idempotency_key_in_use"
    assert error.value.idempotency_key == key
    assert len(proxy.posts) >= 3
    # A submission that fails for good tells the key it generated.
    proxy.mode = "503"
    proxy.fail_next = 1000
    with Client(proxy.url, token=TOKEN, retries=1, backoff=0.01) as c:
        with pytest.raises(Exception) as failed:
            c.submit("echo", 1)
        with pytest.raises(Exception) as batch:
            c.submit_many([{"type": "echo", "payload": 1}, {"type": "echo", "payload": 2}])
    sent = [json.loads(p) for p in proxy.posts]
    assert getattr(failed.value, "idempotency_key") == sent[-3]["idempotency_key"]
    assert getattr(batch.value, "idempotency_keys") == [
        t["idempotency_key"] for t in sent[-1]["tasks"]
    ]


def test_result_without_a_timeout_waits_to_the_end_in_short_polls(
    proxy: FlakyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_POLL_WAIT", 0.5)
    with Client(proxy.url, token=TOKEN) as c:
        task = c.submit("sleep", {"ms": 2500})
        assert task.result(timeout=None) == {"slept_ms": 2500}
        assert task.get() == {"slept_ms": 2500}
    waits = [int(m) for m in re.findall(r"wait=(\d+)ms", " ".join(proxy.targets))]
    assert len(waits) >= 3, proxy.targets
    assert max(waits) <= 500, waits


def test_deadlines_are_never_ambiguous(client: Client, proxy: FlakyProxy) -> None:
    with pytest.raises(TypeError, match="expires_in=60"):
        client.submit("echo", 1, deadline=60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time zone"):
        client.submit("echo", 1, deadline=datetime.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        client.submit("echo", 1, deadline=datetime.timedelta(seconds=5), expires_in=5)
    with Client(proxy.url, token=TOKEN) as c:
        assert c.submit("echo", 1, expires_in=60).result(timeout=10) == 1
        assert c.submit("echo", 2, deadline=datetime.timedelta(minutes=1)).result(timeout=10) == 2
        later = c.submit("echo", 3, delay=0.5)
        assert later.status().status in ("scheduled", "queued", "running", "succeeded")
        assert later.result(timeout=10) == 3
    sent = [json.loads(p) for p in proxy.posts]
    assert [s.get("deadline") for s in sent] == ["60000ms", "60000ms", None]
    assert sent[2]["delay"] == "500ms"


def test_traceparent_is_passed_through(client: Client) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    task = client.submit("echo", 1, traceparent=traceparent)
    state = task.wait(10)
    assert state.traceparent is not None and trace_id in state.traceparent


def test_celery_style_ready_successful_and_get(client: Client) -> None:
    task = client.submit("sleep", {"ms": 1000})
    assert not task.ready()
    assert not task.successful()
    assert task.get(timeout=10) == {"slept_ms": 1000}
    assert task.ready() and task.successful()
    failing = client.submit("kit_permanent", {"image": "x.png"})
    returned = failing.get(timeout=10, propagate=False)
    assert isinstance(returned, TaskFailed) and returned.kind == "permanent"
    with pytest.raises(TaskFailed):
        failing.get(timeout=10)
    assert failing.ready() and not failing.successful()


def test_an_environment_proxy_is_used_unless_told_not_to(
    dev: Dev, proxy: FlakyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dev.api is not None
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url)
    with Client(dev.api, token=TOKEN) as c:
        assert c.submit("echo", "via proxy").result(timeout=10) == "via proxy"
    assert any(t.startswith("POST http://127.0.0.1:") for t in proxy.targets), proxy.targets
    seen = len(proxy.targets)

    async def through_async() -> Any:
        async with AsyncClient(dev.api or "", token=TOKEN) as c:
            return await (await c.submit("echo", "async via proxy")).result(timeout=10)

    assert asyncio.run(through_async()) == "async via proxy"
    assert len(proxy.targets) > seen
    seen = len(proxy.targets)
    with Client(dev.api, token=TOKEN, trust_env=False) as c:
        assert c.submit("echo", "direct").result(timeout=10) == "direct"
    assert len(proxy.targets) == seen


@pytest.fixture()
def certificate(tmp_path: Any) -> "tuple[str, str]":
    if shutil.which("openssl") is None:
        if os.environ.get("CONVEYOR_REQUIRE_PYTHON"):
            pytest.fail("openssl is needed for the TLS tests")
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_an_https_gateway_checked_with_a_ca_file(dev: Dev, certificate: "tuple[str, str]") -> None:
    assert dev.api is not None
    tls = FlakyProxy(dev.api, tls=certificate)
    try:
        with Client(tls.url, token=TOKEN, ca_file=certificate[0]) as c:
            assert c.submit("echo", "over tls").result(timeout=10) == "over tls"

        async def through_async() -> Any:
            async with AsyncClient(tls.url, token=TOKEN, ca_file=certificate[0]) as c:
                return await (await c.submit("echo", "async over tls")).result(timeout=10)

        assert asyncio.run(through_async()) == "async over tls"
        with Client(tls.url, token=TOKEN, retries=0) as untrusting:
            with pytest.raises(ConnectionFailed) as error:
                untrusting.submit("echo", "refused")
        assert "CERTIFICATE_VERIFY_FAILED" in str(error.value)
    finally:
        tls.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_async_client_runs_without_threads_and_closes_what_it_opened(dev: Dev) -> None:
    """64 long waits in flight hold no thread each: a name lookup in the
    loop's default executor started after them ends before any of them,
    and no thread is started; closing the client closes its sockets."""
    assert dev.api is not None
    api = dev.api
    threads_before = threading.active_count()
    fds_before = open_fds()
    order: List[str] = []

    async def main() -> List[Any]:
        async with AsyncClient(api, token=TOKEN, max_connections=64) as c:
            tasks = [await c.submit("sleep", {"ms": 1500}) for _ in range(64)]

            async def result(t: Any) -> Any:
                value = await t.result(timeout=20)
                order.append("result")
                return value

            waits = [asyncio.ensure_future(result(t)) for t in tasks]
            await asyncio.sleep(0.2)
            threads_during.append(threading.active_count())
            fds_during.append(open_fds())
            await asyncio.get_running_loop().getaddrinfo("localhost", 80)
            order.append("lookup")
            return list(await asyncio.gather(*waits))

    threads_during: List[int] = []
    fds_during: List[int] = []
    assert asyncio.run(main()) == [{"slept_ms": 1500}] * 64
    assert order[0] == "lookup", order[:3]
    assert threads_during[0] == threads_before, (threads_before, threads_during)
    assert fds_during[0] > fds_before
    assert open_fds() == fds_before
