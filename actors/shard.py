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
import heapq
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors import lam
from actors.callbacks import CallbackSender
from actors.errors import CpaError, NotFound, OperatorError
from actors.jobs import Job, JobStatus, StepStatus
from actors.jobstore import INBOX_GROUP, JobStore, job_to_fields
from actors.keys import Keys
from actors.orchestrator import (
    Dispatch,
    Effects,
    Orchestrator,
    StepResult,
    restartable_sessions,
    start_by,
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


class Deadlines:
    """When each dispatched step attempt is given up as lost, in one-second buckets.

    ``arm`` and ``disarm`` are O(1) (plus a heap push when an arm opens a new second), so
    the hot path pays almost nothing per dispatch and per finished step, and memory holds
    only the attempts in flight; ``due`` pops whole buckets whose second has come (an
    attempt expires up to one second after its exact expiry, never before).
    """

    __slots__ = ("_buckets", "_order", "_slot")

    def __init__(self) -> None:
        # bucket second -> (job_id, step) -> (tenant, conversation, attempt)
        self._buckets: dict[int, dict[tuple[str, int], tuple[str, str, int]]] = {}
        self._order: list[int] = []  # heap of the bucket seconds
        self._slot: dict[tuple[str, int], int] = {}  # (job_id, step) -> its bucket second

    def __len__(self) -> int:
        return len(self._slot)

    def arm(self, expiry: float, tenant: str, conv: str, job_id: str, step: int,
            attempt: int) -> None:
        """Watch ``attempt`` of the step (replacing what was watched for the step)."""
        key = (job_id, step)
        self.disarm(job_id, step)
        second = math.ceil(expiry)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = {}
            heapq.heappush(self._order, second)
        bucket[key] = (tenant, conv, attempt)
        self._slot[key] = second

    def disarm(self, job_id: str, step: int) -> None:
        """Stop watching the step (it finished, or is no longer in flight)."""
        second = self._slot.pop((job_id, step), None)
        if second is not None:
            bucket = self._buckets.get(second)
            if bucket is not None:
                bucket.pop((job_id, step), None)

    def due(self, now: float) -> list[tuple[str, str, str, int, int]]:
        """Pop every watched attempt whose expiry has come:
        (tenant, conversation, job_id, step, attempt)."""
        out: list[tuple[str, str, str, int, int]] = []
        while self._order and self._order[0] <= now:
            second = heapq.heappop(self._order)
            for (job_id, step), (tenant, conv, attempt) in self._buckets.pop(second,
                                                                              {}).items():
                self._slot.pop((job_id, step), None)
                out.append((tenant, conv, job_id, step, attempt))
        return out


def _transient(exc: BaseException) -> bool:
    """A failure of the infrastructure (Redis unreachable, loading, out of memory), not of
    the entry: processing the entry again later may well succeed."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError
                  | OperatorError):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in (
        "OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN",
        "CLUSTERDOWN", "NOSCRIPT")


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
        self.deadlines = Deadlines()
        q = settings.queue
        # An attempt started just before its start_by may run for its timeout and hold its
        # lease a visibility timeout after a crash; then a reclaim pass must find it.
        self._expiry_extra_s = q.visibility_timeout_s + q.reclaim_interval_s + 1.0
        self._entry_failures: dict[str, int] = {}
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
            self._arm_in_flight(job)
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
                                inform=self.settings.runtime.inform,
                                dispatch_deadline_s=self.settings.queue.dispatch_deadline_s)
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
                if self._entry_failures:
                    self._entry_failures.pop(entry_id, None)
            except Exception as exc:
                # State in memory may be ahead of Redis now: forget it, reload on redelivery.
                mailbox.orchestrator.jobs.clear()
                mailbox.orchestrator.protocol = lam.Conversation(
                    mailbox.orchestrator.conversation_id)
                mailbox.orchestrator.protocol_loaded = False
                failures = self._entry_failures.get(entry_id, 0)
                if not _transient(exc):
                    failures = self._entry_failures[entry_id] = failures + 1
                limit = self.settings.queue.poison_max_deliveries
                if failures >= limit:
                    await self._poison(mailbox.orchestrator, entry_id, fields, exc, failures)
                else:
                    log.warning("shard %s: entry %s failed (%s: %s); will be redelivered",
                                self.index, entry_id, type(exc).__name__, exc)
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
        self._arm_in_flight(job)
        return job

    def _arm_in_flight(self, job: Job) -> None:
        """Watch the deadlines of a job's attempts in flight (a job loaded from Redis)."""
        if job.status.terminal:
            return
        for index, step in enumerate(job.steps):
            if step.status.in_flight:
                self._arm(job, index)

    def _arm(self, job: Job, index: int) -> None:
        step = job.steps[index]
        expiry = (start_by(step, self.settings.queue.dispatch_deadline_s)
                  + job.graph.timeouts_s[index] + self._expiry_extra_s)
        self.deadlines.arm(expiry, job.tenant, job.meta.conversation_id, job.job_id, index,
                           step.attempts)

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
        if kind in ("submit", "result", "cancel", "retry", "started", "session_lost",
                    "deadline"):
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
                    await self._drop_dead_replica_stream(job, session, replica)
            elif kind == "deadline":
                data = json.loads(fields.get("d", "{}"))
                fx = self._on_deadline(orch, job, int(data["step"]), int(data["attempt"]))
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

    def _on_deadline(self, orch: Orchestrator, job: Job, index: int, attempt: int) -> Effects:
        """A dispatched attempt's time is up (never started within the dispatch deadline, or
        started and then its executor vanished): it failed as ``lost``; the retry policy
        re-dispatches it or fails the job and dead-letters the step."""
        if not 0 <= index < len(job.steps) or job.status is not JobStatus.RUNNING:
            return Effects()
        step = job.steps[index]
        if step.attempts != attempt or not step.status.in_flight:
            return Effects()  # it finished or moved on meanwhile
        deadline_s = self.settings.queue.dispatch_deadline_s
        error = (f"no executor started step {index} of capability "
                 f"{job.graph.capabilities[index]} within {deadline_s:g} s (dispatch "
                 f"deadline), or the one that started it vanished without a result "
                 f"(attempt {attempt})")
        fx = orch.on_result(job, StepResult(
            job_id=job.job_id, step=index, attempt=attempt, ok=False, error=error,
            error_kind="lost", retryable=True, finished_at=self.clock()))
        fx.journal.insert(0, {"event": "dispatch_deadline", "job": job.job_id, "step": index,
                              "attempt": attempt})
        return fx

    async def _drop_dead_replica_stream(self, job: Job, session: str, replica: str) -> None:
        """The replica that owned ``session`` is gone for good (no liveness key): delete its
        own stream. What waits there are session steps of sessions that are restarted
        elsewhere (by this event, or by the same event of their own jobs); were the replica
        alive after all, a step deleted here is recovered by its dispatch deadline."""
        cap = next((job.graph.capabilities[i] for i, s in enumerate(job.graph.sessions)
                    if s == session), None)
        if cap is None or await self.redis.exists(self.keys.replica_alive(cap, replica)):
            return
        if await self.redis.unlink(self.keys.replica_stream(cap, replica)):
            log.info("shard %s: deleted the own stream of dead replica %s", self.index,
                     replica)

    async def _poison(self, orch: Orchestrator, entry_id: str, fields: dict[str, str],
                      exc: Exception, failures: int) -> None:
        """An inbox entry failed ``failures`` times: stop retrying it. It goes to the DLQ
        (with the reason; replayable once fixed) and is acknowledged in one transaction,
        then its job, if it can be loaded, is marked failed (best effort)."""
        kind, tenant, job_id = fields.get("k", ""), fields.get("t", ""), fields.get("j", "")
        reason = (f"inbox entry {entry_id} ({kind or 'no kind'}) failed {failures} times: "
                  f"{type(exc).__name__}: {exc}")[:1000]
        log.error("shard %s: %s; dead-lettered", self.index, reason)
        dead = dead_letter_fields(self.inbox, entry_id, fields, reason, failures, self.clock())
        dead["tenant"] = tenant  # inbox entries name it "t"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.keys.dlq(), dead,  # type: ignore[arg-type]
                          maxlen=self.settings.queue.stream_maxlen, approximate=True)
                pipe.xack(self.inbox, INBOX_GROUP, entry_id)
                await pipe.execute()
        except Exception as err:
            log.warning("shard %s: could not dead-letter entry %s (%s); will be redelivered",
                        self.index, entry_id, err)
            await asyncio.sleep(0.2)
            return
        self._entry_failures.pop(entry_id, None)
        if not job_id or kind == "lam":
            return
        try:
            job = await self.store.load(tenant, job_id)
            if job.status.terminal:
                return
            fx = Effects()
            for index, step in enumerate(job.steps):
                if step.status.in_flight:
                    fx.cancel_running.append(index)
                    step.status = StepStatus.FAILED
                    step.error, step.error_kind = reason, "poison"
                    step.finished_at = self.clock()
                elif not step.status.terminal:
                    step.status = StepStatus.SKIPPED
                else:
                    continue
                fx.changed_steps.add(index)
            fx.status_from = job.status
            job.status = JobStatus.FAILED
            job.error = reason
            job.updated_at = self.clock()
            fx.job_changed = True
            fx.events.append({"job_id": job_id, "status": job.status.value, "error": reason})
            fx.journal.append({"event": "failed", "job": job_id, "reason": reason})
            await self._commit(orch, job, fx, ack=None)
        except Exception as err:
            log.warning("shard %s: could not mark job %s failed after a poison entry: %s",
                        self.index, job_id, err)

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
        # A conversation's keys live `conversation_retention_s` after its last event (every
        # /schedule without a conversation id opens one: without a TTL they would pile up).
        keep = self.settings.queue.conversation_retention_s
        if fx.replies:
            outbox = keys.outbox(orch.tenant, orch.conversation_id)
            for wire in wires:
                pipe.xadd(outbox, {"m": json.dumps(wire, separators=(",", ":"))},
                          maxlen=OUTBOX_MAXLEN, approximate=True)
            pipe.expire(outbox, keep)
        if changed:
            conversation = keys.conversation(orch.tenant, orch.conversation_id)
            pipe.hset(conversation, mapping=changed)
            pipe.expire(conversation, keep)
        if fx.journal:
            # One journal entry per processed event (it may hold several changes).
            journal = journal_key(keys, orch.tenant, orch.conversation_id)
            pipe.xadd(journal, {"e": json.dumps(fx.journal, default=str,
                                                separators=(",", ":"))},
                      maxlen=JOURNAL_MAXLEN, approximate=True)
            pipe.expire(journal, keep)
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
            # Processed: acknowledge and delete, so the inbox holds only work still to do
            # (the journal keeps the history) and Redis memory stays bounded by the backlog.
            pipe.xack(self.inbox, INBOX_GROUP, ack)
            pipe.xdel(self.inbox, ack)

    def _after_commit(self, orch: Orchestrator, job: Job | None, fx: Effects,
                      wires: list[dict[str, Any]]) -> None:
        if job is None:
            return
        if job.meta.callback_url:
            for wire in wires:
                self.callbacks.post(job.meta.callback_url, wire)
        # Deadlines: only attempts durably dispatched (committed now) are watched.
        steps = job.steps
        if job.status.terminal:
            orch.jobs.pop(job.job_id, None)
            for index in range(len(steps)):
                self.deadlines.disarm(job.job_id, index)
            return
        for index in fx.changed_steps:
            if not steps[index].status.in_flight:
                self.deadlines.disarm(job.job_id, index)
        for d in fx.dispatches:
            self._arm(job, d.step)

    # ----------------------------------------------------------------------- timers

    async def _timers(self) -> None:
        zset = self.keys.shard_delayed(self.index)
        last_watch = 0.0
        while not self._stop.is_set():
            try:
                await self.queue.move_due(zset, limit=500)
                now = self.clock()
                if self.deadlines:
                    await self._expire_due(now)
                if now - last_watch >= 1.0:
                    last_watch = now
                    await self._watch_sessions()
                    self._passivate(now)
            except Exception as exc:
                log.warning("shard %s timers: %s", self.index, exc)
            await asyncio.sleep(0.05)

    async def _expire_due(self, now: float) -> None:
        """Attempts whose time is up and still in flight: a ``deadline`` event each, through
        the inbox so it is ordered with the job's other events (one round trip for all)."""
        events = []
        for tenant, conv, job_id, index, attempt in self.deadlines.due(now):
            mailbox = self.mailboxes.get((tenant, conv))
            job = mailbox.orchestrator.jobs.get(job_id) if mailbox else None
            if job is None or job.status is not JobStatus.RUNNING:
                continue  # finished (or to be reloaded, which watches it again)
            step = job.steps[index]
            if step.attempts == attempt and step.status.in_flight:
                events.append((job, index, attempt))
        if not events:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job, index, attempt in events:
                    pipe.xadd(self.inbox, {
                        "k": "deadline", "t": job.tenant, "c": job.meta.conversation_id,
                        "j": job.job_id,
                        "d": json.dumps({"step": index, "attempt": attempt}),
                    })
                await pipe.execute()
        except Exception:
            for job, index, attempt in events:  # try again in a second
                self.deadlines.arm(now + 1.0, job.tenant, job.meta.conversation_id,
                                   job.job_id, index, attempt)
            raise

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
