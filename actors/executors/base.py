"""The executor contract (the seed's ``execute(todo)`` / ``verify(todo)``): one input model,
one result model, errors as :class:`~actors.errors.StepError`."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from actors.errors import ConfigError
from actors.graph import ToDo


class StepInput(BaseModel):
    """Everything an executor gets for one step attempt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    tenant: str
    step: int = Field(..., ge=0)
    attempt: int = Field(..., ge=1, description="1 on the first try; the dispatch token.")
    todo: ToDo
    timeout_s: float = Field(..., gt=0, description="Hard limit for execute(), seconds.")
    capability: str
    session: str | None = Field(
        None, description="Session id (job:session) for stateful capabilities, else None."
    )

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this step: side effects carry it (verify-before-retry)."""
        return f"{self.tenant}:{self.job_id}:{self.step}"


class StepOutcome(BaseModel):
    """What an executor reports for one attempt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ok: bool
    output: Any = None
    error: str | None = None
    error_kind: str | None = None
    retryable: bool = True

    @classmethod
    def success(cls, output: Any = None) -> StepOutcome:
        return cls(ok=True, output=output)

    @classmethod
    def failure(cls, error: str, *, kind: str = "error", retryable: bool = True) -> StepOutcome:
        return cls(ok=False, error=error, error_kind=kind, retryable=retryable)


class Executor(ABC):
    """Performs steps of one capability. One instance per pool replica; ``execute`` may be
    called concurrently (up to the pool's worker count) and must not block the event loop."""

    capability: str = ""

    async def start(self, replica_id: str) -> None:  # noqa: B027 - optional hook
        """Called once when the replica starts (open browsers, connections)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Called on graceful shutdown."""

    async def close_session(self, session: str) -> None:  # noqa: B027 - optional hook
        """Drop a session's state (browser context, desktop session)."""

    @abstractmethod
    async def execute(self, step: StepInput) -> StepOutcome:
        """Perform the step. Raise StepError (or return a failure outcome) when it fails."""

    async def verify(self, step: StepInput) -> bool:
        """Before re-running a side-effecting step: did an earlier attempt already take
        effect? (e.g. look in Sent Items for the idempotency key). Default: no."""
        return False


def load_executor(path: str, **kwargs: Any) -> Executor:
    """Instantiate ``module:Class`` (the pool's ``executor`` setting)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"executor: got {path!r}; must be 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"executor: cannot import {path!r}: {exc}") from exc
    executor = cls(**kwargs)
    if not isinstance(executor, Executor):
        raise ConfigError(f"executor: {path!r} is not an actors.executors.base.Executor")
    return executor
