"""RetryPolicy: exponential backoff with jitter, the cap, retry decisions (unit tier)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from actors.errors import ValidationFailed
from actors.retry import RetryPolicy
from actors.settings import QueueSettings

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 100),
    backoff_base_s=st.floats(0, 1_000, allow_nan=False),
    backoff_max_s=st.floats(0, 100_000, allow_nan=False),
    jitter=st.floats(0, 1, allow_nan=False),
)
attempts = st.integers(1, 5_000)


def test_exact_delays_without_jitter() -> None:
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=10, jitter=0)
    rng = random.Random(0)
    assert [policy.delay_s(a, rng) for a in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_jitter_moves_the_delay_within_its_share() -> None:
    policy = RetryPolicy(backoff_base_s=10, backoff_max_s=1_000, jitter=0.2)
    delays = [policy.delay_s(1, random.Random(seed)) for seed in range(200)]
    assert all(8 <= d <= 12 for d in delays)
    assert max(delays) - min(delays) > 2, "jitter actually spreads the delays"


def test_should_retry_counts_attempts_and_honours_kinds() -> None:
    policy = RetryPolicy(max_attempts=3, non_retryable_kinds=frozenset({"policy_denied"}))
    assert policy.should_retry(1, "timeout", True)
    assert policy.should_retry(2, "timeout", True)
    assert not policy.should_retry(3, "timeout", True), "3 attempts in all"
    assert not policy.should_retry(1, "timeout", False)
    assert not policy.should_retry(1, "policy_denied", True)
    assert not RetryPolicy(max_attempts=1).should_retry(1, "timeout", True)


def test_bad_attempts_and_settings_are_rejected() -> None:
    policy = RetryPolicy()
    for bad in (0, -1, True):
        with pytest.raises(ValidationFailed, match="attempt"):
            policy.delay_s(bad, random.Random(0))
    with pytest.raises(ValidationError):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ValidationError):
        RetryPolicy(backoff_max_s=float("inf"))
    with pytest.raises(ValidationError):
        RetryPolicy(unknown=1)  # type: ignore[call-arg]


def test_from_settings_and_attribute_docs() -> None:
    settings = QueueSettings(max_attempts=7, backoff_base_s=2, backoff_max_s=60,
                             backoff_jitter=0.1)
    policy = RetryPolicy.from_settings(settings)
    assert (policy.max_attempts, policy.backoff_base_s, policy.backoff_max_s, policy.jitter) == (
        7, 2, 60, 0.1)
    assert all(field.description for field in RetryPolicy.model_fields.values())


def test_huge_attempt_numbers_do_not_overflow() -> None:
    policy = RetryPolicy(backoff_base_s=1e300, backoff_max_s=1e308, jitter=1)
    assert policy.delay_s(10**6, random.Random(1)) <= 1e308


@given(policies, attempts, st.integers(0, 2**32))
def test_delay_stays_in_envelope_and_under_cap(policy: RetryPolicy, attempt: int,
                                               seed: int) -> None:
    delay = policy.delay_s(attempt, random.Random(seed))
    low, high = policy.bounds_s(attempt)
    assert 0 <= delay <= policy.backoff_max_s
    assert low - 1e-9 * max(1.0, low) <= delay <= high + 1e-9 * max(1.0, high)


@given(policies, attempts)
def test_envelope_is_monotone(policy: RetryPolicy, attempt: int) -> None:
    low1, high1 = policy.bounds_s(attempt)
    low2, high2 = policy.bounds_s(attempt + 1)
    assert low1 <= low2
    assert high1 <= high2
    assert policy.nominal_s(attempt) <= policy.nominal_s(attempt + 1)


@given(policies, st.lists(attempts, min_size=1, max_size=20), st.integers(0, 2**32))
def test_seeded_rng_is_deterministic(policy: RetryPolicy, sequence: list[int],
                                     seed: int) -> None:
    first = [policy.delay_s(a, rng) for rng in [random.Random(seed)] for a in sequence]
    second = [policy.delay_s(a, rng) for rng in [random.Random(seed)] for a in sequence]
    assert first == second


@given(policies, attempts)
def test_never_retries_beyond_max_attempts(policy: RetryPolicy, attempt: int) -> None:
    assert policy.should_retry(attempt, "error", True) == (attempt < policy.max_attempts)
