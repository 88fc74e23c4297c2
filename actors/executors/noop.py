"""The ``noop`` capability: ``noop`` and ``sleep`` steps, for tests, load tests and joins."""

from __future__ import annotations

import asyncio

from actors.errors import NonRetryableStepError
from actors.executors.base import Executor, StepInput, StepOutcome


class NoopExecutor(Executor):
    """``noop`` returns at once; ``sleep`` waits ``params.ms`` (or ``text``) milliseconds.
    ``params.fail`` (a string) makes the step fail with that message — for fault tests;
    ``params.fail_kind`` = ``non_retryable`` makes the failure permanent."""

    capability = "noop"

    async def execute(self, step: StepInput) -> StepOutcome:
        todo = step.todo
        fail = todo.params.get("fail")
        if isinstance(fail, str) and fail:
            kind = str(todo.params.get("fail_kind", "error"))
            if kind == "non_retryable":
                raise NonRetryableStepError(fail)
            return StepOutcome.failure(fail, kind=kind)
        if todo.action == "sleep":
            raw = todo.params.get("ms", todo.text or 0)
            try:
                ms = float(raw)
            except (TypeError, ValueError) as exc:
                raise NonRetryableStepError(
                    f"sleep: got {raw!r} for params.ms; must be a number of milliseconds"
                ) from exc
            await asyncio.sleep(max(0.0, ms) / 1000)
            return StepOutcome.success({"slept_ms": ms})
        return StepOutcome.success(None)
