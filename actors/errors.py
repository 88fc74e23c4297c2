"""One error hierarchy with a single root, split by who must act.

- :class:`CallerError` — the caller sent something wrong; HTTP 4xx. Carries the field, the
  (truncated) bad value and the rule, so the message says what to fix.
- :class:`OperatorError` — a dependency is down or the system is overloaded; HTTP 503/429 with
  ``retry_after_s``. The request may succeed later unchanged.
- :class:`InternalError` — a bug; HTTP 500. Never raised for bad input.

Errors carry data (``field``, ``value``, ``rule``, ``retryable``, ``retry_after_s``) so that
transports (HTTP, LAM replies, the CLI) render them without parsing strings.
"""

from __future__ import annotations

from typing import Any

VALUE_PREVIEW_CHARS = 80
"""How many characters of a bad value an error message quotes."""


def preview(value: Any, limit: int = VALUE_PREVIEW_CHARS) -> str:
    """Render ``value`` for an error message: ``repr`` cut to ``limit`` characters."""
    try:
        text = repr(value)
    except Exception:  # pragma: no cover - a broken __repr__ must not hide the real error
        text = f"<unrepresentable {type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class CpaError(Exception):
    """Root of every error the CPA scheduler raises on purpose."""

    status_code: int = 500
    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description, used for HTTP bodies and LAM ``failure``/``refuse``."""
        return {"error": self.code, "message": self.message, "retryable": self.retryable}


# --------------------------------------------------------------------------- caller errors


class CallerError(CpaError):
    """The request is wrong; sending it again unchanged will fail again."""

    status_code = 400
    code = "bad_request"


class ValidationFailed(CallerError):
    """A field holds a value that breaks a rule.

    ``field`` is a path such as ``todos[3].depends_on[0]`` or ``correlation.inReplyTo``.
    """

    status_code = 422
    code = "validation_failed"

    def __init__(
        self, field: str, value: Any, rule: str, *, hint: str | None = None, quote: bool = True
    ) -> None:
        self.field = field
        self.value = preview(value) if quote else str(value)
        self.rule = rule
        self.hint = hint
        message = f"{field}: got {self.value}; {rule}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update({"field": self.field, "value": self.value, "rule": self.rule})
        if self.hint:
            data["hint"] = self.hint
        return data


class MultipleValidationFailed(ValidationFailed):
    """Several fields are wrong; the first one names the error, all are listed."""

    def __init__(self, errors: list[ValidationFailed]) -> None:
        if not errors:
            raise ValueError("MultipleValidationFailed needs at least one error")
        first = errors[0]
        super().__init__(first.field, first.value, first.rule, hint=first.hint, quote=False)
        self.errors = errors
        if len(errors) > 1:
            self.message = f"{first.message} (and {len(errors) - 1} more)"
            self.args = (self.message,)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["errors"] = [
            {"field": e.field, "value": e.value, "rule": e.rule} for e in self.errors
        ]
        return data


class PayloadTooLarge(ValidationFailed):
    """The body or message exceeds a configured size."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(CallerError):
    """The request body is not JSON."""

    status_code = 415
    code = "unsupported_media_type"


class ProtocolViolation(CallerError):
    """A LAM message breaks the conversation protocol (e.g. ``done`` before ``agree``)."""

    status_code = 409
    code = "protocol_violation"

    def __init__(self, message: str, *, field: str = "type", value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = preview(value)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update({"field": self.field, "value": self.value})
        return data


class CycleError(ValidationFailed):
    """A task graph has a dependency cycle; ``cycle`` lists the step indices on it."""

    code = "cycle"

    def __init__(self, cycle: list[int]) -> None:
        self.cycle = cycle
        path = " → ".join(f"todos[{i}]" for i in cycle)
        super().__init__(
            f"todos[{cycle[0]}].depends_on",
            path,
            "the task graph must be acyclic; remove one dependency on this cycle",
            quote=False,
        )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["cycle"] = self.cycle
        return data


class Unauthenticated(CallerError):
    """No or an unknown API key."""

    status_code = 401
    code = "unauthenticated"


class NotFound(CallerError):
    """The object does not exist for this tenant (another tenant's object is also 'not found')."""

    status_code = 404
    code = "not_found"


class Conflict(CallerError):
    """The request conflicts with the current state (e.g. retrying a running job)."""

    status_code = 409
    code = "conflict"


class IdempotencyMismatch(CallerError):
    """The same idempotency key was used before with a different body."""

    status_code = 422
    code = "idempotency_mismatch"

    def __init__(self, key: str, original_job_id: str) -> None:
        self.key = key
        self.original_job_id = original_job_id
        super().__init__(
            f"idempotency key {preview(key)} was already used with a different body "
            f"(job {original_job_id}); use a new key for a new request"
        )


class NoIntent(CallerError):
    """The router found no intent for the text (rules unconfident and no LLM, or LLM unsure)."""

    status_code = 422
    code = "no_intent"


class PolicyDenied(CallerError):
    """A tenant policy forbids the plan (action blacklist, allowlists)."""

    status_code = 403
    code = "policy_denied"


# ------------------------------------------------------------------------- operator errors


class OperatorError(CpaError):
    """A dependency is down or the system is saturated; try again later."""

    status_code = 503
    code = "unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["retry_after_s"] = self.retry_after_s
        return data


class DependencyUnavailable(OperatorError):
    """Redis, Ray or an LLM endpoint cannot be reached."""

    def __init__(self, dependency: str, detail: str, *, retry_after_s: float = 1.0) -> None:
        self.dependency = dependency
        super().__init__(f"{dependency} is unavailable: {detail}", retry_after_s=retry_after_s)


class Overloaded(OperatorError):
    """Too much work queued; back off for ``retry_after_s``."""

    code = "overloaded"


class RateLimited(OperatorError):
    """The tenant's rate limit is exhausted."""

    status_code = 429
    code = "rate_limited"


# ------------------------------------------------------------------------ developer errors


class InternalError(CpaError):
    """A bug: an invariant broke. Report it."""


class ConfigError(CpaError):
    """The configuration files or environment are invalid (found at start-up)."""

    code = "config"


# ------------------------------------------------------------------------ step failures


class StepError(CpaError):
    """An executor could not perform a step. ``retryable`` decides whether it is tried again."""

    code = "step_failed"

    def __init__(self, message: str, *, retryable: bool = True, kind: str = "error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind


class NonRetryableStepError(StepError):
    """The step can never succeed (bad selector, policy) — goes to failure/DLQ at once."""

    def __init__(self, message: str, *, kind: str = "non_retryable") -> None:
        super().__init__(message, retryable=False, kind=kind)
