"""Request bodies of the HTTP API (frozen, unknown fields rejected)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.jobs import PRIORITIES


class ScheduleContext(BaseModel):
    """Optional context of a /schedule request (the tenant comes from the API key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str | None = Field(None, max_length=128)
    locale: str | None = Field(None, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


class ScheduleRequest(BaseModel):
    """``POST /schedule``: route ``text`` to a plan, or run the explicit ``todos``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str | None = Field(None, min_length=1, description="Request to route to an intent.")
    todos: list[dict[str, Any]] | None = Field(
        None, description="Explicit plan in the ToDo schema (instead of text)."
    )
    priority: Literal["high", "normal", "low"] = "normal"
    callback_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://[^\s]+$",
        description="LAM replies are POSTed here (http or https URL).",
    )
    context: ScheduleContext | None = None
    conversation_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$"
    )
    dry_run: bool = Field(False, description="Return the routed plan without running it.")
    max_attempts: int | None = Field(None, ge=1, le=100)

    @model_validator(mode="after")
    def _text_xor_todos(self) -> ScheduleRequest:
        if (self.text is None) == (self.todos is None):
            raise ValueError("give exactly one of `text` (to route) or `todos` (explicit plan)")
        return self


assert set(PRIORITIES) == {"high", "normal", "low"}
