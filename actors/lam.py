"""LAM — Lumina Agent Messages, the FIPA-ACL-like protocol channels and agents speak.

Eleven performatives (``type``): request, inform, propose, agree, refuse, confirm, failure,
done, discover, offer, assign. Every message is a frozen pydantic model; the union is
discriminated on ``type``; unknown fields are rejected. Wire bytes are decoded in exactly one
place, :func:`decode`, which enforces the configured limits (size, depth, string lengths,
recipients, duplicate keys) and turns every failure into :class:`ValidationFailed` naming the
field, the bad value and the rule.

Conversation rules (which reply may answer which message) live in :class:`Conversation`.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from actors.errors import (
    MultipleValidationFailed,
    PayloadTooLarge,
    ProtocolViolation,
    UnsupportedMediaType,
    ValidationFailed,
    preview,
)
from actors.settings import LamLimits

PROTOCOL_VERSION = "1.0"

AGENT_URI_RE = re.compile(r"^agent://[a-z][a-z0-9_.-]{0,63}/[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")
"""``agent://<kind>/<name>``: kind lower-case, name letters/digits/``_.@:-``."""


def _agent_uri(value: str) -> str:
    if not AGENT_URI_RE.match(value):
        raise ValueError(
            "must be an agent URI agent://<kind>/<name> (kind: lower-case letters, digits, "
            "'_.-'; name: letters, digits, '_.@:-'), e.g. agent://channel/email"
        )
    return value


def _rfc3339(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            "must be an RFC 3339 timestamp with a time zone, e.g. 2025-10-30T09:45:00Z"
        )
    return value


AgentUri = Annotated[str, AfterValidator(_agent_uri)]
Timestamp = Annotated[datetime, AfterValidator(_rfc3339)]
Ident = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
]

