"""Orchestrator logic without any infrastructure: events in, state and effects out."""

from __future__ import annotations

import random
from typing import Any

import pytest

from actors import lam
from actors.errors import Conflict
from actors.jobs import Job, JobMeta, JobStatus, StepStatus
from actors.orchestrator import Orchestrator, StepResult, restartable_sessions
from actors.retry import RetryPolicy

DIAMOND = [{"action": "noop"}, {"action": "noop", "depends_on": [0]},
           {"action": "noop", "depends_on": [0]}, {"action": "noop", "depends_on": [1, 2]}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(todos: list[dict[str, Any]], *, inform: str = "steps", with_request: bool = True,
         max_attempts: int = 3) -> tuple[Orchestrator, Job, Clock]:
    clock = Clock()
    request = None
    if with_request:
        request = lam.Request(sender="agent://channel/chat", to=("agent://scheduler/cpa",),
                              task="t", context=lam.Context(tenant="acme"),
                              correlation=lam.Correlation(conversation_id="c1")).wire()
    meta = JobMeta(job_id="j1", tenant="acme", conversation_id="c1", shard=0, todos=todos,
                   created_at=clock.now, request=request)
    job = Job.new(meta)
    policy = RetryPolicy(max_attempts=max_attempts, backoff_base_s=1.0, backoff_max_s=10.0,
                         jitter=0.0)
    orch = Orchestrator("acme", "c1", policy=policy, clock=clock, rng=random.Random(1),
                        inform=inform)
    return orch, job, clock


def ok(step: int, attempt: int = 1, output: Any = None, replica: str = "r1") -> StepResult:
    return StepResult(job_id="j1", step=step, attempt=attempt, ok=True, output=output,
                      replica=replica)


def fail(step: int, attempt: int = 1, *, retryable: bool = True, kind: str = "error"
         ) -> StepResult:
    return StepResult(job_id="j1", step=step, attempt=attempt, ok=False, error="boom",
                      error_kind=kind, retryable=retryable, replica="r1")


def test_start_agrees_and_dispatches_roots() -> None:
    orch, job, _ = make(DIAMOND)
    fx = orch.start(job)
    assert job.status is JobStatus.RUNNING
    assert [d.step for d in fx.dispatches] == [0]
    assert [m.type for m in fx.replies] == ["agree"]
    assert fx.status_from is JobStatus.QUEUED
    assert orch.start(job).dispatches == []  # a redelivered submit changes nothing


def test_diamond_runs_to_done_in_order() -> None:
    orch, job, _ = make(DIAMOND)
    orch.start(job)
    fx = orch.on_result(job, ok(0))
    assert sorted(d.step for d in fx.dispatches) == [1, 2]
    assert orch.on_result(job, ok(1)).dispatches == []
    fx = orch.on_result(job, ok(2))
    assert [d.step for d in fx.dispatches] == [3]
    fx = orch.on_result(job, ok(3))
    assert job.status is JobStatus.SUCCEEDED
    assert fx.replies[-1].type == "done"


def test_stale_and_duplicate_results_are_ignored() -> None:
    orch, job, _ = make(DIAMOND)
    orch.start(job)
    orch.on_result(job, ok(0))
    fx = orch.on_result(job, ok(0))  # duplicate delivery
    assert fx.dispatches == [] and not fx.changed_steps
    fx = orch.on_result(job, ok(1, attempt=7))  # not the attempt in flight
    assert not fx.changed_steps
    assert job.steps[1].status is StepStatus.QUEUED


def test_retry_is_delayed_with_backoff_then_fails_and_skips() -> None:
    orch, job, clock = make([{"action": "noop"}, {"action": "noop", "depends_on": [0]}],
                            max_attempts=2)
    orch.start(job)
    fx = orch.on_result(job, fail(0))
    assert len(fx.dispatches) == 1
    assert fx.dispatches[0].due == pytest.approx(clock.now + 1.0)
    assert job.steps[0].attempts == 2
    fx = orch.on_result(job, fail(0, attempt=2))
    assert job.status is JobStatus.FAILED
    assert job.steps[1].status is StepStatus.SKIPPED
    assert fx.replies[-1].type == "failure"
    assert len(fx.dead_letters) == 1 and "after 2 attempt(s)" in fx.dead_letters[0][1]


def test_non_retryable_fails_at_once() -> None:
    orch, job, _ = make([{"action": "noop"}])
    orch.start(job)
    orch.on_result(job, fail(0, retryable=False))
    assert job.status is JobStatus.FAILED
    assert job.steps[0].attempts == 1


def test_cancel_then_retry_reruns_only_unfinished_steps() -> None:
    orch, job, _ = make(DIAMOND)
    orch.start(job)
    orch.on_result(job, ok(0))
    fx = orch.cancel(job)
    assert job.status is JobStatus.CANCELLED
    assert sorted(fx.cancel_running) == [1, 2]
    assert fx.replies[-1].type == "failure"
    with pytest.raises(Conflict):
        orch.retry(make(DIAMOND)[1])  # a queued job cannot be retried
    fx = orch.retry(job)
    assert job.status is JobStatus.RUNNING
    assert job.steps[0].status is StepStatus.SUCCEEDED  # not re-run
    assert sorted(d.step for d in fx.dispatches) == [1, 2]


def test_inform_policy() -> None:
    for inform, expected in (("steps", 1), ("results", 0), ("none", 0)):
        orch, job, _ = make([{"action": "noop"}, {"action": "noop", "depends_on": [0]}],
                            inform=inform)
        orch.start(job)
        fx = orch.on_result(job, ok(0))
        assert sum(m.type == "inform" for m in fx.replies) == expected, inform
    orch, job, _ = make([{"action": "noop"}, {"action": "noop", "depends_on": [0]}],
                        inform="results")
    orch.start(job)
    fx = orch.on_result(job, ok(0, output={"n": 1}))
    assert [m.type for m in fx.replies] == ["inform"]


def test_replies_thread_on_the_request() -> None:
    orch, job, _ = make(DIAMOND)
    fx = orch.start(job)
    request_id = job.meta.request["id"]  # type: ignore[index]
    assert str(fx.replies[0].correlation.in_reply_to) == request_id
    assert fx.replies[0].payload["job_id"] == "j1"


def test_session_owner_and_restart_budget() -> None:
    todos = [{"action": "playwright"}, {"action": "click", "selector": "#a", "depends_on": [0]},
             {"action": "click", "selector": "#b", "depends_on": [1]}]
    orch, job, _ = make(todos, max_attempts=2)
    orch.start(job)
    orch.on_result(job, ok(0, replica="b-1"))
    assert job.sessions == {"s0": "b-1"}
    fx = orch.on_result(job, ok(1, replica="b-1"))
    assert fx.dispatches[0].replica == "b-1"  # affinity: the owner's own stream
    assert restartable_sessions(job, alive=["b-2"]) == ["s0"]
    fx = orch.session_lost(job, "s0", "replica b-1 is gone")
    assert [d.step for d in fx.dispatches] == [0] and fx.dispatches[0].replica is None
    assert fx.cancel_running == [2]
    orch.on_result(job, ok(0, attempt=2, replica="b-2"))
    orch.session_lost(job, "s0", "replica b-2 is gone")
    assert job.status is JobStatus.FAILED  # restart budget (max_attempts) used up


def test_jobs_without_a_request_have_no_replies() -> None:
    orch, job, _ = make(DIAMOND, with_request=False)
    assert orch.start(job).replies == []
