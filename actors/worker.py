"""The pull loop of one executor-pool replica (DESIGN.md D2, D3, D5, D8).

Leases steps from its capability's streams (its own stream first: session-affine steps),
runs up to ``workers`` at once, renews each lease by heartbeat while the step runs (so a slow
step is never run twice at once), and commits the result to the job's shard inbox with a
fenced write (a result of a lease that was reclaimed meanwhile is dropped). Reclaims entries
of dead consumers after the visibility timeout; poison entries go to the dead-letter queue and
their job is told. Plain asyncio: ``actors.pools`` runs it inside a Ray Serve replica, and a
thin agent process (Windows hosts) can run it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from actors.errors import StepError
from actors.executors.base import Executor, StepInput, StepOutcome
from actors.graph import default_registry
from actors.keys import Keys
from actors.queue import JOB_OVER, DeadEntry, Lease, TaskQueue
from actors.redisconn import connect
from actors.settings import Settings
from actors.shard import cancel_channel

log = logging.getLogger("cpa.worker")

PUBLISH_DELAY_S = 0.005
"""How long a live "running" update may wait to ride along with a result commit, s."""


class PoolWorker:
    """Runs steps of one capability for one replica."""

    def __init__(self, capability: str, executor: Executor, settings: Settings, *,
                 replica_id: str, workers: int = 8,
                 redis: aioredis.Redis | None = None) -> None:
        self.capability = capability
        self.executor = executor
        self.settings = settings
        self.replica_id = replica_id
        self.workers = max(1, workers)
        self.keys = Keys(settings.redis.key_prefix)
        self.redis = redis or connect(settings.redis)
        self.queue = TaskQueue(self.redis, self.keys, settings.queue)
        self.own_stream = self.keys.replica_stream(capability, replica_id)
        self.consumer = replica_id
        self.side_effects = {n for n in default_registry().names()
                             if default_registry().get(n).side_effect}
        self.running: dict[str, tuple[Lease, asyncio.Task[None]]] = {}
        self.completed = 0
        self.failed = 0
        self.lost_leases = 0
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        # Results and live updates wait here for the flusher, which writes everything that
        # accumulated in one pipelined round trip (group commit).
        self._commits: list[tuple[Lease, str, dict[str, str], asyncio.Future[bool]]] = []
        self._publish: list[tuple[str, str]] = []
        self._flush_wanted = asyncio.Event()
        self._publish_timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.started = False
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Pull and run steps until :meth:`shutdown`."""
        await self.executor.start(self.replica_id)
        self.started = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="flush")
        self._background = [
            asyncio.create_task(self._alive_loop(), name="alive"),
            asyncio.create_task(self._cancel_listener(), name="cancel"),
        ]
        try:
            await self._pull_loop()
        finally:
            for task in self._background:
                task.cancel()
            if not self._stopping.is_set() and self._flusher is not None:
                self._flusher.cancel()  # not a graceful shutdown: nothing left to flush

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop leasing; let running steps finish for ``grace_s``; give the rest back."""
        self._stopping.set()
        tasks = [task for _, task in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for entry_id, (lease, task) in list(self.running.items()):
            task.cancel()
            with contextlib.suppress(Exception):
                await self.queue.release(lease)
            self.running.pop(entry_id, None)
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.replica_alive(self.capability, self.replica_id))
        with contextlib.suppress(Exception):
            await self.executor.close()

    def status(self) -> dict[str, Any]:
        return {"capability": self.capability, "replica": self.replica_id,
                "running": len(self.running), "completed": self.completed,
                "failed": self.failed, "lost_leases": self.lost_leases,
                "workers": self.workers, "last_error": self.last_error}

    # ------------------------------------------------------------------- loops

    async def _pull_loop(self) -> None:
        interval = self.settings.queue.reclaim_interval_s
        next_reclaim = time.monotonic() + interval
        while not self._stopping.is_set():
            free = self.workers - len(self.running)
            if free <= 0:
                await asyncio.sleep(0.002)
                continue
            now = time.monotonic()
            if now >= next_reclaim:
                # Reclaim before reading new entries, with the slots free now: a step lost
                # with a dead consumer has waited a visibility timeout already and must not
                # also wait behind the whole backlog. A due reclaim stays due until a slot
                # frees, so it gets the first one.
                next_reclaim = now + interval
                free -= await self._reclaim(free)
                if free <= 0:
                    continue
            block_ms = max(1, min(500, int((next_reclaim - time.monotonic()) * 1000)))
            try:
                leases = await self.queue.read(self.capability, self.consumer,
                                               own_stream=self.own_stream, count=free,
                                               block_ms=block_ms)
            except Exception as exc:
                self.last_error = f"read: {exc}"
                log.warning("%s: read failed: %s", self.replica_id, exc)
                await asyncio.sleep(0.5)
                continue
            self._start(leases)

    def _start(self, leases: list[Lease]) -> None:
        for lease in leases:
            if self._stopping.is_set():
                break
            task = asyncio.create_task(self._run_lease(lease))
            self.running[lease.entry_id] = (lease, task)

    async def _alive_loop(self) -> None:
        key = self.keys.replica_alive(self.capability, self.replica_id)
        ttl = max(1, int(self.settings.queue.visibility_timeout_s))
        while True:
            with contextlib.suppress(Exception):
                await self.redis.set(key, str(time.time()), ex=ttl)
            await asyncio.sleep(min(self.settings.queue.heartbeat_interval_s, ttl / 3))

    async def _reclaim(self, free: int) -> int:
        """Take over up to ``free`` expired leases (of dead or stuck consumers) from the
        capability's shared streams and start them; entries delivered too often go to the
        DLQ instead and their jobs are told. Returns how many leases were started."""
        taken = 0
        for stream in self.keys.task_streams(self.capability):
            if taken >= free or self._stopping.is_set():
                break
            try:
                leases, dead = await self.queue.reclaim(stream, self.consumer,
                                                        count=free - taken)
            except Exception as exc:
                self.last_error = f"reclaim: {exc}"
                continue
            for entry in dead:
                await self._report_dead(entry)
            self._start(leases)
            taken += len(leases)
        return taken

    async def _cancel_listener(self) -> None:
        while True:  # a Redis outage ends a subscription: subscribe again once it is back
            try:
                await self._listen_for_cancels()
            except Exception as exc:
                self.last_error = f"cancel listener: {exc}"
                log.warning("%s: cancel listener failed: %s", self.replica_id, exc)
                await asyncio.sleep(0.5)

    async def _listen_for_cancels(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(cancel_channel(self.keys))
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if not msg:
                    continue
                data = json.loads(msg["data"])
                steps = set(data.get("steps", []))
                for lease, task in list(self.running.values()):
                    payload = lease.payload()
                    if payload.get("job") == data.get("job") and payload.get("step") in steps:
                        task.cancel()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -------------------------------------------------------------------- one step

    async def _run_lease(self, lease: Lease) -> None:
        try:
            payload = lease.payload()
            step = StepInput(
                job_id=payload["job"], tenant=payload["tenant"], step=payload["step"],
                attempt=payload["attempt"], todo=payload["todo"],
                timeout_s=payload["timeout_s"], capability=payload.get("cap", self.capability),
                session=payload.get("session"),
            )
        except Exception as exc:
            await self.queue.dead_letter_lease(lease, f"undecodable step entry: {exc}")
            self.running.pop(lease.entry_id, None)
            return
        started = time.time()
        outcome: StepOutcome
        start_by = payload.get("start_by")
        if isinstance(start_by, int | float) and started > start_by:
            # Its dispatch deadline passed while it waited (backlog, or a consumer that died
            # holding it): not run. The shard may have given up on this attempt already; if
            # not, the retry policy decides (a fresh attempt with a fresh deadline).
            heartbeat = None
            outcome = StepOutcome.failure(
                f"not started: no executor started step {step.step} ({step.capability}) "
                f"within its dispatch deadline (missed by {started - start_by:.1f} s)",
                kind="expired")
        else:
            heartbeat = asyncio.create_task(self._heartbeat(
                lease, self.keys.job(step.tenant, step.job_id)))
            try:
                self._publish_running(step, started)
                outcome = await self._execute(step, lease)
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    heartbeat.cancel()
                    raise  # shutdown: the lease is released by shutdown()
                outcome = StepOutcome.failure("cancelled", kind="cancelled", retryable=False)
            finally:
                heartbeat.cancel()
        finished = time.time()
        try:
            if heartbeat is not None and heartbeat.done() and not heartbeat.cancelled() and \
                    heartbeat.result() is False:
                self.lost_leases += 1
                return  # our lease was reclaimed: someone else owns this attempt now
            result = {
                "step": step.step, "attempt": step.attempt, "ok": outcome.ok,
                "output": outcome.output, "error": outcome.error,
                "error_kind": outcome.error_kind, "retryable": outcome.retryable,
                "replica": self.replica_id, "finished_at": finished,
                "started_at": None if heartbeat is None else started,  # None: never ran
            }
            fields = {"k": "result", "t": step.tenant, "c": payload["conv"], "j": step.job_id,
                      "d": json.dumps(result, separators=(",", ":"), default=str)}
            inbox = self.keys.shard_inbox(int(payload["shard"]))
            committed = await self._commit(lease, inbox, fields)
            if not committed:
                self.lost_leases += 1
            elif outcome.ok:
                self.completed += 1
            else:
                self.failed += 1
        except Exception as exc:
            # Not committed: the lease expires and the step is reclaimed (at least once).
            self.last_error = f"complete: {exc}"
            log.warning("%s: commit of %s failed: %s", self.replica_id, lease.entry_id, exc)
        finally:
            self.running.pop(lease.entry_id, None)

    async def _execute(self, step: StepInput, lease: Lease) -> StepOutcome:
        try:
            if (step.attempt > 1 or lease.deliveries > 1) and \
                    step.todo.action in self.side_effects and await self.executor.verify(step):
                # Verify-before-retry (D5): an earlier attempt already took effect.
                return StepOutcome.success({"verified": True})
            # asyncio.timeout, not wait_for: no extra task per step.
            async with asyncio.timeout(step.timeout_s):
                return await self.executor.execute(step)
        except TimeoutError:
            return StepOutcome.failure(f"step timed out after {step.timeout_s} s",
                                       kind="timeout")
        except StepError as exc:
            return StepOutcome.failure(exc.message, kind=exc.kind, retryable=exc.retryable)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return StepOutcome.failure(f"{type(exc).__name__}: {exc}", kind="crash")

    async def _commit(self, lease: Lease, inbox: str, fields: dict[str, str]) -> bool:
        """Queue a fenced commit for the flusher and wait for its outcome."""
        if self._flusher is None or self._flusher.done():
            return await self.queue.complete(lease, inbox, fields)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._commits.append((lease, inbox, fields, future))
        self._flush_wanted.set()
        return await asyncio.shield(future)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            commits, self._commits = self._commits, []
            publish, self._publish = self._publish, []
            if not commits and not publish:
                continue
            try:
                done = await self.queue.complete_many(
                    [(lease, inbox, fields) for lease, inbox, fields, _ in commits],
                    publish=publish)
            except Exception as exc:
                self.last_error = f"complete: {exc}"
                for *_, future in commits:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), ok in zip(commits, done, strict=True):
                if not future.done():
                    future.set_result(ok)

    async def _heartbeat(self, lease: Lease, job_key: str | None = None) -> bool:
        """Renew the lease until cancelled; return False as soon as it is lost. When the
        job has ended meanwhile (a cancel whose pub/sub signal this replica missed), stop
        the step and return True: its result still goes back, and is ignored."""
        interval = self.settings.queue.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                state = await self.queue.renew(lease, job_key)
            except Exception as exc:
                self.last_error = f"heartbeat: {exc}"
                continue
            if state in (0, JOB_OVER):
                entry = self.running.get(lease.entry_id)
                if entry is not None:
                    entry[1].cancel()  # lost: someone else runs it now; over: cancelled
                return state != 0

    def _publish_running(self, step: StepInput, started: float) -> None:
        """Live "running" update (best effort), sent with the next flush."""
        event = {"job_id": step.job_id, "step": step.step, "status": "running",
                 "attempt": step.attempt, "replica": self.replica_id, "ts": started}
        self._publish.append((self.keys.events_channel(step.tenant, step.job_id),
                              json.dumps(event)))
        # Not at once: a quick step's result is usually ready within this delay, and then
        # the update and the result share one round trip.
        if self._publish_timer is None:
            self._publish_timer = asyncio.get_running_loop().call_later(
                PUBLISH_DELAY_S, self._publish_due)

    def _publish_due(self) -> None:
        self._publish_timer = None
        if self._publish:
            self._flush_wanted.set()

    async def _report_dead(self, entry: DeadEntry) -> None:
        """Tell the job's orchestrator that a poison entry was dead-lettered."""
        try:
            payload = json.loads(entry.fields["d"])
            result = {"step": payload["step"], "attempt": payload["attempt"], "ok": False,
                      "error": entry.reason, "error_kind": "dead_lettered", "retryable": False,
                      "replica": self.replica_id, "finished_at": time.time()}
            await self.redis.xadd(self.keys.shard_inbox(int(payload["shard"])), {
                "k": "result", "t": payload["tenant"], "c": payload["conv"],
                "j": payload["job"], "d": json.dumps(result)})
        except Exception as exc:
            log.warning("%s: could not report dead entry %s: %s", self.replica_id,
                        entry.entry_id, exc)