MessageType = Literal[
    "request", "inform", "propose", "agree", "refuse", "confirm",
    "failure", "done", "discover", "offer", "assign",
]
MESSAGE_TYPES: tuple[str, ...] = (
    "request", "inform", "propose", "agree", "refuse", "confirm",
    "failure", "done", "discover", "offer", "assign",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Context(_Frozen):
    """Who the message is for: tenant, business domain and locale."""

    tenant: Ident = Field(..., description="Tenant id; must match the API key's tenant.")
    domain: str | None = Field(None, max_length=128, description="Business domain, e.g. crm.")
    locale: str | None = Field(
        None, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$", description="BCP 47, e.g. de-DE."
    )


class Correlation(_Frozen):
    """Threads messages into conversations."""

    conversation_id: Ident = Field(
        ..., alias="conversationId", description="Conversation this message belongs to."
    )
    in_reply_to: uuid.UUID | None = Field(
        None, alias="inReplyTo", description="id of the message this one answers."
    )


class _LamBase(_Frozen):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique message id (UUID).")
    ts: Timestamp = Field(
        default_factory=lambda: datetime.now(UTC), description="Send time, RFC 3339."
    )
    version: Literal["1.0"] = Field("1.0", description="Protocol version.")
    sender: AgentUri = Field(..., description="Sending agent, agent://<kind>/<name>.")
    to: tuple[AgentUri, ...] = Field(..., min_length=1, description="Recipients (agent URIs).")
    intent: str | None = Field(None, max_length=128, description="Intent name, e.g. analyse.")
    task: str | None = Field(None, description="Natural-language task text.")
    payload: dict[str, Any] = Field(default_factory=dict, description="Type-specific content.")
    context: Context
    correlation: Correlation

    def wire(self) -> dict[str, Any]:
        """JSON-safe dict with the protocol's field names (camelCase correlation)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def encode(self) -> bytes:
        """The message as UTF-8 JSON bytes."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class Request(_LamBase):
    """Ask an agent to perform ``task`` (or ``intent`` with slots in ``payload``)."""

    type: Literal["request"] = "request"


class Inform(_LamBase):
    """Information or a (partial) result."""

    type: Literal["inform"] = "inform"


class Propose(_LamBase):
    """A proposal to be agreed or refused."""

    type: Literal["propose"] = "propose"


class Agree(_LamBase):
    """The request/proposal is accepted and will be performed."""

    type: Literal["agree"] = "agree"


class Refuse(_LamBase):
    """The request/proposal is declined; ``payload.reason`` says why."""

    type: Literal["refuse"] = "refuse"


class Confirm(_LamBase):
    """Confirms a proposal, an inform or a done."""

    type: Literal["confirm"] = "confirm"


class Failure(_LamBase):
    """An agreed request could not be completed; ``payload.reason`` says why."""

    type: Literal["failure"] = "failure"


class Done(_LamBase):
    """An agreed request is complete; ``payload`` carries the result."""

    type: Literal["done"] = "done"


class Discover(_LamBase):
    """Looks for agents offering a capability (``payload.capability``)."""

    type: Literal["discover"] = "discover"


class Offer(_LamBase):
    """Answers a discover: the sender offers a capability."""

    type: Literal["offer"] = "offer"


class Assign(_LamBase):
    """Assigns a task to an agent (typically after an offer)."""

    type: Literal["assign"] = "assign"


LamMessage: TypeAlias = Annotated[
    Request | Inform | Propose | Agree | Refuse | Confirm | Failure | Done | Discover | Offer
    | Assign,
    Field(discriminator="type"),
]
"""Any LAM message; pydantic picks the class from ``type``."""

_ADAPTER: TypeAdapter[LamMessage] = TypeAdapter(LamMessage)

_CLASSES: dict[str, type[_LamBase]] = {
    "request": Request, "inform": Inform, "propose": Propose, "agree": Agree,
    "refuse": Refuse, "confirm": Confirm, "failure": Failure, "done": Done,
    "discover": Discover, "offer": Offer, "assign": Assign,
}


def message_class(type_: str) -> type[_LamBase]:
    """The model class for a performative name."""
    return _CLASSES[type_]


# ----------------------------------------------------------------------------- decoding


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "<message>"


def _walk(doc: Any) -> Iterator[tuple[str, Any, int]]:
    """Yield (path, value, depth) for every node, iteratively (no recursion limit)."""
    stack: list[tuple[str, Any, int]] = [("", doc, 0)]
    while stack:
        path, value, depth = stack.pop()
        yield path, value, depth
        if isinstance(value, dict):
            for key, child in value.items():
                stack.append((f"{path}.{key}" if path else str(key), child, depth + 1))
        elif isinstance(value, list):
            for index, child in enumerate(value):
                stack.append((f"{path}[{index}]", child, depth + 1))


def check_limits(doc: Any, limits: LamLimits) -> None:
    """Enforce depth, string, key-count, task and recipient limits on a parsed document."""
    for path, value, depth in _walk(doc):
        where = path or "<message>"
        if depth > limits.max_payload_depth:
            raise ValidationFailed(
                where, "<nested value>", f"nesting must not exceed {limits.max_payload_depth} "
                "levels (lam.max_payload_depth)", quote=False,
            )
        if isinstance(value, str) and len(value) > limits.max_string_chars:
            raise ValidationFailed(
                where, value, f"strings must be at most {limits.max_string_chars} characters "
                f"(lam.max_string_chars), got {len(value)}",
            )
        if isinstance(value, dict) and len(value) > limits.max_keys_per_object:
            raise ValidationFailed(
                where, f"<object with {len(value)} keys>",
                f"objects must have at most {limits.max_keys_per_object} keys "
                "(lam.max_keys_per_object)", quote=False,
            )
    if isinstance(doc, dict):
        task = doc.get("task")
        if isinstance(task, str) and len(task) > limits.max_task_chars:
            raise ValidationFailed(
                "task", task, f"task must be at most {limits.max_task_chars} characters "
                f"(lam.max_task_chars), got {len(task)}",
            )
        to = doc.get("to")
        if isinstance(to, list) and len(to) > limits.max_recipients:
            raise ValidationFailed(
                "to", f"<{len(to)} recipients>", f"a message may have at most "
                f"{limits.max_recipients} recipients (lam.max_recipients)", quote=False,
            )


def parse_json(raw: bytes | str, *, max_bytes: int, field: str = "<body>") -> Any:
    """Parse JSON bytes with a size bound and duplicate-key rejection."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise PayloadTooLarge(
            field, f"<{size} bytes>", f"the body must be at most {max_bytes} bytes", quote=False
        )
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            field, raw[:40], f"must be UTF-8 encoded JSON ({exc.reason})"
        ) from exc
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise ValidationFailed(exc.key, "<duplicate key>", "JSON object keys must be unique",
                               quote=False) from exc
    except RecursionError as exc:
        raise ValidationFailed(field, "<deeply nested JSON>", "nesting is too deep",
                               quote=False) from exc
    except json.JSONDecodeError as exc:
        raise ValidationFailed(
            field, text[max(0, exc.pos - 20): exc.pos + 20],
            f"must be valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from exc


def pydantic_to_failed(exc: ValidationError, *, prefix: str = "") -> ValidationFailed:
    """Turn pydantic's errors into one ValidationFailed (all listed) with our path style."""
    errors: list[ValidationFailed] = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _CLASSES))
        path = _path(loc)
        if prefix:
            path = f"{prefix}.{path}" if path != "<message>" else prefix
        kind = err["type"]
        if kind == "extra_forbidden":
            rule = "unknown field; remove it (LAM messages reject unknown fields)"
        elif kind == "missing":
            rule = "field required"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            rule = "type must be one of " + ", ".join(MESSAGE_TYPES)
            path = f"{prefix}.type" if prefix else "type"
            raw_input = err.get("input")
            tag = raw_input.get("type", "<missing>") if isinstance(raw_input, dict) else raw_input
            errors.append(ValidationFailed(path, tag, rule, quote=tag != "<missing>"))
            continue
        else:
            rule = err["msg"]
            if rule.startswith("Value error, "):
                rule = rule[len("Value error, "):]
        value = "<missing>" if kind == "missing" else err.get("input")
        errors.append(ValidationFailed(path, value, rule, quote=kind != "missing"))
    return errors[0] if len(errors) == 1 else MultipleValidationFailed(errors)


