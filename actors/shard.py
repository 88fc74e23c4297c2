"""ConversationShard: hosts the virtual Orchestrators of many conversations (DESIGN.md D1).

One shard consumes one Redis inbox stream. Entries are routed to a per-conversation mailbox
and processed one at a time, in arrival order, per conversation; different conversations run
concurrently. Each processed entry's effects (job/step state, dispatched steps, delayed
retries, replies, journal, the acknowledgement) are written in ONE Redis transaction, so a
crash either loses the whole step of work (the entry is redelivered) or none of it.

Plain asyncio class: ``actors.cluster`` wraps it in a named, detached, restartable Ray actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors import lam
from actors.callbacks import CallbackSender
from actors.errors import CpaError, NotFound
from actors.jobs import Job, JobStatus
from actors.jobstore import INBOX_GROUP, JobStore, job_to_fields
from actors.keys import Keys
from actors.orchestrator import (
    Dispatch,
    Effects,
    Orchestrator,
    StepResult,
    restartable_sessions,
)
from actors.queue import TaskQueue, dead_letter_fields, delayed_member
from actors.redisconn import connect
from actors.retry import RetryPolicy
from actors.settings import Settings
from actors.writebatch import WriteBatch, apply_sha

log = logging.getLogger("cpa.shard")

OUTBOX_MAXLEN = 10_000
JOURNAL_MAXLEN = 10_000


def cancel_channel(keys: Keys) -> str:
    """Pub/sub channel on which executors learn to abort running steps."""
    return f"{keys.prefix}:cancel"


def active_key(keys: Keys, shard: int) -> str:
    """Set of ``tenant|job_id`` of the shard's unfinished jobs (resumed after a restart)."""
    return f"{keys.prefix}:{{shard{shard}}}:active"


def journal_key(keys: Keys, tenant: str, conversation_id: str) -> str:
    """Append-only journal of a conversation's state changes."""
    return keys.conversation(tenant, conversation_id) + ":journal"


