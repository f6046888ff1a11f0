"""Signed handler requests (conveyor's ``signing_secret_file`` and the
kit's ``Handlers(secret=...)``) against a real ``conveyor dev``."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
import uuid
from typing import Any, Dict, Optional, Tuple

import pytest

from conveyor_client import Client, Handlers, TaskFailed, signature, verify_signature

from conftest import NEW_SECRET, OLD_SECRET, Calls, SignedKit


def post(url: str, body: bytes, headers: Dict[str, str]) -> Tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("POST", parts.path, body=body, headers=dict(headers, **{"content-type": "application/json"}))
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def signed(secret: str, body: bytes, at: Optional[int] = None) -> Dict[str, str]:
    at = int(time.time()) if at is None else at
    return {"conveyor-signature": f"t={at},v1={signature(secret, at, body)}"}


def test_forged_unsigned_and_stale_requests_are_refused_before_any_handler_runs(
    signed_kit: SignedKit, calls: Calls
) -> None:
    url = signed_kit.url + "/tasks/signed_old"
    marker = str(uuid.uuid4())
    body = json.dumps({"marker": marker}).encode()
    other = json.dumps({"marker": "someone else's"}).encode()
    refusals = [
        ({}, "unsigned request"),
        (signed("a-secret-the-app-does-not-know", body), "matches no secret"),
        (signed(OLD_SECRET, body, int(time.time()) - 3600), "stale"),
        (signed(OLD_SECRET, other), "matches no secret"),
        ({"conveyor-signature": "v1=abc"}, "malformed"),
    ]
    for headers, says in refusals:
        status, text = post(url, body, headers)
        assert (status, says in text) == (401, True), (headers, status, text)
    assert calls.markers("signed_old")[marker] == 0
    status, text = post(url, body, signed(OLD_SECRET, body))
    assert status == 200, text
    assert json.loads(text) == {"signed": "signed_old"}
    assert calls.markers("signed_old")[marker] == 1


def test_a_secret_rotation_refuses_no_task(client: Client, signed_kit: SignedKit) -> None:
    """The rotation the README describes: the app takes both secrets, the
    workers move from the old one through both to the new one, the app
    drops the old one. Every task on the way succeeds; after it, requests
    signed with the old secret alone, or not at all, fail for good."""

    def run(kind: str) -> Any:
        return client.submit(kind, {"marker": str(uuid.uuid4())}).result(timeout=15)

    try:
        assert run("signed_old") == {"signed": "signed_old"}
        assert run("signed_both") == {"signed": "signed_both"}
        signed_kit.use([OLD_SECRET, NEW_SECRET])
        for kind in ("signed_old", "signed_both", "signed_new"):
            assert run(kind) == {"signed": kind}
        signed_kit.use(NEW_SECRET)
        for kind in ("signed_both", "signed_new"):
            assert run(kind) == {"signed": kind}
        for kind, says in (("signed_old", "matches no secret"), ("signed_none", "unsigned request")):
            with pytest.raises(TaskFailed) as failed:
                run(kind)
            assert failed.value.kind == "permanent"
            assert "401" in failed.value.message and says in failed.value.message
    finally:
        signed_kit.use(OLD_SECRET)


def test_verify_signature_and_secret_checks() -> None:
    body = b'{"x": 1}'
    now = 1_800_000_000
    good = f"t={now},v1={signature(OLD_SECRET, now, body)}"
    assert verify_signature(good, body, [OLD_SECRET], now=now) is None
    # Either of two signatures, against either of two secrets.
    two = good + f",v1={signature(NEW_SECRET, now, body)}"
    assert verify_signature(two, body, [NEW_SECRET], now=now) is None
    assert verify_signature(good, body, [NEW_SECRET, OLD_SECRET], now=now) is None
    # Within the tolerance either way (clock skew), not beyond.
    assert verify_signature(good, body, [OLD_SECRET], tolerance=60, now=now + 60) is None
    assert verify_signature(good, body, [OLD_SECRET], tolerance=60, now=now - 60) is None
    stale = verify_signature(good, body, [OLD_SECRET], tolerance=60, now=now + 61)
    assert stale is not None and "stale" in stale
    for header in (None, "", "t=x,v1=00", f"t={now}", "garbage"):
        why = verify_signature(header, body, [OLD_SECRET], now=now)
        assert why is not None, header
    with pytest.raises(ValueError, match="shorter than 16"):
        Handlers(secret="short")
    with pytest.raises(ValueError, match="at most 2"):
        Handlers(secret=[OLD_SECRET, NEW_SECRET, OLD_SECRET + "x"])
    with pytest.raises(ValueError) as error:
        Handlers(secret="short")
    assert "short" not in str(error.value).replace("shorter", "")
    assert not Handlers().signed
    assert Handlers(secret=OLD_SECRET).signed


def test_the_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SIGNING_SECRET", f"{OLD_SECRET}\n{NEW_SECRET}\n")
    handlers = Handlers()
    handlers.add("t", lambda payload: payload)
    body = b"1"
    for secret in (OLD_SECRET, NEW_SECRET):
        reply = handlers.handle("POST", "/t", signed(secret, body), body)
        assert reply.status == 200, reply.body
    assert handlers.handle("POST", "/t", {}, body).status == 401