WIRE_REQUIRED = ("id", "ts", "type", "sender", "to", "context", "correlation")
"""Fields every message on the wire must carry (the seed's minimal fields)."""


def validate(doc: Any, limits: LamLimits | None = None) -> LamMessage:
    """Validate an already-parsed JSON document as a LAM message."""
    limits = limits or LamLimits()
    if not isinstance(doc, dict):
        raise ValidationFailed("<message>", doc, "a LAM message must be a JSON object")
    check_limits(doc, limits)
    kind = doc.get("type")
    if "type" in doc and kind not in MESSAGE_TYPES:
        raise ValidationFailed("type", kind, "type must be one of " + ", ".join(MESSAGE_TYPES))
    missing = [name for name in WIRE_REQUIRED if name not in doc]
    if missing:
        raise MultipleValidationFailed(
            [ValidationFailed(name, "<missing>", "field required", quote=False) for name in missing]
        )
    if doc.get("type") == "request" and not (doc.get("task") or doc.get("intent")):
        raise ValidationFailed(
            "task", doc.get("task"), "a request needs a non-empty task (the text to act on) "
            "or an intent",
        )
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as exc:
        raise pydantic_to_failed(exc) from exc


def decode(
    raw: bytes | str, limits: LamLimits | None = None, *, content_type: str | None = None
) -> LamMessage:
    """The one place wire bytes become a LAM message. Every failure is a CallerError."""
    limits = limits or LamLimits()
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type: got {preview(content_type)}; LAM messages must be sent as "
                "application/json"
            )
    doc = parse_json(raw, max_bytes=limits.max_message_bytes)
    return validate(doc, limits)


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the whole protocol, as exported to docs/lam.schema.json."""
    schema = _ADAPTER.json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "LAM message"
    schema["description"] = (
        "Lumina Agent Message (LAM) protocol version " + PROTOCOL_VERSION + ". One of eleven "
        "performatives, discriminated by `type`. Generated from actors/lam.py by `make schema`."
    )
    return schema


def schema_text() -> str:
    """The schema as it is stored in docs/lam.schema.json."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------- building replies


