"""The ingress's Redis work without Ray: the LAM append script (dedup marker and shard inbox
entry, atomically) on the shared Redis, and the per-request Redis budget against a hung
(SIGSTOPped) private Redis, through the real FastAPI app in process."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors.settings import load_settings
from serve.app import create_app
from serve.services import Services
from tests.redis_fixtures import REDIS_URL, PrivateRedis

pytest_plugins = ("tests.redis_fixtures",)

ACME = {"X-API-Key": "acme-dev-key"}
TODOS: list[dict[str, Any]] = [{"action": "noop"}, {"action": "noop", "depends_on": [0]}]


def lam_request(conv: str | None = None) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "ts": "2026-11-29T10:00:00Z", "type": "request",
            "sender": "agent://channel/chat", "to": ["agent://scheduler/cpa"],
            "task": "probe", "payload": {"todos": TODOS}, "context": {"tenant": "acme"},
            "correlation": {"conversationId": conv or f"conv-{uuid.uuid4().hex}"}}


@pytest.fixture
async def services(key_prefix: str, redis_client: aioredis.Redis) -> AsyncIterator[Services]:
    svc = Services.create(load_settings(redis={"url": REDIS_URL, "key_prefix": key_prefix},
                                        runtime={"shards": 1}, router={"llm_provider": "none"}))
    try:
        yield svc
    finally:
        await svc.close()


async def test_lam_append_marks_and_appends_atomically(services: Services,
                                                      redis_client: aioredis.Redis) -> None:
    svc = services
    inbox = svc.keys.shard_inbox(0)
    mid = str(uuid.uuid4())
    marker = svc.keys.idempotency("acme", f"lam-{mid}")

    def append(token: str) -> tuple[Any, ...]:
        return svc.lam_append_command("acme", "conv-1", mid, '{"type":"inform"}', token=token)

    # The append fails (the inbox is not a stream): no marker is left behind, so the
    # repeat of the message is appended instead of being answered "duplicate".
    await redis_client.set(inbox, "not a stream")
    with pytest.raises(ResponseError):
        await svc.run_scripts([append("first")])
    assert await redis_client.exists(marker) == 0
    await redis_client.delete(inbox)

    assert await svc.run_scripts([append("second")]) == [1]
    assert await redis_client.xlen(inbox) == 1
    # The same call again (the client retried after the reply was lost): appended, once.
    assert await svc.run_scripts([append("second")]) == [1]
    # A repeat of the message (a new call): duplicate, nothing appended.
    assert await svc.run_scripts([append("third"), append("fourth")]) == [0, 0]
    assert await redis_client.xlen(inbox) == 1
    entries: Any = await redis_client.xrange(inbox)
    entry = entries[0][1]
    assert entry == {"k": "lam", "t": "acme", "c": "conv-1", "d": '{"type":"inform"}'}
    assert 0 < await redis_client.ttl(marker) <= svc.settings.queue.idempotency_ttl_s


async def test_lam_intakes_in_one_batch_each_with_its_key(services: Services,
                                                         redis_client: aioredis.Redis) -> None:
    """Several jobs with idempotency keys in one pipelined round trip: new ones created,
    a repeat (same key, same body) answers the original job, another body is a mismatch."""
    from actors.errors import IdempotencyMismatch
    from actors.jobs import JobMeta
    from actors.jobstore import new_job_id

    svc = services

    def meta() -> JobMeta:
        return JobMeta(job_id=new_job_id(), tenant="acme", conversation_id="c", shard=0,
                       todos=TODOS, priority="normal", request={}, callback_url=None,
                       intent=None, slots={}, source="explicit", text=None)

    items = [(meta(), "lam:a", "h1"), (meta(), "lam:b", "h2"), (meta(), "lam:a", "h1"),
             (meta(), "lam:b", "other")]
    replies = await svc.run_scripts([svc.store.intake_command(m, k, d) for m, k, d in items])
    out = await svc.store.intake_outcomes([(*item, r) for item, r in zip(items, replies,
                                                                          strict=True)])
    first, second, repeat, mismatch = out
    assert not isinstance(first, Exception) and first.created
    assert not isinstance(second, Exception) and second.created
    assert not isinstance(repeat, Exception) and not repeat.created
    assert repeat.job_id == first.job_id and repeat.status == "queued"
    assert isinstance(mismatch, IdempotencyMismatch)
    assert await redis_client.zcard(svc.keys.jobs_index("acme")) == 2


async def test_hung_redis_answers_503_within_the_budget(private_redis: PrivateRedis,
                                                        key_prefix: str) -> None:
    """SIGSTOPped Redis: every kind of request is answered 503 + Retry-After within the
    budget (not after socket timeouts); an intake that timed out here but completed in Redis
    stays one job: its retry is answered with that job."""
    await private_redis.start()
    budget_s = 0.5
    settings = load_settings(redis={"url": private_redis.url, "key_prefix": key_prefix},
                             # the warm-up's backlog reading is reused: requests go
                             # straight to their own Redis work
                             http={"redis_budget_s": budget_s, "backlog_refresh_s": 10},
                             runtime={"shards": 1}, router={"llm_provider": "none"})
    app = create_app(settings)
    proc = private_redis.procs[-1]
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress",
                                     headers=ACME, timeout=30) as c:
            warm = await c.post("/lam/message", json=lam_request())
            assert warm.status_code == 202, warm.text
            job_id = warm.json()["job_id"]
            proc.send_signal(signal.SIGSTOP)
            msg = lam_request()
            calls = [("POST", "/lam/message", msg), ("POST", "/schedule", {"todos": TODOS}),
                     ("GET", f"/jobs/{job_id}", None), ("GET", "/jobs", None),
                     ("DELETE", f"/jobs/{job_id}", None)]
            for method, path, body in calls:
                t0 = time.monotonic()
                r = await c.request(method, path, json=body)
                took = time.monotonic() - t0
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["Retry-After"].isdigit(), path
                assert r.json()["error"] == "unavailable", r.text
                assert took < budget_s + 0.5, (path, took)
            health = await c.get("/health")
            assert health.status_code == 503 and health.json()["redis"]["ok"] is False
            proc.send_signal(signal.SIGCONT)
            # Redis runs what it had received before the ingress gave up on it: the intake of
            # `msg` may have completed. Either way its retry yields exactly one job.
            deadline = time.monotonic() + 10
            while True:
                again = await c.post("/lam/message", json=msg)
                if again.status_code != 503 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert again.status_code in (200, 202), again.text
            redis = aioredis.from_url(private_redis.url, decode_responses=True)
            try:
                jobs = await redis.zrange(app.state.services.keys.jobs_index("acme"), 0, -1)
            finally:
                await redis.aclose()
            assert again.json()["job_id"] in jobs
            # The warm-up, at most one for `msg` and at most one /schedule job.
            assert len([j for j in jobs if j != job_id]) <= 2, jobs
            if again.status_code == 200:
                assert again.json()["duplicate"] is True
            print(f"\n[budget] retry of the timed-out intake answered {again.status_code} "
                  f"({'it had completed in Redis' if again.status_code == 200 else 'new'})")
            r = await c.get(f"/jobs/{again.json()['job_id']}")
            assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGCONT)
        if app.state.services is not None:
            await app.state.services.close()