@dataclass
class _Mailbox:
    orchestrator: Orchestrator
    queue: asyncio.Queue[tuple[str, dict[str, str]]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class ShardRuntime:
    """The event loop of one ConversationShard."""

    def __init__(self, index: int, settings: Settings, *, redis: aioredis.Redis | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.settings = settings
        self.keys = Keys(settings.redis.key_prefix)
        self.redis = redis or connect(settings.redis)
        self.clock = clock
        self.queue = TaskQueue(self.redis, self.keys, settings.queue, clock)
        self.store = JobStore(self.redis, self.keys, shards=settings.runtime.shard_count(),
                              idempotency_ttl_s=settings.queue.idempotency_ttl_s,
                              graph_limits=settings.graph, clock=clock)
        self.policy = RetryPolicy.from_settings(settings.queue)
        self.inbox = self.keys.shard_inbox(index)
        self.consumer = f"shard-{index}"
        self.mailboxes: dict[tuple[str, str], _Mailbox] = {}
        self.inflight: set[str] = set()
        self.rng = random.Random()
        self.callbacks = CallbackSender()
        self.processed = 0
        self._lost_reported: set[tuple[str, str, str]] = set()
        self._pending_commits: list[tuple[Callable[[WriteBatch], None],
                                          asyncio.Future[None]]] = []
        self._apply_sha = apply_sha(self.redis)
        self._commit_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -------------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Consume the inbox until :meth:`stop`. Resumes unfinished work first."""
        await self._ensure_group()
        await self.callbacks.start()
        await self._resume_active()
        self._tasks = [
            asyncio.create_task(self._timers(), name=f"shard{self.index}-timers"),
            asyncio.create_task(self._commit_loop(), name=f"shard{self.index}-commit"),
        ]
        try:
            await self._consume()
        finally:
            for task in self._tasks:
                task.cancel()
            for mailbox in self.mailboxes.values():
                if mailbox.task:
                    mailbox.task.cancel()
            await self.callbacks.close()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        return {"shard": self.index, "conversations": len(self.mailboxes),
                "inflight": len(self.inflight), "processed": self.processed}

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):
            await self.redis.xgroup_create(self.inbox, INBOX_GROUP, id="0", mkstream=True)

    async def _resume_active(self) -> None:
        """Load every unfinished job of this shard so its sessions are watched again."""
        members = await self.redis.smembers(active_key(self.keys, self.index))
        for member in members:
            tenant, _, job_id = str(member).partition("|")
            try:
                job = await self.store.load(tenant, job_id)
            except NotFound:
                await self.redis.srem(active_key(self.keys, self.index), member)
                continue
            mailbox = self._mailbox(tenant, job.meta.conversation_id)
            mailbox.orchestrator.jobs[job_id] = job
        if members:
            log.info("shard %s resumed %d active jobs", self.index, len(members))

    async def _consume(self) -> None:
        # First our own pending entries (delivered before a crash, never acknowledged).
        cursor = "0"
        max_buffer = 2_000
        last_pending_scan = self.clock()
        while not self._stop.is_set():
            if len(self.inflight) >= max_buffer:
                await asyncio.sleep(0.005)
                continue
            try:
                reply: Any = await self.redis.xreadgroup(
                    INBOX_GROUP, self.consumer, {self.inbox: cursor},
                    count=256, block=None if cursor == "0" else 200,
                )
            except (ConnectionError, OSError, CpaError) as exc:
                log.warning("shard %s: inbox read failed: %s", self.index, exc)
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # redis errors (NOGROUP after a flush, connection)
                if "NOGROUP" in str(exc):
                    await self._ensure_group()
                else:
                    log.warning("shard %s: inbox read failed: %s", self.index, exc)
                    await asyncio.sleep(0.5)
                continue
            entries: list[tuple[str, dict[str, str]]] = reply[0][1] if reply else []
            if cursor != ">":
                # Our pending entries, page by page: continue after the last one seen.
                for entry_id, fields in entries:
                    if fields:  # an entry deleted meanwhile comes back without fields
                        self._route(entry_id, fields)
                    else:
                        await self.redis.xack(self.inbox, INBOX_GROUP, entry_id)
                cursor = entries[-1][0] if len(entries) == 256 else ">"
                continue
            for entry_id, fields in entries:
                self._route(entry_id, fields)
            # Entries whose commit failed stay pending: pick them up again now and then.
            if self.clock() - last_pending_scan > 5.0:
                last_pending_scan = self.clock()
                cursor = "0"

    def _route(self, entry_id: str, fields: dict[str, str]) -> None:
        if entry_id in self.inflight:
            return
        tenant = fields.get("t", "")
        conv = fields.get("c", "")
        self.inflight.add(entry_id)
        mailbox = self._mailbox(tenant, conv)
        mailbox.queue.put_nowait((entry_id, fields))
        if mailbox.task is None or mailbox.task.done():
            mailbox.task = asyncio.create_task(self._drain(mailbox))

    def _mailbox(self, tenant: str, conv: str) -> _Mailbox:
        key = (tenant, conv)
        mailbox = self.mailboxes.get(key)
        if mailbox is None:
            orch = Orchestrator(tenant, conv, policy=self.policy, clock=self.clock, rng=self.rng,
                                inform=self.settings.runtime.inform)
            mailbox = _Mailbox(orchestrator=orch)
            self.mailboxes[key] = mailbox
        return mailbox

    async def _drain(self, mailbox: _Mailbox) -> None:
        """Process one conversation's entries strictly one after another."""
        while not mailbox.queue.empty():
            entry_id, fields = mailbox.queue.get_nowait()
            try:
                await self._process(mailbox.orchestrator, entry_id, fields)
                self.processed += 1
            except Exception as exc:
                # State in memory may be ahead of Redis now: forget it, reload on redelivery.
                log.warning("shard %s: entry %s failed (%s: %s); will be redelivered",
                            self.index, entry_id, type(exc).__name__, exc)
                mailbox.orchestrator.jobs.clear()
                mailbox.orchestrator.protocol = lam.Conversation(
                    mailbox.orchestrator.conversation_id)
                mailbox.orchestrator.protocol_loaded = False
                await asyncio.sleep(0.2)
            finally:
                self.inflight.discard(entry_id)
            mailbox.orchestrator.last_active = self.clock()

    # ------------------------------------------------------------------- processing

    async def _job(self, orch: Orchestrator, tenant: str, job_id: str) -> Job | None:
        job = orch.jobs.get(job_id)
        if job is not None:
            return job
        try:
            job = await self.store.load(tenant, job_id)
        except NotFound:
            return None
        orch.jobs[job_id] = job
        return job

    async def _load_protocol(self, orch: Orchestrator) -> None:
        if orch.protocol_loaded:
            return
        fields = await self.redis.hgetall(
            self.keys.conversation(orch.tenant, orch.conversation_id))
        orch.protocol = lam.Conversation.from_fields(orch.conversation_id, fields)
        orch.protocol_loaded = True

    async def _process(self, orch: Orchestrator, entry_id: str, fields: dict[str, str]) -> None:
        kind = fields.get("k", "")
        tenant = fields.get("t", "")
        job_id = fields.get("j", "")
        if fields.get("n") == "1" and not orch.protocol.messages and not orch.protocol_loaded:
            orch.protocol_loaded = True  # a conversation the ingress just created
        await self._load_protocol(orch)
        fx = Effects()
        job: Job | None = None
        if kind in ("submit", "result", "cancel", "retry", "started", "session_lost"):
            job = await self._job(orch, tenant, job_id)
            if job is None:
                await self._ack_only(entry_id, f"{kind} for unknown job {job_id}")
                return
            if kind == "submit":
                fx = orch.start(job)
            elif kind == "result":
                fx = orch.on_result(job, _decode_result(job_id, fields))
            elif kind == "started":
                data = json.loads(fields.get("d", "{}"))
                fx = orch.on_started(job, int(data["step"]), int(data["attempt"]),
                                     str(data.get("replica", "")), float(data["ts"]))
            elif kind == "session_lost":
                session, replica = fields.get("s", ""), fields.get("r", "")
                self._lost_reported.discard((job_id, session, replica))
                if job.sessions.get(session) == replica:
                    fx = orch.session_lost(job, session, f"replica {replica} is gone")
            elif kind == "cancel":
                fx = orch.cancel(job, fields.get("reason") or "cancelled by request")
            else:
                try:
                    fx = orch.retry(job)
                except CpaError as exc:
                    fx.journal.append({"event": "retry_refused", "job": job_id,
                                       "why": exc.message})
        elif kind == "lam":
            fx = self._on_lam(orch, fields)
        else:
            fx.journal.append({"event": "unknown_entry", "kind": kind})
        await self._commit(orch, job, fx, ack=entry_id)

    def _on_lam(self, orch: Orchestrator, fields: dict[str, str]) -> Effects:
        """A LAM message that starts no job: record it (protocol), answer refusals."""
        fx = Effects()
        msg = lam.validate(json.loads(fields["d"]))
        try:
            orch.protocol.accept(msg)
        except CpaError as exc:
            fx.journal.append({"event": "protocol_violation", "message": str(msg.id),
                               "why": exc.message})
            return fx
        fx.journal.append({"event": "lam", "type": msg.type, "message": str(msg.id)})
        reason = fields.get("refuse")
        if reason and isinstance(msg, lam.Request):
            refusal = lam.reply(msg, "refuse", payload={"reason": reason})
            orch.protocol.accept(refusal)
            fx.replies.append(refusal)
        return fx

    async def _ack_only(self, entry_id: str, why: str) -> None:
        log.info("shard %s: dropping entry %s: %s", self.index, entry_id, why)
        await self.redis.xack(self.inbox, INBOX_GROUP, entry_id)

    async def _commit(self, orch: Orchestrator, job: Job | None, fx: Effects,
                      ack: str | None) -> None:
        """Write everything one event changed, atomically (with its acknowledgement), via
        the group committer; then hand replies to the callback sender."""
        wires = [msg.wire() for msg in fx.replies]
        changed_protocol = orch.protocol.take_dirty()

        def fill(pipe: WriteBatch) -> None:
            self._fill(pipe, orch, job, fx, ack, wires, changed_protocol)

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_commits.append((fill, future))
        self._commit_wanted.set()
        await future
        self._after_commit(orch, job, fx, wires)

    async def _commit_loop(self) -> None:
        """Group commit: every commit that queued up while the previous round trip ran goes
        out in ONE script call (atomic per event, and for the whole group)."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            batch, self._pending_commits = self._pending_commits, []
            if not batch:
                continue
            writes = WriteBatch()
            for fill, _ in batch:
                fill(writes)
            try:
                await writes.execute(self.redis, self._apply_sha)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _fill(self, pipe: WriteBatch, orch: Orchestrator, job: Job | None, fx: Effects,
              ack: str | None, wires: list[dict[str, Any]], changed: dict[str, str]) -> None:
        keys = self.keys
        if job is not None:
            job_key = keys.job(job.tenant, job.job_id)
            values = job_to_fields(job, fx.changed_steps, job_changed=fx.job_changed)
            if values:
                pipe.hset(job_key, mapping=values)
            if fx.status_from is not None and fx.status_from is not job.status:
                pipe.zrem(keys.jobs_by_status(job.tenant, fx.status_from.value), job.job_id)
                pipe.zadd(keys.jobs_by_status(job.tenant, job.status.value),
                          {job.job_id: job.meta.created_at})
            member = f"{job.tenant}|{job.job_id}"
            if job.status.terminal:
                pipe.srem(active_key(keys, self.index), member)
                if fx.status_from is not None:  # finished now: keep it for the retention
                    pipe.expire(job_key, self.settings.queue.job_retention_s)
            elif fx.status_from is not None:
                pipe.sadd(active_key(keys, self.index), member)
                pipe.persist(job_key)  # a retried job is live again
        maxlen = self.settings.queue.stream_maxlen
        for d in fx.dispatches:
            stream, entry = _stream_entry(keys, d)
            if d.due is not None:
                pipe.zadd(keys.shard_delayed(self.index), {delayed_member(stream, entry): d.due})
            else:
                pipe.xadd(stream, entry, maxlen=maxlen, approximate=True)
        for d, reason in fx.dead_letters:
            stream, entry = _stream_entry(keys, d)
            pipe.xadd(keys.dlq(), dead_letter_fields(
                stream, "", entry, reason, int(d.payload["attempt"]), self.clock()),
                maxlen=maxlen, approximate=True)
        if fx.replies:
            outbox = keys.outbox(orch.tenant, orch.conversation_id)
            for wire in wires:
                pipe.xadd(outbox, {"m": json.dumps(wire, separators=(",", ":"))},
                          maxlen=OUTBOX_MAXLEN, approximate=True)
        if changed:
            pipe.hset(keys.conversation(orch.tenant, orch.conversation_id),
                      mapping=changed)
        if fx.journal:
            # One journal entry per processed event (it may hold several changes).
            pipe.xadd(journal_key(keys, orch.tenant, orch.conversation_id),
                      {"e": json.dumps(fx.journal, default=str, separators=(",", ":"))},
                      maxlen=JOURNAL_MAXLEN, approximate=True)
        if job is not None and (fx.events or wires):
            # Live updates ride in the same round trip; a PUBLISH inside the script reaches
            # subscribers after the script (and its AOF write) completed, i.e. only once the
            # state it reports is durable. Replies first: the job's
            # terminal event (last) closes WebSocket streams.
            updates = [{"job_id": job.job_id, "lam": w} for w in wires] + fx.events
            pipe.publish(keys.events_channel(job.tenant, job.job_id),
                         json.dumps(updates, default=str, separators=(",", ":")))
        if job is not None and fx.cancel_running:
            pipe.publish(cancel_channel(keys), json.dumps(
                {"job": job.job_id, "steps": fx.cancel_running}))
        if ack is not None:
            pipe.xack(self.inbox, INBOX_GROUP, ack)

    def _after_commit(self, orch: Orchestrator, job: Job | None, fx: Effects,
                      wires: list[dict[str, Any]]) -> None:
        if job is not None and job.meta.callback_url:
            for wire in wires:
                self.callbacks.post(job.meta.callback_url, wire)
        if job is not None and job.status.terminal:
            orch.jobs.pop(job.job_id, None)

    # ----------------------------------------------------------------------- timers

    async def _timers(self) -> None:
        zset = self.keys.shard_delayed(self.index)
        last_watch = 0.0
        while not self._stop.is_set():
            try:
                await self.queue.move_due(zset, limit=500)
                now = self.clock()
                if now - last_watch >= 1.0:
                    last_watch = now
                    await self._watch_sessions()
                    self._passivate(now)
            except Exception as exc:
                log.warning("shard %s timers: %s", self.index, exc)
            await asyncio.sleep(0.05)

    async def _watch_sessions(self) -> None:
        """Restart sessions whose owning replica stopped heartbeating (D8)."""
        for mailbox in list(self.mailboxes.values()):
            orch = mailbox.orchestrator
            for job in list(orch.jobs.values()):
                if job.status is not JobStatus.RUNNING or not job.sessions:
                    continue
                owners = set(job.sessions.values())
                alive = []
                for replica in owners:
                    cap = next((job.graph.capabilities[i] for i, s in
                                enumerate(job.graph.sessions) if s is not None and
                                job.sessions.get(s) == replica), None)
                    if cap and await self.redis.exists(self.keys.replica_alive(cap, replica)):
                        alive.append(replica)
                for session in restartable_sessions(job, alive):
                    replica = job.sessions[session]
                    marker = (job.job_id, session, replica)
                    if marker in self._lost_reported:
                        continue
                    # Goes through the inbox so it is ordered with the job's other events.
                    self._lost_reported.add(marker)
                    await self.redis.xadd(self.inbox, {
                        "k": "session_lost", "t": job.tenant, "c": job.meta.conversation_id,
                        "j": job.job_id, "s": session, "r": replica,
                    })

    def _passivate(self, now: float) -> None:
        idle_s = self.settings.runtime.passivate_after_s
        for key, mailbox in list(self.mailboxes.items()):
            orch = mailbox.orchestrator
            busy = mailbox.task is not None and not mailbox.task.done()
            if busy or not mailbox.queue.empty() or now - orch.last_active < idle_s:
                continue
            if any(not j.status.terminal for j in orch.jobs.values()):
                continue  # running jobs stay resident (their sessions are watched)
            del self.mailboxes[key]


def _stream_entry(keys: Keys, d: Dispatch) -> tuple[str, dict[str, str]]:
    """The task stream and entry fields of a dispatch."""
    stream = (keys.replica_stream(d.capability, d.replica) if d.replica
              else keys.task_stream(d.capability, d.priority))
    entry = {"d": json.dumps(d.payload, separators=(",", ":"), ensure_ascii=False),
             "job": d.job_id, "step": str(d.step), "tenant": str(d.payload["tenant"])}
    return stream, entry


def _decode_result(job_id: str, fields: dict[str, str]) -> StepResult:
    data = json.loads(fields.get("d", "{}"))
    return StepResult(
        job_id=job_id, step=int(data["step"]), attempt=int(data["attempt"]),
        ok=bool(data["ok"]), output=data.get("output"), error=data.get("error"),
        error_kind=data.get("error_kind"), retryable=bool(data.get("retryable", True)),
        replica=data.get("replica"), started_at=data.get("started_at"),
        finished_at=data.get("finished_at"),
    )