def reply(
    to_message: _LamBase,
    type_: MessageType,
    *,
    sender: str | None = None,
    payload: Mapping[str, Any] | None = None,
    intent: str | None = None,
) -> LamMessage:
    """A reply to ``to_message``: addressed to its sender, same context and conversation,
    ``correlation.inReplyTo`` set. The sender defaults to the original's first recipient."""
    cls = _CLASSES[type_]
    if sender is not None:
        _agent_uri(sender)
    # Every field comes from a validated message (or is checked above): construct without
    # re-validating — replies are built on the orchestrator's hot path.
    msg = cls.model_construct(
        id=uuid.uuid4(), ts=datetime.now(UTC), version="1.0",
        sender=sender or to_message.to[0],
        to=(to_message.sender,),
        intent=intent if intent is not None else to_message.intent,
        task=None,
        payload=dict(payload or {}),
        context=to_message.context,
        correlation=Correlation.model_construct(
            conversation_id=to_message.correlation.conversation_id, in_reply_to=to_message.id
        ),
    )
    return msg  # type: ignore[return-value]


# ------------------------------------------------------------------ conversation protocol

REPLY_RULES: dict[str, frozenset[str]] = {
    "agree": frozenset({"request", "propose", "assign"}),
    "refuse": frozenset({"request", "propose", "assign", "discover"}),
    "inform": frozenset({"request", "assign", "inform", "discover"}),
    "failure": frozenset({"request", "assign"}),
    "done": frozenset({"request", "assign"}),
    "confirm": frozenset({"propose", "inform", "done"}),
    "offer": frozenset({"discover"}),
    "assign": frozenset({"offer"}),
    "propose": frozenset({"request", "discover", "propose"}),
    "request": frozenset(MESSAGE_TYPES),
    "discover": frozenset(),
}
"""For each type: the types of message it may answer (via ``correlation.inReplyTo``)."""

STARTERS: frozenset[str] = frozenset({"request", "inform", "propose", "discover", "assign"})
"""Types that may open a conversation (no ``inReplyTo``)."""

NEEDS_AGREEMENT: frozenset[str] = frozenset({"failure", "done"})
"""Replies that only follow a request/assign that was agreed first."""

_TERMINAL_REPLIES = frozenset({"refuse", "failure", "done"})

_State = Literal["open", "agreed", "refused", "closed"]


