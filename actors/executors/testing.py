"""Executors for tests of the runtime itself (session affinity, effect ledgers)."""

from __future__ import annotations

import asyncio
import os

from actors.errors import NonRetryableStepError
from actors.executors.base import Executor, StepInput, StepOutcome


class SessionProbe(Executor):
    """A stateful executor: the first step of a session creates in-memory state on this
    replica; a later step of the same session fails (non-retryable) if its state is not here,
    i.e. if it landed on another replica. ``params.ms`` makes a step take that long."""

    capability = "browser"

    def __init__(self) -> None:
        self.sessions: dict[str, list[int]] = {}
        self.replica_id = ""

    async def start(self, replica_id: str) -> None:
        self.replica_id = replica_id

    async def execute(self, step: StepInput) -> StepOutcome:
        if step.session is None:
            raise NonRetryableStepError("SessionProbe needs a session")
        ms = float(step.todo.params.get("ms", 0))
        if ms:
            await asyncio.sleep(ms / 1000)
        first = bool(step.todo.params.get("first", False))
        if first:
            self.sessions[step.session] = [step.step]
        elif step.session not in self.sessions:
            raise NonRetryableStepError(
                f"session {step.session} has no state on replica {self.replica_id}: step "
                f"{step.step} ran on another replica than the session's first step",
                kind="affinity_violation",
            )
        else:
            self.sessions[step.session].append(step.step)
        return StepOutcome.success({"replica": self.replica_id, "pid": os.getpid(),
                                    "session_steps": list(self.sessions[step.session])})

    async def close_session(self, session: str) -> None:
        self.sessions.pop(session, None)


class LedgerExecutor(Executor):
    """Records every execution in a Redis list (an effect ledger for fault tests):
    ``params.ledger`` names the list, ``params.ms`` makes the step take that long. The entry
    is written after the wait, i.e. it is the step's effect. ``params.fail_attempts`` = n
    makes attempts 1..n fail retryably (recorded as ``job:step:attempt:failed``, no effect)."""

    capability = "noop"

    def __init__(self, redis_url: str = "redis://127.0.0.1:6379/0") -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(redis_url, decode_responses=True)
        self.replica_id = ""

    async def start(self, replica_id: str) -> None:
        self.replica_id = replica_id

    async def execute(self, step: StepInput) -> StepOutcome:
        ms = float(step.todo.params.get("ms", 0))
        if ms:
            await asyncio.sleep(ms / 1000)
        ledger = step.todo.params.get("ledger")
        if step.todo.params.get("crash_always") and isinstance(ledger, str):
            await self.redis.rpush(ledger, f"{step.job_id}:{step.step}:crash")
            os._exit(137)  # a poison step: takes its executor down every time
        if isinstance(ledger, str) and step.attempt <= int(step.todo.params.get(
                "fail_attempts", 0)):
            await self.redis.rpush(ledger, f"{step.job_id}:{step.step}:{step.attempt}:failed")
            return StepOutcome.failure(f"injected failure of attempt {step.attempt}")
        if isinstance(ledger, str) and ledger:
            await self.redis.rpush(ledger, f"{step.job_id}:{step.step}:{step.attempt}:"
                                           f"{self.replica_id}:{os.getpid()}")
            await self.redis.sadd(f"{ledger}:keys", step.idempotency_key)
            # Fault injection: die like kill -9 right after the effect, before the ack —
            # once per step (the marker survives the crash).
            if step.todo.params.get("crash_after_effect") and await self.redis.set(
                    f"{ledger}:crashed:{step.idempotency_key}", "1", nx=True):
                os._exit(137)
        return StepOutcome.success({"replica": self.replica_id, "pid": os.getpid()})

    async def close(self) -> None:
        await self.redis.aclose()

    async def verify(self, step: StepInput) -> bool:
        """Verify-before-retry: the ledger already holds this step's effect."""
        ledger = step.todo.params.get("ledger")
        if not isinstance(ledger, str) or not ledger:
            return False
        return bool(await self.redis.sismember(f"{ledger}:keys", step.idempotency_key))
