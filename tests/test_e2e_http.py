"""End to end over HTTP on a real local Ray (Serve ingress, pools, shards) and real Redis."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.ray_fixtures import ACME, GLOBEX, System

pytest_plugins = ("tests.redis_fixtures", "tests.ray_fixtures")
pytestmark = pytest.mark.ray

DIAMOND = [
    {"action": "noop", "name": "A"},
    {"action": "noop", "name": "B", "depends_on": [0]},
    {"action": "noop", "name": "C", "depends_on": [0]},
    {"action": "noop", "name": "D", "depends_on": [1, 2]},
]
DATEV = ("Finde in DATEV die letzte Rechnung für Firma X, exportiere PDF, sende per Mail an "
         "anna@kunde.de")


def lam_request(task: str, conv: str, tenant: str = "acme", **extra: Any) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()), "ts": "2026-11-29T10:00:00Z", "type": "request",
        "sender": "agent://channel/chat", "to": ["agent://scheduler/cpa"], "task": task,
        "payload": {}, "context": {"tenant": tenant, "locale": "de-DE"},
        "correlation": {"conversationId": conv}, **extra,
    }


def test_health_reports_redis_ray_and_pools(system: System) -> None:
    with system.client() as c:
        r = c.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["redis"]["ok"] is True
    assert body["ray"]["shards"] == {"expected": 2, "alive": 2}
    assert body["pools"]["noop"]["state"] == "ok"


def test_diamond_job_completes_in_dependency_order(system: System) -> None:
    with system.client() as c:
        r = c.post("/schedule", json={"todos": DIAMOND})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) >= {"job_id", "conversation_id", "status"}
    job = system.wait_job(accepted["job_id"])
    steps = job["steps"]
    assert [s["status"] for s in steps] == ["succeeded"] * 4
    assert steps[0]["finished_at"] <= min(steps[1]["started_at"], steps[2]["started_at"])
    assert max(steps[1]["finished_at"], steps[2]["finished_at"]) <= steps[3]["started_at"]


def test_datev_request_dry_runs_to_nine_step_plan(system: System) -> None:
    with system.client() as c:
        r = c.post("/schedule", json={"text": DATEV, "dry_run": True})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["intent"] == "invoice.export_and_mail"
    assert plan["slots"]["recipient"] == "anna@kunde.de"
    assert len(plan["todos"]) == 9
    # A dry run creates nothing.
    with system.client() as c:
        assert c.get("/jobs").json()["total"] >= 0


def test_lam_request_gets_agree_then_failure(system: System) -> None:
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    msg = lam_request("Öffne https://portal.example.com", conv)
    with system.client() as c:
        r = c.post("/lam/message", json=msg)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        # The same message again is not a second job.
        again = c.post("/lam/message", json=msg)
        assert again.status_code == 200 and again.json()["job_id"] == job_id
    # The browser pool of this test system refuses its steps: the job fails cleanly.
    job = system.wait_job(job_id, ("succeeded", "failed"))
    assert job["intent"] == "web.open"
    assert job["status"] == "failed" and "capability" in job["error"]
    with system.client() as c:
        deadline = time.monotonic() + 10
        types: list[str] = []
        while time.monotonic() < deadline:
            out = c.get(f"/conversations/{conv}/messages").json()["messages"]
            types = [m["message"]["type"] for m in out]
            if types and types[-1] in ("done", "failure"):
                break
            time.sleep(0.1)
    assert types[0] == "agree"
    assert types[-1] == "failure"
    assert all(m["message"]["correlation"]["inReplyTo"] == msg["id"] for m in out)


def test_unroutable_lam_request_is_refused(system: System) -> None:
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    with system.client() as c:
        r = c.post("/lam/message", json=lam_request("asdf qwer zxcv", conv))
        assert r.status_code == 200
        assert r.json()["status"] == "refused"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = c.get(f"/conversations/{conv}/messages").json()["messages"]
            if out:
                break
            time.sleep(0.1)
    assert out[0]["message"]["type"] == "refuse"
    assert out[0]["message"]["payload"]["reason"]


def test_cancel_then_retry(system: System) -> None:
    todos = [{"action": "sleep", "params": {"ms": 4000}, "timeout": 30},
             {"action": "noop", "depends_on": [0]}]
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": todos}).json()["job_id"]
        time.sleep(0.5)
        r = c.delete(f"/jobs/{job_id}")
        assert r.status_code == 202
    job = system.wait_job(job_id, ("cancelled",))
    assert {s["status"] for s in job["steps"]} == {"cancelled"}
    with system.client() as c:
        r = c.post(f"/jobs/{job_id}/retry")
        assert r.status_code == 202, r.text
    job = system.wait_job(job_id, ("succeeded",))
    assert job["steps"][1]["status"] == "succeeded"
    with system.client() as c:
        assert c.post(f"/jobs/{job_id}/retry").status_code == 409


def test_websocket_receives_step_updates(system: System) -> None:
    from websockets.sync.client import connect

    todos = [{"action": "sleep", "params": {"ms": 800}},
             {"action": "noop", "depends_on": [0]}]
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": todos}).json()["job_id"]
    ws_url = system.url.replace("http://", "ws://") + f"/ws/jobs/{job_id}"
    messages = []
    with connect(ws_url, additional_headers=ACME, open_timeout=30) as ws:
        while True:
            try:
                messages.append(json.loads(ws.recv(timeout=30)))
            except Exception:
                break
    assert messages[0]["type"] == "snapshot"
    updates = [m for m in messages if m["type"] == "update"]
    assert any(m.get("step") == 1 and m["status"] == "succeeded" for m in updates) or \
        messages[-1].get("status") == "succeeded"
    assert updates and updates[-1]["status"] == "succeeded"
    lam_types = [m["message"]["type"] for m in messages if m["type"] == "lam"]
    assert "done" in lam_types, messages


def test_other_tenant_gets_404(system: System) -> None:
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": DIAMOND[:1]}).json()["job_id"]
    with system.client(GLOBEX) as g:
        assert g.get(f"/jobs/{job_id}").status_code == 404
        assert g.delete(f"/jobs/{job_id}").status_code == 404
        assert g.post(f"/jobs/{job_id}/retry").status_code == 404
        assert all(j["job_id"] != job_id for j in g.get("/jobs").json()["jobs"])


def test_missing_or_bad_key_is_401(system: System) -> None:
    r = httpx.post(f"{system.url}/schedule", json={"todos": DIAMOND})
    assert r.status_code == 401
    with system.client({"X-API-Key": "nope"}) as c:
        assert c.get("/jobs").status_code == 401


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (b"{not json", "application/json", 422, "<body>"),
        (b'{"type": "request"}', "application/json", 422, None),
        (json.dumps({"type": "shout"}).encode(), "application/json", 422, "type"),
        (b"hello", "text/plain", 415, None),
        (b'{"a": 1, "a": 2}', "application/json", 422, "a"),
        (b"[]", "application/json", 422, "<message>"),
    ],
)
def test_malformed_lam_is_4xx(system: System, body: bytes, content_type: str, status: int,
                              field: str | None, reliability: Any) -> None:
    with system.client() as c:
        r = c.post("/lam/message", content=body, headers={**ACME, "Content-Type": content_type})
    assert r.status_code == status, r.text
    if field:
        assert r.json()["field"] == field
    reliability.record(f"malformed LAM {body[:24]!r} ({content_type})", "4xx naming the field",
                       status=r.status_code, field=field or "-")


def test_ten_thousand_step_graph_validates_over_http(system: System) -> None:
    chain = [{"action": "noop"}] + [{"action": "noop", "depends_on": [i - 1]}
                                    for i in range(1, 10_000)]
    with system.client() as c:
        r = c.post("/schedule", json={"todos": chain, "dry_run": True})
        assert r.status_code == 200, r.text[:300]
        assert len(r.json()["levels"]) == 10_000
        cyclic = [{"action": "noop", "depends_on": [9_999]}, *chain[1:]]
        r = c.post("/schedule", json={"todos": cyclic})
        assert r.status_code == 422
        assert r.json()["cycle"][0] == r.json()["cycle"][-1]


def test_bad_schedule_bodies_name_the_field(system: System) -> None:
    cases = [
        ({"todos": [{"action": "sned_mail"}]}, "todos[0].action", "send_mail"),
        ({"todos": [{"action": "noop", "depends_on": [0]}]}, "todos[0].depends_on", None),
        ({"todos": [{"action": "noop", "depends_on": [1]}, {"action": "noop",
                                                          "depends_on": [0]}]},
         "todos[0].depends_on", "todos[0] → todos[1] → todos[0]"),
        ({"text": "x", "todos": DIAMOND}, "<message>", None),
        ({"todos": DIAMOND, "priority": "urgent"}, "priority", None),
        ({"todos": DIAMOND, "colour": "red"}, "colour", None),
    ]
    with system.client() as c:
        for body, field, needle in cases:
            r = c.post("/schedule", json=body)
            assert r.status_code == 422, (body, r.text)
            data = r.json()
            assert data["field"].startswith(field), data
            if needle:
                assert needle in json.dumps(data, ensure_ascii=False), data


def test_batch_schedule_all_complete_and_bad_item_writes_nothing(system: System) -> None:
    with system.client() as c:
        r = c.post("/schedule/batch", json={"jobs": [{"todos": DIAMOND}] * 5})
        assert r.status_code == 202, r.text
        ids = [j["job_id"] for j in r.json()["jobs"]]
        assert len(set(ids)) == 5
        before = c.get("/jobs").json()["total"]
        bad = c.post("/schedule/batch", json={"jobs": [
            {"todos": DIAMOND}, {"todos": [{"action": "sned_mail"}]}]})
        assert bad.status_code == 422
        assert bad.json()["field"] == "jobs[1].todos[0].action"
        assert c.get("/jobs").json()["total"] == before  # nothing half-written
        assert c.post("/schedule/batch", json={"jobs": []}).status_code == 422
    for job_id in ids:
        assert system.wait_job(job_id)["status"] == "succeeded"


@pytest.mark.parametrize("megabytes", [1, 10, 100])
def test_oversized_bodies_are_4xx_without_reading_them(system: System, megabytes: int,
                                                       reliability: Any) -> None:
    """Bodies past a limit are refused from their Content-Length (413, nothing read); a
    body under the byte limit but with an oversized field is a 422 naming the field."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(system.url)
    blob = b"x" * (megabytes * 1_048_576)
    for path, body in (
        ("/lam/message", b'{"payload": {"blob": "' + blob + b'"}}'),
        ("/schedule", b'{"todos": [{"action": "noop", "text": "' + blob + b'"}]}'),
    ):
        head = (f"POST {url.path}{path} HTTP/1.1\r\nHost: {url.hostname}\r\n"
                f"X-API-Key: acme-dev-key\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        whole = len(body) <= 4 * 1_048_576  # under the HTTP body limit: send all of it
        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.sendall(head + (body if whole else body[:65536]))
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
        status = int(response.split(b" ", 2)[1])
        assert status in (413, 422), (path, megabytes, response[:300])
        if not whole or path == "/lam/message":
            assert status == 413, (path, megabytes, response[:300])
    with system.client() as c:  # still serving
        assert c.get("/health").status_code == 200
    reliability.record(f"oversized body {megabytes} MB (LAM and /schedule)",
                       "4xx (413/422), never 5xx, no crash", status="413/422", crashes=0)


def test_lam_request_with_explicit_plan_or_named_intent(system: System) -> None:
    conv = f"conv-{uuid.uuid4().hex[:8]}"
    plan = lam_request("run this plan", conv, payload={"todos": DIAMOND})
    named = lam_request("", f"{conv}-2", intent="mail.send", payload={"slots": {
        "recipient": "bob@firma.de", "subject": "Offer", "body": "Hello"}})
    del named["task"]
    unknown = lam_request("", f"{conv}-3", intent="mail.send", payload={"slots": {}})
    del unknown["task"]
    bad = lam_request("x", f"{conv}-4", payload={"todos": [{"action": "sned_mail"}]})
    with system.client() as c:
        r = c.post("/lam/message", json=plan)
        assert r.status_code == 202, r.text
        assert system.wait_job(r.json()["job_id"])["steps_total"] == 4
        r = c.post("/lam/message", json=named)
        assert r.status_code == 202, r.text
        assert r.json()["intent"] == "mail.send"
        assert r.json()["slots"]["recipient"] == "bob@firma.de"
        r = c.post("/lam/message", json=unknown)  # a required slot is missing → refuse
        assert r.status_code == 200 and r.json()["status"] == "refused"
        assert "recipient" in r.json()["reason"]
        r = c.post("/lam/message", json=bad)
        assert r.status_code == 422 and r.json()["field"] == "payload.todos[0].action"


def test_direct_ingress_serves_the_same_api(system: System) -> None:
    """Serve's direct ingress (the replica's own port, no proxy hop): same jobs, same
    errors, same WebSocket as through the proxy."""
    from websockets.sync.client import connect as ws_connect

    from actors.launcher import direct_ingress_urls

    urls = direct_ingress_urls(f"cpa-{system.prefix}")
    assert urls, "direct ingress is on for the test cluster: the ingress has targets"
    with httpx.Client(base_url=urls[0], headers=ACME, timeout=30) as c:
        r = c.post("/schedule", json={"todos": DIAMOND})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        bad = c.post("/schedule", json={"todos": [{"action": "noop", "depends_on": [3]}]})
        assert bad.status_code == 422 and bad.json()["field"] == "todos[0].depends_on[0]"
        assert c.get(f"/jobs/{job_id}", headers=GLOBEX).status_code == 404
    done = system.wait_job(job_id)  # through the proxy: one system behind both
    assert done["status"] == "succeeded"
    ws_url = urls[0].replace("http://", "ws://") + f"/ws/jobs/{job_id}"
    with ws_connect(ws_url, additional_headers=ACME, open_timeout=10) as ws:
        first = json.loads(ws.recv(timeout=10))
    assert first["type"] == "snapshot" and first["job"]["status"] == "succeeded"