class Conversation:
    """FIPA-style state of one conversation: which messages were sent and how each stands.

    :meth:`check` raises :class:`ProtocolViolation` for an out-of-protocol message and
    :meth:`record` stores an accepted one. State is a plain dict so it can be snapshotted.
    """

    def __init__(self, conversation_id: str, messages: Mapping[str, tuple[str, str]] | None = None,
                 participants: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.conversation_id = conversation_id
        # message id -> (type, state)
        self.messages: dict[str, tuple[str, _State]] = {
            k: (t, s) for k, (t, s) in (messages or {}).items()  # type: ignore[misc]
        }
        # message id -> recipients (replies must come from one of them)
        self.participants: dict[str, tuple[str, ...]] = dict(participants or {})
        # ids changed since the last :meth:`take_dirty` (persisted incrementally)
        self.dirty: set[str] = set()

    def check(self, msg: _LamBase) -> None:
        """Raise ProtocolViolation if ``msg`` may not be sent now."""
        kind: str = getattr(msg, "type")  # noqa: B009 - every concrete class has it
        if msg.correlation.conversation_id != self.conversation_id:
            raise ProtocolViolation(
                f"message belongs to conversation {msg.correlation.conversation_id!r}, "
                f"not {self.conversation_id!r}", field="correlation.conversationId",
                value=msg.correlation.conversation_id,
            )
        if str(msg.id) in self.messages:
            raise ProtocolViolation(
                f"message id {msg.id} was already used in this conversation; every message "
                "needs a fresh id", field="id", value=str(msg.id),
            )
        parent_id = msg.correlation.in_reply_to
        if parent_id is None:
            if kind not in STARTERS:
                raise ProtocolViolation(
                    f"a {kind} answers another message: set correlation.inReplyTo to the id "
                    f"of the {' or '.join(sorted(REPLY_RULES[kind]))} it answers",
                    field="correlation.inReplyTo", value=None,
                )
            return
        parent = self.messages.get(str(parent_id))
        if parent is None:
            raise ProtocolViolation(
                f"correlation.inReplyTo names message {parent_id}, which is not part of "
                f"conversation {self.conversation_id!r}",
                field="correlation.inReplyTo", value=str(parent_id),
            )
        parent_type, parent_state = parent
        allowed = REPLY_RULES[kind]
        if parent_type not in allowed:
            answers = ", ".join(sorted(allowed)) or "nothing (it only opens conversations)"
            raise ProtocolViolation(
                f"a {kind} may not answer a {parent_type}; {kind} answers: {answers}",
                value=kind,
            )
        recipients = self.participants.get(str(parent_id), ())
        if recipients and msg.sender not in recipients:
            raise ProtocolViolation(
                f"only a recipient of message {parent_id} ({', '.join(recipients)}) may answer "
                f"it; got sender {msg.sender}", field="sender", value=msg.sender,
            )
        if parent_state in ("refused", "closed") and kind in ("agree", "refuse", *NEEDS_AGREEMENT,
                                                               "inform"):
            raise ProtocolViolation(
                f"the {parent_type} {parent_id} is already {parent_state}; no further {kind} "
                "may answer it", value=kind,
            )
        if kind in ("agree", "refuse") and parent_state == "agreed":
            raise ProtocolViolation(
                f"the {parent_type} {parent_id} was already agreed; a second {kind} is out of "
                "protocol", value=kind,
            )
        follows_agreement = kind in NEEDS_AGREEMENT or (
            kind == "inform" and parent_type in ("request", "assign")
        )
        if follows_agreement and parent_state != "agreed":
            raise ProtocolViolation(
                f"a {kind} follows an agreed {parent_type}: send agree for {parent_id} first",
                value=kind,
            )

    def record(self, msg: _LamBase) -> None:
        """Store an accepted message and advance the state of the message it answers."""
        kind: str = getattr(msg, "type")  # noqa: B009
        self.messages[str(msg.id)] = (kind, "open")
        self.participants[str(msg.id)] = tuple(msg.to)
        self.dirty.add(str(msg.id))
        parent_id = msg.correlation.in_reply_to
        if parent_id is None:
            return
        key = str(parent_id)
        parent_type, _ = self.messages[key]
        if kind == "agree":
            self.messages[key] = (parent_type, "agreed")
        elif kind == "refuse":
            self.messages[key] = (parent_type, "refused")
        elif kind in _TERMINAL_REPLIES:
            self.messages[key] = (parent_type, "closed")
        else:
            return
        self.dirty.add(key)

    def accept(self, msg: _LamBase) -> None:
        """:meth:`check` then :meth:`record`."""
        self.check(msg)
        self.record(msg)

    def state_of(self, message_id: str | uuid.UUID) -> str | None:
        """The protocol state of a message (open, agreed, refused, closed) or None."""
        entry = self.messages.get(str(message_id))
        return entry[1] if entry else None

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe copy of the state."""
        return {
            "conversation_id": self.conversation_id,
            "messages": {k: list(v) for k, v in self.messages.items()},
            "participants": {k: list(v) for k, v in self.participants.items()},
        }

    def take_dirty(self) -> dict[str, str]:
        """Hash fields (``m:<id>`` → ``type|state|to,to``) of the messages changed since the
        last call — the conversation is persisted incrementally, not rewritten whole."""
        out = {f"m:{mid}": "|".join((*self.messages[mid], ",".join(self.participants.get(
            mid, ())))) for mid in self.dirty if mid in self.messages}
        self.dirty.clear()
        return out

    @classmethod
    def from_fields(cls, conversation_id: str, fields: Mapping[Any, Any]) -> Conversation:
        """Rebuild from the hash fields written via :meth:`take_dirty`."""
        conv = cls(conversation_id)
        for name, value in fields.items():
            if not name.startswith("m:"):
                continue
            kind, state, to = [*value.split("|", 2), "", ""][:3]
            conv.messages[name[2:]] = (kind, state)
            conv.participants[name[2:]] = tuple(t for t in to.split(",") if t)
        return conv

    @classmethod
    def restore(cls, data: Mapping[str, Any]) -> Conversation:
        """Rebuild from :meth:`snapshot`."""
        return cls(
            data["conversation_id"],
            {k: (v[0], v[1]) for k, v in data["messages"].items()},
            {k: tuple(v) for k, v in data["participants"].items()},
        )


if __name__ == "__main__":  # `python -m actors.lam > docs/lam.schema.json`
    sys.stdout.write(schema_text())
