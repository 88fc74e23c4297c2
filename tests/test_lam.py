"""LAM protocol: models, decoding limits, conversation rules, schema export."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import lam
from actors.errors import (
    MultipleValidationFailed,
    PayloadTooLarge,
    ProtocolViolation,
    UnsupportedMediaType,
    ValidationFailed,
)
from actors.settings import LamLimits

ROOT = Path(__file__).resolve().parent.parent


def wire(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "ts": "2025-10-30T09:45:00Z",
        "type": "request",
        "sender": "agent://orchestrator/Marketing",
        "to": ["agent://worker/Analysis"],
        "intent": "analyse",
        "task": "Analysiere Q3 Churn",
        "payload": {},
        "context": {"tenant": "acme", "domain": "crm", "locale": "de-DE"},
        "correlation": {"conversationId": "conv-123"},
    }
    doc.update(overrides)
    return doc


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_seed_example_decodes_to_request() -> None:
    msg = lam.decode(enc(wire(correlation={"conversationId": "conv-123",
                                           "inReplyTo": str(uuid.uuid4())})))
    assert isinstance(msg, lam.Request)
    assert msg.context.tenant == "acme"
    assert msg.correlation.conversation_id == "conv-123"
    assert msg.correlation.in_reply_to is not None


@pytest.mark.parametrize("type_", lam.MESSAGE_TYPES)
def test_every_type_decodes_to_its_class(type_: str) -> None:
    msg = lam.decode(enc(wire(type=type_)))
    assert type(msg) is lam.message_class(type_)
    assert msg.type == type_
    assert len(lam.MESSAGE_TYPES) == 11


def test_unknown_type_names_allowed_types() -> None:
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(type="shout")))
    assert err.value.field == "type"
    assert "'shout'" in err.value.value
    assert "request" in err.value.rule and "assign" in err.value.rule


def test_unknown_field_rejected_with_its_name() -> None:
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(colour="red")))
    assert err.value.field == "colour"
    assert "unknown field" in err.value.rule


def test_unknown_nested_field_rejected() -> None:
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(context={"tenant": "acme", "region": "eu"})))
    assert err.value.field == "context.region"


@pytest.mark.parametrize("field", ["id", "ts", "sender", "to", "context", "correlation"])
def test_minimal_fields_required(field: str) -> None:
    doc = wire()
    del doc[field]
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(doc))
    assert err.value.field == field
    assert err.value.rule == "field required"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("sender", "bob@example.com", "agent URI"),
        ("to", ["agent://worker/x", "http://evil"], "agent URI"),
        ("ts", "2025-10-30T09:45:00", "time zone"),
        ("ts", "yesterday", "datetime"),
        ("id", "not-a-uuid", "UUID"),
    ],
)
def test_bad_values_name_field_value_rule(field: str, value: Any, needle: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(**{field: value})))
    assert err.value.field.startswith(field)
    assert needle.lower() in err.value.rule.lower()
    assert err.value.value != ""


def test_request_needs_task_or_intent() -> None:
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(task=None, intent=None)))
    assert err.value.field == "task"


def test_several_errors_are_all_listed() -> None:
    with pytest.raises(MultipleValidationFailed) as err:
        lam.decode(enc(wire(sender="x", to=[], extra=1)))
    fields = {e["field"] for e in err.value.to_dict()["errors"]}
    assert fields == {"sender", "to", "extra"}


# ---------------------------------------------------------------------------- limits


def test_message_size_limit() -> None:
    limits = LamLimits(max_message_bytes=2048)
    doc = wire(payload={"blob": "x" * 3000})
    with pytest.raises(PayloadTooLarge) as err:
        lam.decode(enc(doc), limits)
    assert err.value.status_code == 413
    assert "2048" in err.value.rule


def test_payload_depth_limit() -> None:
    nested: Any = 1
    for _ in range(40):
        nested = {"n": nested}
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(payload=nested)), LamLimits(max_payload_depth=16))
    assert err.value.field.startswith("payload.n.n")
    assert "16" in err.value.rule


def test_very_deep_json_is_a_clean_error() -> None:
    raw = b'{"payload":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ValidationFailed):
        lam.decode(raw, LamLimits(max_message_bytes=1_048_576))


def test_string_length_limit_quotes_truncated_value() -> None:
    limits = LamLimits(max_string_chars=100)
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(payload={"note": "y" * 500})), limits)
    assert err.value.field == "payload.note"
    assert len(err.value.value) <= 80
    assert "100" in err.value.rule


def test_task_length_limit() -> None:
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(task="t" * 200)), LamLimits(max_task_chars=100))
    assert err.value.field == "task"


def test_recipient_limit() -> None:
    to = [f"agent://worker/w{i}" for i in range(10)]
    with pytest.raises(ValidationFailed) as err:
        lam.decode(enc(wire(to=to)), LamLimits(max_recipients=5))
    assert err.value.field == "to"
    assert "5" in err.value.rule


def test_duplicate_keys_rejected() -> None:
    raw = enc(wire())[:-1] + b', "type": "inform"}'
    with pytest.raises(ValidationFailed) as err:
        lam.decode(raw)
    assert err.value.field == "type"
    assert "unique" in err.value.rule


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b"\xff\xfe", b'"text"'])
def test_garbage_is_a_validation_error(raw: bytes) -> None:
    with pytest.raises(ValidationFailed):
        lam.decode(raw)


def test_content_type_must_be_json() -> None:
    with pytest.raises(UnsupportedMediaType):
        lam.decode(enc(wire()), content_type="text/plain")
    assert lam.decode(enc(wire()), content_type="application/json; charset=utf-8")


# -------------------------------------------------------------------- round trips


agent = st.from_regex(r"agent://[a-z]{1,8}/[A-Za-z0-9]{1,12}", fullmatch=True)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                      st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    type_=st.sampled_from(lam.MESSAGE_TYPES),
    sender=agent,
    to=st.lists(agent, min_size=1, max_size=5),
    task=st.text(min_size=1, max_size=50),
    payload=st.dictionaries(st.text(max_size=8), json_value, max_size=5),
    conversation=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,30}", fullmatch=True),
    reply_to=st.one_of(st.none(), st.uuids()),
)
def test_round_trip(type_: str, sender: str, to: list[str], task: str, payload: dict[str, Any],
                    conversation: str, reply_to: uuid.UUID | None) -> None:
    correlation: dict[str, Any] = {"conversationId": conversation}
    if reply_to is not None:
        correlation["inReplyTo"] = str(reply_to)
    doc = wire(type=type_, sender=sender, to=to, task=task, payload=payload,
               correlation=correlation)
    msg = lam.decode(enc(doc))
    again = lam.decode(msg.encode())
    assert again == msg
    assert again.wire() == msg.wire()
    assert msg.wire()["correlation"]["conversationId"] == conversation


def test_models_are_frozen() -> None:
    msg = lam.decode(enc(wire()))
    with pytest.raises(Exception, match="frozen"):
        msg.task = "other"  # type: ignore[misc]


# ------------------------------------------------------------------- conversation rules


def _req() -> lam.Request:
    msg = lam.decode(enc(wire(to=["agent://scheduler/cpa"])))
    assert isinstance(msg, lam.Request)
    return msg


def test_request_agree_inform_done_is_in_protocol() -> None:
    conv = lam.Conversation("conv-123")
    req = _req()
    conv.accept(req)
    conv.accept(lam.reply(req, "agree"))
    assert conv.state_of(req.id) == "agreed"
    conv.accept(lam.reply(req, "inform", payload={"progress": 0.5}))
    conv.accept(lam.reply(req, "done", payload={"result": "ok"}))
    assert conv.state_of(req.id) == "closed"


def test_done_before_agree_is_rejected() -> None:
    conv = lam.Conversation("conv-123")
    req = _req()
    conv.accept(req)
    with pytest.raises(ProtocolViolation, match="agree"):
        conv.accept(lam.reply(req, "done"))


def test_nothing_after_refuse() -> None:
    conv = lam.Conversation("conv-123")
    req = _req()
    conv.accept(req)
    conv.accept(lam.reply(req, "refuse", payload={"reason": "no intent"}))
    for kind in ("agree", "inform", "done", "failure"):
        with pytest.raises(ProtocolViolation, match="refused"):
            conv.check(lam.reply(req, kind))  # type: ignore[arg-type]


def test_second_agree_rejected() -> None:
    conv = lam.Conversation("conv-123")
    req = _req()
    conv.accept(req)
    conv.accept(lam.reply(req, "agree"))
    with pytest.raises(ProtocolViolation, match="already agreed"):
        conv.accept(lam.reply(req, "agree"))


@pytest.mark.parametrize(
    ("parent", "child", "ok"),
    [
        ("discover", "offer", True),
        ("request", "offer", False),
        ("propose", "agree", True),
        ("propose", "refuse", True),
        ("inform", "agree", False),
        ("offer", "assign", True),
        ("done", "confirm", False),  # done is not a starter, exercised below
    ],
)
def test_reply_table(parent: str, child: str, ok: bool) -> None:
    if parent == "done":
        return
    conv = lam.Conversation("conv-123")
    first = lam.decode(enc(wire(type=parent, to=["agent://scheduler/cpa"])))
    if parent == "offer":
        disc = lam.decode(enc(wire(type="discover", to=["agent://worker/w"])))
        conv.accept(disc)
        first = lam.reply(disc, "offer", sender="agent://worker/w")
        conv.accept(first)
        answer = lam.reply(first, child)  # type: ignore[arg-type]
    else:
        conv.accept(first)
        answer = lam.reply(first, child)  # type: ignore[arg-type]
    if ok:
        conv.accept(answer)
    else:
        with pytest.raises(ProtocolViolation, match=f"may not answer a {parent}"):
            conv.accept(answer)


def test_reply_type_without_in_reply_to_is_rejected() -> None:
    conv = lam.Conversation("conv-123")
    agree = lam.decode(enc(wire(type="agree")))
    with pytest.raises(ProtocolViolation) as err:
        conv.accept(agree)
    assert err.value.field == "correlation.inReplyTo"


def test_reply_to_unknown_message_rejected() -> None:
    conv = lam.Conversation("conv-123")
    msg = lam.decode(enc(wire(type="done", correlation={"conversationId": "conv-123",
                                                          "inReplyTo": str(uuid.uuid4())})))
    with pytest.raises(ProtocolViolation, match="not part of conversation"):
        conv.accept(msg)


def test_only_recipients_may_answer() -> None:
    conv = lam.Conversation("conv-123")
    req = _req()
    conv.accept(req)
    with pytest.raises(ProtocolViolation, match="only a recipient"):
        conv.accept(lam.reply(req, "agree", sender="agent://intruder/x"))


def test_conversation_snapshot_restore() -> None:
    conv = lam.Conversation("conv-123")
    req = _req()
    conv.accept(req)
    conv.accept(lam.reply(req, "agree"))
    restored = lam.Conversation.restore(json.loads(json.dumps(conv.snapshot())))
    assert restored.state_of(req.id) == "agreed"
    with pytest.raises(ProtocolViolation):
        restored.accept(lam.reply(req, "agree"))


def test_reply_keeps_context_and_threads() -> None:
    req = _req()
    ans = lam.reply(req, "inform", payload={"job_id": "j1"})
    assert ans.to == (req.sender,)
    assert ans.sender == req.to[0]
    assert ans.correlation.in_reply_to == req.id
    assert ans.context == req.context


# ------------------------------------------------------------------------------ schema


def test_schema_file_is_current() -> None:
    path = ROOT / "docs" / "lam.schema.json"
    assert path.read_text() == lam.schema_text(), "run `make schema` and commit the result"


def test_schema_covers_all_types() -> None:
    schema = lam.json_schema()
    mapping = schema["discriminator"]["mapping"]
    assert set(mapping) == set(lam.MESSAGE_TYPES)
