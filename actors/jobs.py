"""Job and step state: the data an Orchestrator owns for each job of its conversation.

Pure data (no Redis, no Ray). A job is stored in one Redis hash: ``meta`` (immutable JSON:
graph, tenant, conversation, reply addressing), ``status``, ``updated_at`` and one field
``s:<index>`` per step, so a step change rewrites one small field, not the whole job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from actors.graph import TaskGraph, build_graph
from actors.settings import GraphLimits


class JobStatus(StrEnum):
    """Lifecycle of a job."""

    QUEUED = "queued"  # durably accepted, not yet seen by its orchestrator
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class StepStatus(StrEnum):
    """Lifecycle of one step."""

    PENDING = "pending"  # dependencies not done yet
    QUEUED = "queued"  # in a task stream (or waiting in the delayed set for a retry)
    RUNNING = "running"  # an executor reported it started (informational)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # a dependency failed

    @property
    def terminal(self) -> bool:
        return self in (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED,
                        StepStatus.SKIPPED)

    @property
    def in_flight(self) -> bool:
        return self in (StepStatus.QUEUED, StepStatus.RUNNING)


PRIORITIES = ("high", "normal", "low")
_OPTIONAL_STEP_FIELDS = ("queued_at", "started_at", "finished_at", "replica", "error",
                         "error_kind", "result", "not_before")


@dataclass
class StepState:
    """Mutable state of one step. ``attempts`` doubles as the dispatch token: a result is
    accepted only for the attempt currently in flight."""

    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    replica: str | None = None
    error: str | None = None
    error_kind: str | None = None
    result: Any = None
    not_before: float | None = None  # a delayed retry is due then

    def to_json(self) -> str:
        # Hand-rolled (not dataclasses.asdict): this runs for every step change.
        data: dict[str, Any] = {"status": self.status.value, "attempts": self.attempts}
        for name in _OPTIONAL_STEP_FIELDS:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return json.dumps(data, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> StepState:
        data = json.loads(raw)
        data["status"] = StepStatus(data.get("status", "pending"))
        return cls(**data)

    def public(self, index: int, graph: TaskGraph) -> dict[str, Any]:
        """What ``GET /jobs/{id}`` shows for this step."""
        todo = graph.steps[index]
        out: dict[str, Any] = {
            "index": index,
            "name": todo.name,
            "action": todo.action,
            "capability": graph.capabilities[index],
            "depends_on": list(todo.depends_on),
            "status": self.status.value,
            "attempts": self.attempts,
            "queued_at": self.queued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.started_at is not None and self.finished_at is not None:
            out["duration_ms"] = round((self.finished_at - self.started_at) * 1000, 3)
        if graph.sessions[index] is not None:
            out["session"] = graph.sessions[index]
        if self.replica:
            out["replica"] = self.replica
        if self.error:
            out["error"] = self.error
            out["error_kind"] = self.error_kind
        if self.result is not None:
            out["result"] = self.result
        return out


@dataclass
class JobMeta:
    """What never changes after intake."""

    job_id: str
    tenant: str
    conversation_id: str
    shard: int
    todos: list[dict[str, Any]]
    priority: str = "normal"
    created_at: float = 0.0
    request: dict[str, Any] | None = None  # the LAM request (wire form) this job answers
    callback_url: str | None = None
    intent: str | None = None
    slots: dict[str, Any] = field(default_factory=dict)
    source: str = "explicit"  # rules | llm | explicit
    text: str | None = None
    max_attempts: int | None = None
    new_conversation: bool = False  # the ingress made the conversation id up: no history

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobMeta:
        return cls(**json.loads(raw))


@dataclass
class Job:
    """A job as its orchestrator holds it in memory."""

    meta: JobMeta
    graph: TaskGraph
    status: JobStatus
    steps: list[StepState]
    updated_at: float = 0.0
    sessions: dict[str, str] = field(default_factory=dict)  # session id -> owning replica
    session_restarts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    parsed_request: Any = None  # cache of meta.request as a LAM model (not persisted)

    @property
    def job_id(self) -> str:
        return self.meta.job_id

    @property
    def tenant(self) -> str:
        return self.meta.tenant

    @classmethod
    def new(cls, meta: JobMeta, limits: GraphLimits | None = None) -> Job:
        graph = build_graph(meta.todos, limits=limits)
        return cls(meta=meta, graph=graph, status=JobStatus.QUEUED,
                   steps=[StepState() for _ in graph.steps], updated_at=meta.created_at)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for step in self.steps:
            out[step.status.value] = out.get(step.status.value, 0) + 1
        return out

    def public(self, *, with_steps: bool = True) -> dict[str, Any]:
        """The job as ``GET /jobs/{id}`` shows it."""
        out: dict[str, Any] = {
            "job_id": self.meta.job_id,
            "tenant": self.meta.tenant,
            "conversation_id": self.meta.conversation_id,
            "status": self.status.value,
            "priority": self.meta.priority,
            "intent": self.meta.intent,
            "created_at": self.meta.created_at,
            "updated_at": self.updated_at,
            "steps_total": len(self.steps),
            "step_counts": self.counts(),
        }
        if self.meta.slots:
            out["slots"] = self.meta.slots
        if self.error:
            out["error"] = self.error
        if with_steps:
            out["steps"] = [s.public(i, self.graph) for i, s in enumerate(self.steps)]
        return out
