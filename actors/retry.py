"""When and how long to wait before a failed step is tried again.

Exponential backoff with jitter (D2): the n-th failure waits ``base * 2**(n-1)`` seconds,
capped at ``backoff_max_s``, moved up or down by a random share of at most ``jitter`` so
retries of many steps that failed together do not return together. The delay is spent in a
delayed-retry sorted set (:meth:`actors.queue.TaskQueue.schedule`), never as a held lease.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from actors.errors import ValidationFailed
from actors.settings import QueueSettings


class RetryPolicy(BaseModel):
    """How often and how late a failed step is retried."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    max_attempts: int = Field(3, ge=1, le=100)
    """Attempts in all, the first one included (1 = never retry), count."""

    backoff_base_s: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Delay after the first failure, before jitter, seconds."""

    backoff_max_s: float = Field(300.0, ge=0, allow_inf_nan=False)
    """Largest delay, jitter included, seconds."""

    jitter: float = Field(0.2, ge=0, le=1, allow_inf_nan=False)
    """Share of the delay added or subtracted at random (0 = exact, 1 = anywhere from 0 to
    twice the nominal delay), 0..1."""

    non_retryable_kinds: frozenset[str] = frozenset()
    """Failure kinds (``StepError.kind``) that are never retried, whatever ``retryable``
    says (e.g. ``policy_denied``, ``bad_selector``)."""

    @classmethod
    def from_settings(cls, settings: QueueSettings) -> RetryPolicy:
        """The default policy configured in ``queue`` settings."""
        return cls(
            max_attempts=settings.max_attempts,
            backoff_base_s=settings.backoff_base_s,
            backoff_max_s=settings.backoff_max_s,
            jitter=settings.backoff_jitter,
        )

    def nominal_s(self, attempt: int) -> float:
        """Delay after failed attempt ``attempt`` (1-based) before jitter, capped."""
        _check_attempt(attempt)
        cap = self.backoff_max_s
        delay = min(self.backoff_base_s, cap)
        # Doubling until the cap instead of ``base * 2**(attempt-1)`` keeps huge attempt
        # numbers from overflowing a float; it stops after at most ~1100 doublings.
        for _ in range(attempt - 1):
            if delay >= cap or delay == 0:
                break
            delay = min(delay * 2, cap)
        return delay

    def bounds_s(self, attempt: int) -> tuple[float, float]:
        """The envelope ``delay_s`` stays in: both ends non-decreasing in ``attempt``."""
        nominal = self.nominal_s(attempt)
        return nominal * (1 - self.jitter), min(self.backoff_max_s, nominal * (1 + self.jitter))

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one.

        Draws exactly one number from ``rng``, so a seeded ``rng`` gives a reproducible
        sequence. The result is within :meth:`bounds_s`: never negative, never above
        ``backoff_max_s``.
        """
        nominal = self.nominal_s(attempt)
        share = rng.uniform(-1.0, 1.0) * self.jitter
        return min(self.backoff_max_s, max(0.0, nominal * (1.0 + share)))

    def should_retry(self, attempt: int, kind: str, retryable: bool) -> bool:
        """Whether failed attempt ``attempt`` (1-based) of a step gets another try.

        No when the failure is not retryable, its ``kind`` is listed as non-retryable, or
        ``attempt`` already used up ``max_attempts``.
        """
        _check_attempt(attempt)
        return retryable and kind not in self.non_retryable_kinds and attempt < self.max_attempts


def _check_attempt(attempt: int) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValidationFailed("attempt", attempt, "must be an integer >= 1 (1 = first try)")
