"""Placeholder for a capability whose real executor is not part of this release.

It does not pretend: every step fails at once, non-retryably, with a message that names the
capability — so a plan that needs it fails clearly instead of hanging in a queue.
"""

from __future__ import annotations

from actors.errors import NonRetryableStepError
from actors.executors.base import Executor, StepInput, StepOutcome


class Unavailable(Executor):
    """Refuses every step of its capability."""

    def __init__(self, capability: str = "unknown", reason: str | None = None) -> None:
        self.capability = capability
        self.reason = reason or "its executor is not installed in this deployment"

    async def execute(self, step: StepInput) -> StepOutcome:
        raise NonRetryableStepError(
            f"capability {step.capability!r} cannot run {step.todo.action!r}: {self.reason}",
            kind="capability_unavailable",
        )
