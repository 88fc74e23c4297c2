"""The per-conversation Orchestrator's logic: events in, state changes and effects out.

Pure Python (no Redis, no Ray): the ConversationShard feeds it one event at a time per
conversation and writes the returned :class:`Effects` to Redis in one transaction together
with the acknowledgement of the event. Everything here is deterministic given the clock and
the random generator, so it is unit-tested without any infrastructure.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from actors import lam
from actors.errors import Conflict
from actors.jobs import Job, JobStatus, StepState, StepStatus
from actors.retry import RetryPolicy

SCHEDULER_AGENT = "agent://scheduler/cpa"
"""Sender of replies to /schedule jobs (LAM requests are answered by their addressee)."""

DISPATCH_DEADLINE_S = 300.0
"""Default of ``queue.dispatch_deadline_s``: how long a dispatched attempt may wait for an
executor to start it (its ``start_by`` is its queued/due time plus this), seconds."""


@dataclass(frozen=True)
class Dispatch:
    """Put one step attempt on a task stream (``replica`` set: that replica's own stream)."""

    job_id: str
    step: int
    capability: str
    priority: str
    payload: dict[str, Any]
    replica: str | None = None
    due: float | None = None  # set: wait in the delayed set until then


@dataclass(frozen=True)
class StepResult:
    """An executor's report about one step attempt (decoded from the shard inbox)."""

    job_id: str
    step: int
    attempt: int
    ok: bool
    output: Any = None
    error: str | None = None
    error_kind: str | None = None
    retryable: bool = True
    replica: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class Effects:
    """What one event changed: written to Redis atomically by the shard."""

    dispatches: list[Dispatch] = field(default_factory=list)
    changed_steps: set[int] = field(default_factory=set)
    job_changed: bool = False
    status_from: JobStatus | None = None
    replies: list[lam.LamMessage] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    cancel_running: list[int] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[tuple[Dispatch, str]] = field(default_factory=list)

    def merge(self, other: Effects) -> None:
        self.dispatches += other.dispatches
        self.changed_steps |= other.changed_steps
        self.job_changed |= other.job_changed
        if self.status_from is None:
            self.status_from = other.status_from
        self.replies += other.replies
        self.events += other.events
        self.cancel_running += other.cancel_running
        self.journal += other.journal
        self.dead_letters += other.dead_letters


class Orchestrator:
    """Runs the jobs of one conversation. Holds the conversation's protocol state."""

    def __init__(
        self,
        tenant: str,
        conversation_id: str,
        *,
        policy: RetryPolicy,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        inform: str = "steps",
        protocol: lam.Conversation | None = None,
        dispatch_deadline_s: float = DISPATCH_DEADLINE_S,
    ) -> None:
        self.tenant = tenant
        self.dispatch_deadline_s = dispatch_deadline_s
        self.conversation_id = conversation_id
        self.policy = policy
        self.clock = clock
        self.rng = rng or random.Random()
        self.inform = inform
        self.protocol = protocol or lam.Conversation(conversation_id)
        self.jobs: dict[str, Job] = {}
        self.last_active = clock()
        self.protocol_loaded = False  # the shard loads the protocol snapshot lazily

    # ----------------------------------------------------------------- event handlers

    def start(self, job: Job) -> Effects:
        """A newly accepted job: agree, then dispatch its ready steps."""
        fx = Effects()
        self.jobs[job.job_id] = job
        if job.status is not JobStatus.QUEUED:
            return fx  # redelivered submit: already started
        self._set_status(job, JobStatus.RUNNING, fx)
        request = self._request_of(job)
        if request is not None:
            if self.protocol.state_of(request.id) is None:
                self.protocol.record(request)
            agree = self._reply(job, "agree", {
                "job_id": job.job_id, "steps": len(job.steps), "intent": job.meta.intent,
            })
            if agree is not None:
                fx.replies.append(agree)
        fx.journal.append({"event": "started", "job": job.job_id})
        self._dispatch_ready(job, fx)
        self._maybe_finish(job, fx)
        return fx

    def on_result(self, job: Job, res: StepResult) -> Effects:
        """An executor finished (or gave up on) one step attempt."""
        fx = Effects()
        self.jobs[job.job_id] = job
        if not 0 <= res.step < len(job.steps):
            fx.journal.append({"event": "result_ignored", "job": job.job_id, "step": res.step,
                               "why": "no such step"})
            return fx
        step = job.steps[res.step]
        if res.attempt != step.attempts or not step.status.in_flight:
            # A stale result: a reclaimed or superseded attempt, or a cancelled step.
            fx.journal.append({"event": "result_ignored", "job": job.job_id, "step": res.step,
                               "attempt": res.attempt, "current": step.attempts,
                               "status": step.status.value})
            return fx
        now = self.clock()
        step.started_at = res.started_at or step.started_at
        step.finished_at = res.finished_at or now
        step.replica = res.replica or step.replica
        fx.changed_steps.add(res.step)
        session = job.graph.sessions[res.step]
        if res.ok:
            step.status = StepStatus.SUCCEEDED
            step.result = res.output
            step.error = step.error_kind = None
            if session is not None and res.replica and session not in job.sessions:
                job.sessions[session] = res.replica
                fx.job_changed = True
            fx.events.append(self._event(job, res.step))
            wants_inform = self.inform == "steps" or (
                self.inform == "results" and res.output is not None)
            if wants_inform and job.status is JobStatus.RUNNING:
                reply = self._reply(job, "inform", {
                    "job_id": job.job_id, "step": res.step, "status": "succeeded",
                    "name": job.graph.steps[res.step].name,
                })
                if reply is not None:
                    fx.replies.append(reply)
            if job.status is JobStatus.RUNNING:
                self._dispatch_ready(job, fx, after=res.step)
            self._maybe_finish(job, fx)
            return fx

        step.error = res.error or "step failed"
        step.error_kind = res.error_kind or "error"
        if res.error_kind == "session_lost" and session is not None:
            self._restart_session(job, session, fx, reason=step.error)
            return fx
        max_attempts = self._max_attempts(job, res.step)
        retry = (job.status is JobStatus.RUNNING and res.retryable
                 and step.error_kind not in self.policy.non_retryable_kinds
                 and step.attempts < max_attempts)
        if retry:
            delay = self.policy.delay_s(step.attempts, self.rng)
            fx.journal.append({"event": "retry", "job": job.job_id, "step": res.step,
                               "attempt": step.attempts, "delay_s": round(delay, 3),
                               "error": step.error})
            if session is not None and session in job.sessions and \
                    job.graph.steps[res.step].session is None and \
                    self._session_first(job, session) == res.step:
                job.sessions.pop(session, None)
                fx.job_changed = True
            self._dispatch(job, res.step, fx, due=now + delay)
            fx.events.append(self._event(job, res.step, retry_in_s=round(delay, 3)))
            return fx
        step.status = StepStatus.FAILED
        fx.events.append(self._event(job, res.step))
        if step.error_kind != "dead_lettered":  # a poison entry is in the DLQ already
            fx.dead_letters.append((
                self._entry(job, res.step, None, deadline=False),
                f"step failed after {step.attempts} attempt(s) ({step.error_kind}): "
                f"{step.error}",
            ))
        self._fail_job(job, fx, f"step {res.step} ({job.graph.steps[res.step].action}) failed "
                                f"after {step.attempts} attempt(s): {step.error}")
        return fx

    def on_started(self, job: Job, step_index: int, attempt: int, replica: str,
                   started_at: float) -> Effects:
        """An executor began a step (informational: timings and live progress)."""
        fx = Effects()
        if not 0 <= step_index < len(job.steps):
            return fx
        step = job.steps[step_index]
        if step.attempts == attempt and step.status is StepStatus.QUEUED:
            step.status = StepStatus.RUNNING
            step.started_at = started_at
            step.replica = replica
            fx.changed_steps.add(step_index)
            fx.events.append(self._event(job, step_index))
        return fx

    def cancel(self, job: Job, reason: str = "cancelled by request") -> Effects:
        """Stop dispatching; signal running steps; mark everything not finished cancelled."""
        fx = Effects()
        self.jobs[job.job_id] = job
        if job.status.terminal:
            return fx
        for i, step in enumerate(job.steps):
            if step.status.in_flight:
                fx.cancel_running.append(i)
            if not step.status.terminal:
                step.status = StepStatus.CANCELLED
                fx.changed_steps.add(i)
        self._close_unsuccessful(job, fx, JobStatus.CANCELLED, reason)
        return fx

    def retry(self, job: Job) -> Effects:
        """Re-run failed (and skipped/cancelled) steps only; succeeded steps stay done."""
        if job.status in (JobStatus.RUNNING, JobStatus.QUEUED):
            raise Conflict(f"job {job.job_id} is {job.status.value}; only a failed or cancelled "
                           "job can be retried")
        if job.status is JobStatus.SUCCEEDED:
            raise Conflict(f"job {job.job_id} succeeded; there is nothing to retry")
        fx = Effects()
        self.jobs[job.job_id] = job
        for i, step in enumerate(job.steps):
            if step.status in (StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED):
                job.steps[i] = type(step)()
                fx.changed_steps.add(i)
        job.error = None
        job.session_restarts.clear()
        self._set_status(job, JobStatus.RUNNING, fx)
        fx.journal.append({"event": "retried", "job": job.job_id,
                           "steps": sorted(fx.changed_steps)})
        self._dispatch_ready(job, fx)
        self._maybe_finish(job, fx)
        return fx

    def session_lost(self, job: Job, session: str, reason: str) -> Effects:
        """The replica owning ``session`` is gone: re-run the session from its first step."""
        fx = Effects()
        if job.status is not JobStatus.RUNNING:
            return fx
        self._restart_session(job, session, fx, reason=reason)
        return fx

    # --------------------------------------------------------------------- internals

    def _max_attempts(self, job: Job, index: int) -> int:
        per_step = job.graph.steps[index].max_attempts
        return per_step or job.meta.max_attempts or self.policy.max_attempts

    def _session_first(self, job: Job, session: str) -> int:
        return min(i for i, s in enumerate(job.graph.sessions) if s == session)

    def _restart_session(self, job: Job, session: str, fx: Effects, *, reason: str) -> None:
        members = [i for i, s in enumerate(job.graph.sessions) if s == session]
        restarts = job.session_restarts.get(session, 0) + 1
        job.session_restarts[session] = restarts
        job.sessions.pop(session, None)
        fx.job_changed = True
        first = members[0]
        budget = self._max_attempts(job, first)
        fx.journal.append({"event": "session_restart", "job": job.job_id, "session": session,
                           "restart": restarts, "reason": reason})
        for i in members:
            step = job.steps[i]
            if step.status.in_flight:
                fx.cancel_running.append(i)
        if restarts >= budget:
            for i in members:
                if not job.steps[i].status.terminal or job.steps[i].status is \
                        StepStatus.SUCCEEDED:
                    job.steps[i].status = StepStatus.FAILED
                    job.steps[i].error = f"session lost {restarts} time(s): {reason}"
                    job.steps[i].error_kind = "session_lost"
                    fx.changed_steps.add(i)
            self._fail_job(job, fx, f"session {session} lost {restarts} time(s): {reason}")
            return
        for i in members:
            old = job.steps[i]
            attempts = old.attempts
            old.status = StepStatus.PENDING
            old.result = None
            old.replica = None
            old.attempts = attempts  # keep counting: a stale result must not match again
            fx.changed_steps.add(i)
        self._dispatch_ready(job, fx)

    def _dispatch_ready(self, job: Job, fx: Effects, *, after: int | None = None) -> None:
        """Dispatch pending steps whose dependencies all succeeded. ``after``: only the
        dependents of that just-finished step can have become ready (O(degree), not O(n))."""
        steps = job.steps
        if after is not None:
            for child in job.graph.dependents[after]:
                if steps[child].status is StepStatus.PENDING and all(
                        steps[d].status is StepStatus.SUCCEEDED
                        for d in job.graph.steps[child].depends_on):
                    self._dispatch(job, child, fx)
            return
        done = {i for i, s in enumerate(steps) if s.status is StepStatus.SUCCEEDED}
        for i in job.graph.ready(done):
            if steps[i].status is StepStatus.PENDING:
                self._dispatch(job, i, fx)

    def _dispatch(self, job: Job, index: int, fx: Effects, *, due: float | None = None) -> None:
        step = job.steps[index]
        step.attempts += 1
        step.status = StepStatus.QUEUED
        step.queued_at = self.clock()
        step.not_before = due
        step.started_at = None
        step.finished_at = None
        fx.changed_steps.add(index)
        fx.dispatches.append(self._entry(job, index, due))
        if due is None:
            fx.events.append(self._event(job, index))

    def _entry(self, job: Job, index: int, due: float | None, *, deadline: bool = True
               ) -> Dispatch:
        """The task-stream entry of the step's current attempt. ``deadline``: it carries
        ``start_by`` (epoch s): an executor must not start it later (a dead letter does not:
        replaying it is a deliberate new start)."""
        session = job.graph.sessions[index]
        replica = job.sessions.get(session) if session is not None else None
        payload: dict[str, Any] = {
            "job": job.job_id, "tenant": job.tenant, "conv": job.meta.conversation_id,
            "shard": job.meta.shard, "step": index, "attempt": job.steps[index].attempts,
            # The plan as submitted (validated at intake and by build_graph): no re-dump.
            "todo": job.meta.todos[index],
            "timeout_s": job.graph.timeouts_s[index], "cap": job.graph.capabilities[index],
        }
        if session is not None:
            payload["session"] = f"{job.job_id}:{session}"
        if deadline:
            payload["start_by"] = start_by(job.steps[index], self.dispatch_deadline_s)
        return Dispatch(job_id=job.job_id, step=index, capability=job.graph.capabilities[index],
                        priority=job.meta.priority, payload=payload, replica=replica, due=due)

    def _fail_job(self, job: Job, fx: Effects, reason: str) -> None:
        # Everything downstream of a failed step can never run: mark it skipped.
        failed = [i for i, s in enumerate(job.steps) if s.status is StepStatus.FAILED]
        queue = deque(failed)
        seen = set(failed)
        while queue:
            node = queue.popleft()
            for child in job.graph.dependents[node]:
                if child in seen:
                    continue
                seen.add(child)
                queue.append(child)
                if job.steps[child].status is StepStatus.PENDING:
                    job.steps[child].status = StepStatus.SKIPPED
                    fx.changed_steps.add(child)
        self._close_unsuccessful(job, fx, JobStatus.FAILED, reason)

    def _close_unsuccessful(self, job: Job, fx: Effects, status: JobStatus, reason: str
                            ) -> None:
        """End a job as failed or cancelled: status, live event, LAM failure, journal."""
        job.error = reason
        self._set_status(job, status, fx)
        fx.events.append({"job_id": job.job_id, "status": status.value, "error": reason})
        reply = self._reply(job, "failure", {"job_id": job.job_id, "status": status.value,
                                             "reason": reason})
        if reply is not None:
            fx.replies.append(reply)
        fx.journal.append({"event": status.value, "job": job.job_id, "reason": reason})

    def _maybe_finish(self, job: Job, fx: Effects) -> None:
        if job.status is not JobStatus.RUNNING:
            return
        if all(s.status is StepStatus.SUCCEEDED for s in job.steps):
            self._set_status(job, JobStatus.SUCCEEDED, fx)
            results = {str(i): s.result for i, s in enumerate(job.steps) if s.result is not None}
            fx.events.append({"job_id": job.job_id, "status": job.status.value})
            reply = self._reply(job, "done", {"job_id": job.job_id, "status": "succeeded",
                                              "results": results})
            if reply is not None:
                fx.replies.append(reply)
            fx.journal.append({"event": "succeeded", "job": job.job_id})

    def _set_status(self, job: Job, status: JobStatus, fx: Effects) -> None:
        if job.status is status:
            return
        if fx.status_from is None:
            fx.status_from = job.status
        job.status = status
        job.updated_at = self.clock()
        fx.job_changed = True

    def _event(self, job: Job, index: int, **extra: Any) -> dict[str, Any]:
        step = job.steps[index]
        event: dict[str, Any] = {
            "job_id": job.job_id, "step": index, "status": step.status.value,
            "attempt": step.attempts, "ts": self.clock(),
        }
        if step.error and step.status is not StepStatus.SUCCEEDED:
            event["error"] = step.error
        event.update(extra)
        return event

    def _request_of(self, job: Job) -> lam.Request | None:
        if job.meta.request is None:
            return None
        if job.parsed_request is None:
            msg = lam.validate(job.meta.request)
            job.parsed_request = msg if isinstance(msg, lam.Request) else False
        return job.parsed_request or None

    def _reply(self, job: Job, kind: lam.MessageType, payload: dict[str, Any]
               ) -> lam.LamMessage | None:
        """A reply to the job's request, checked against the conversation protocol; None when
        the protocol forbids it (e.g. an inform after the channel cancelled)."""
        request = self._request_of(job)
        if request is None:
            return None
        msg = lam.reply(request, kind, payload=payload)
        if self.protocol.state_of(request.id) is None:
            self.protocol.record(request)
        try:
            self.protocol.accept(msg)
        except Exception:
            return None
        return msg


def start_by(step: StepState, deadline_s: float) -> float:
    """When an executor must have started the step's current attempt: its due time (a
    delayed retry) or the time it was queued, plus ``deadline_s`` (epoch seconds)."""
    return (step.not_before or step.queued_at or 0.0) + deadline_s


def restartable_sessions(job: Job, alive: Iterable[str]) -> list[str]:
    """Sessions of a running job whose owning replica is not in ``alive`` while one of their
    steps is in flight or still to run."""
    alive_set = set(alive)
    lost = []
    for session, replica in job.sessions.items():
        if replica in alive_set:
            continue
        members = [i for i, s in enumerate(job.graph.sessions) if s == session]
        if any(not job.steps[i].status.terminal for i in members):
            lost.append(session)
    return lost
