"""WS /lam/stream end to end on a real local Ray (Serve ingress, pools, shards) and real
Redis: frames of LAM messages in, one result per message out."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.ray_fixtures import ACME, System

pytest_plugins = ("tests.redis_fixtures", "tests.ray_fixtures")
pytestmark = pytest.mark.ray

DIAMOND = [
    {"action": "noop", "name": "A"},
    {"action": "noop", "name": "B", "depends_on": [0]},
    {"action": "noop", "name": "C", "depends_on": [0]},
    {"action": "noop", "name": "D", "depends_on": [1, 2]},
]


def lam_message(type_: str = "request", **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "id": str(uuid.uuid4()), "ts": "2026-11-29T10:00:00Z", "type": type_,
        "sender": "agent://channel/chat", "to": ["agent://scheduler/cpa"],
        "task": "run this plan", "payload": {"todos": DIAMOND},
        "context": {"tenant": "acme"},
        "correlation": {"conversationId": f"conv-{uuid.uuid4().hex}"},
    }
    msg.update(extra)
    return msg


def stream(system: System, query: str = "", headers: dict[str, str] | None = None
           ) -> ClientConnection:
    url = system.url.replace("http://", "ws://") + "/lam/stream" + query
    return connect(url, additional_headers=ACME if headers is None else headers,
                   open_timeout=30, max_size=None)


def exchange(ws: ClientConnection, frame: Any) -> list[dict[str, Any]]:
    ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))
    results = json.loads(ws.recv(timeout=60))
    assert isinstance(results, list)
    return results


def test_stream_of_200_requests_all_run_and_reply(system: System) -> None:
    msgs = [lam_message() for _ in range(200)]
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    with stream(system) as ws:
        for i in range(0, len(msgs), 50):
            results += exchange(ws, msgs[i:i + 50])
    accept_s = time.monotonic() - t0
    assert [r["code"] for r in results] == [202] * 200, results[:3]
    assert [r["message_id"] for r in results] == [m["id"] for m in msgs]
    assert all(r["status"] == "queued" for r in results)
    assert len({r["job_id"] for r in results}) == 200
    for r in results:
        assert system.wait_job(r["job_id"])["steps_total"] == 4
    with system.client() as c:
        for msg in msgs:
            conv = msg["correlation"]["conversationId"]
            deadline = time.monotonic() + 20
            types: list[str] = []
            while time.monotonic() < deadline:
                out = c.get(f"/conversations/{conv}/messages").json()["messages"]
                types = [m["message"]["type"] for m in out]
                if "done" in types:
                    break
                time.sleep(0.1)
            assert types[0] == "agree" and types[-1] == "done", (conv, types)
            assert all(m["message"]["correlation"]["inReplyTo"] == msg["id"] for m in out)
    print(f"\n[stream] 200 LAM requests in 4 frames accepted in {accept_s:.2f} s")


def test_stream_results_per_message_and_bad_frames_keep_the_socket(system: System) -> None:
    good, good2 = lam_message(), lam_message()
    bad = lam_message(payload={"todos": [{"action": "sned_mail"}]})
    inform = lam_message("inform", payload={"note": "hello"})
    del inform["task"]
    with stream(system) as ws:
        first = exchange(ws, [good, bad, good2])
        assert [r["code"] for r in first] == [202, 422, 202], first
        assert first[1]["field"] == "payload.todos[0].action", first[1]
        assert first[1]["message_id"] == bad["id"] and "send_mail" in first[1]["message"]
        assert first[1]["error"] == "validation_failed" and "rule" in first[1]
        # The same request again: the original job, 200.
        (again,) = exchange(ws, good)
        assert again["code"] == 200 and again["duplicate"] is True
        assert again["job_id"] == first[0]["job_id"]
        # Another performative: appended once; its repeat is a duplicate.
        assert exchange(ws, [inform, inform]) == [
            {"message_id": inform["id"], "conversation_id": inform["correlation"][
                "conversationId"], "status": "accepted", "code": 202},
            {"message_id": inform["id"], "conversation_id": inform["correlation"][
                "conversationId"], "status": "duplicate", "code": 200}]
        # Out of protocol: a done that answers nothing in its conversation.
        done = lam_message("done", correlation={"conversationId": "conv-x",
                                                "inReplyTo": str(uuid.uuid4())})
        (late,) = exchange(ws, done)
        assert late["code"] == 409 and late["field"] == "correlation.inReplyTo", late
        # Bad frames: an error result each, and the socket stays usable.
        for frame, code in (("{not json", 422), ("42", 422), ("[]", 422),
                            (json.dumps([good] * 1001), 422), ('{"a": 1, "a": 2}', 422),
                            (b"\xff\xfe", 422), ("x" * (4 * 1_048_576 + 1), 413)):
            (result,) = exchange(ws, frame)
            assert result["code"] == code, (str(frame)[:40], result)
            assert result["field"] in ("<frame>", "a"), result
        (last,) = exchange(ws, lam_message())
        assert last["code"] == 202, last
    for job_id in (first[0]["job_id"], first[2]["job_id"], last["job_id"]):
        assert system.wait_job(job_id)["status"] == "succeeded"


def test_stream_authenticates_like_the_job_socket(system: System) -> None:
    for headers in ({"X-API-Key": "nope"}, {}):
        with stream(system, headers=headers) as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with stream(system, query="?api_key=acme-dev-key", headers={}) as ws:
        (result,) = exchange(ws, lam_message())
    assert result["code"] == 202, result
