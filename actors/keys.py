"""Every Redis key name the scheduler uses, in one place.

Keys carry Redis Cluster hash tags (the part in braces) so that a cluster could hold them
later: everything one Lua script or one multi-key command touches shares a tag.

- ``{shard<n>}`` — a ConversationShard's inbox stream and its delayed-retry sorted set;
- ``{cap:<capability>}`` — a capability's priority streams, its replicas' own streams and
  alive markers, and the read cursor that keeps the priorities fair (one ``read`` script
  touches all of them);
- ``{t:<tenant>}`` — a tenant's jobs, indexes, idempotency keys, conversations and outboxes;
- ``{dlq}`` — the dead-letter stream.

Scripts that move an entry between two of these groups (a result from a task stream into a
shard inbox, a poison entry into the DLQ) are atomic on one server; on a cluster they would
have to become two steps with deduplication — see :mod:`actors.queue`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from actors.errors import ValidationFailed

PRIORITIES: Final = ("high", "normal", "low")
"""Priority streams of every capability, most urgent first."""

MAX_COMPONENT_CHARS: Final = 200
"""Longest tenant, id, capability or key component, characters."""

_BAD_COMPONENT = re.compile(r"[{}\s]")


def _component(field: str, value: str) -> str:
    """Check one key component: non-empty, short, no braces (they would break the hash tag)
    and no whitespace (it would break ``redis-cli`` and SCAN patterns)."""
    if not isinstance(value, str) or not value:
        raise ValidationFailed(field, value, "must be a non-empty string")
    if len(value) > MAX_COMPONENT_CHARS:
        raise ValidationFailed(
            field, value, f"must be at most {MAX_COMPONENT_CHARS} characters",
            hint="hash long client-supplied values before using them in a key",
        )
    if _BAD_COMPONENT.search(value):
        raise ValidationFailed(
            field, value, "must not contain braces or whitespace",
            hint="hash client-supplied values before using them in a key",
        )
    return value


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one ``prefix`` (``RedisSettings.key_prefix``; tests use a unique one)."""

    prefix: str

    def __post_init__(self) -> None:
        _component("redis.key_prefix", self.prefix)

    # ---------------------------------------------------------------- shards ({shard<n>})

    def _shard_tag(self, shard: int) -> str:
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
            raise ValidationFailed("shard", shard, "must be an integer >= 0")
        return f"{self.prefix}:{{shard{shard}}}"

    def shard_inbox(self, shard: int) -> str:
        """Stream: the mailbox of ConversationShard ``shard`` (messages, step results)."""
        return f"{self._shard_tag(shard)}:inbox"

    def shard_delayed(self, shard: int) -> str:
        """Sorted set: delayed retries of shard ``shard``, scored by due time (epoch s)."""
        return f"{self._shard_tag(shard)}:delayed"

    # ------------------------------------------------------- capabilities ({cap:<name>})

    def _cap_tag(self, capability: str) -> str:
        return f"{self.prefix}:{{cap:{_component('capability', capability)}}}"

    def task_stream(self, capability: str, priority: str) -> str:
        """Stream: steps for ``capability`` at ``priority`` (one of :data:`PRIORITIES`)."""
        if priority not in PRIORITIES:
            raise ValidationFailed(
                "priority", priority, f"must be one of {', '.join(PRIORITIES)}"
            )
        return f"{self._cap_tag(capability)}:tasks:{priority}"

    def task_streams(self, capability: str) -> tuple[str, str, str]:
        """The capability's three priority streams, high first."""
        high, normal, low = (self.task_stream(capability, p) for p in PRIORITIES)
        return high, normal, low

    def replica_stream(self, capability: str, replica_id: str) -> str:
        """Stream: session-affine steps for one executor replica (D8)."""
        return f"{self._cap_tag(capability)}:replica:{_component('replica_id', replica_id)}"

    def replica_alive(self, capability: str, replica_id: str) -> str:
        """String with a TTL: present while the replica renews it (it owns sessions)."""
        return f"{self._cap_tag(capability)}:alive:{_component('replica_id', replica_id)}"

    def read_cursor(self, capability: str) -> str:
        """String: position in the weighted priority pattern, shared by all consumers."""
        return f"{self._cap_tag(capability)}:cursor"

    # ------------------------------------------------------------------ the DLQ ({dlq})

    def dlq(self) -> str:
        """Stream: dead letters (poison entries, exhausted retries), replayable."""
        return f"{self.prefix}:{{dlq}}:dead"

    # -------------------------------------------------------------- tenants ({t:<name>})

    def _tenant_tag(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{_component('tenant', tenant)}}}"

    def job(self, tenant: str, job_id: str) -> str:
        """Hash: one job's state."""
        return f"{self._tenant_tag(tenant)}:job:{_component('job_id', job_id)}"

    def jobs_index(self, tenant: str) -> str:
        """Sorted set: the tenant's job ids by creation time."""
        return f"{self._tenant_tag(tenant)}:jobs"

    def jobs_by_status(self, tenant: str, status: str) -> str:
        """Sorted set: the tenant's job ids in ``status``."""
        return f"{self._tenant_tag(tenant)}:jobs:status:{_component('status', status)}"

    def idempotency(self, tenant: str, key: str) -> str:
        """String with a TTL: intake id / Idempotency-Key → job id."""
        return f"{self._tenant_tag(tenant)}:idem:{_component('idempotency_key', key)}"

    def conversation(self, tenant: str, conversation_id: str) -> str:
        """Hash/stream: a conversation's journal and snapshot."""
        cid = _component("conversation_id", conversation_id)
        return f"{self._tenant_tag(tenant)}:conv:{cid}"

    def outbox(self, tenant: str, conversation_id: str) -> str:
        """Stream: LAM replies waiting to be delivered to the channel."""
        cid = _component("conversation_id", conversation_id)
        return f"{self._tenant_tag(tenant)}:outbox:{cid}"

    def events_channel(self, tenant: str, job_id: str) -> str:
        """Pub/Sub channel: live progress of one job (lossy, never state)."""
        return f"{self._tenant_tag(tenant)}:events:{_component('job_id', job_id)}"
