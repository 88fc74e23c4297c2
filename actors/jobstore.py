"""Job records in Redis: durable intake, loading, listing.

Intake is one Lua script, so a job is either fully accepted (idempotency key, job hash,
indexes and the submit entry in its shard's inbox) or not at all — never half-written.
The Orchestrator that owns the job is the only writer afterwards (see ``actors.shard``).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from actors.errors import CpaError, IdempotencyMismatch, InternalError, NotFound
from actors.jobs import Job, JobMeta, JobStatus, StepState
from actors.keys import Keys
from actors.redisconn import redis_errors
from actors.settings import GraphLimits

INBOX_GROUP = "cpa"

_INTAKE_LUA = """
-- KEYS: 1 idempotency key ('' slot unused when ARGV[1]=='0'), 2 job hash, 3 tenant index,
--       4 status index, 5 shard inbox
-- ARGV: 1 use_idem, 2 job_id, 3 body_hash, 4 idem ttl, 5 created_at, 6 inbox maxlen,
--       7.. hash field/value pairs count n, then n*2 values, then inbox field/value pairs
if ARGV[1] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    return {0, existing}
  end
end
local n = tonumber(ARGV[7])
local fields = {}
for i = 1, n * 2 do fields[i] = ARGV[7 + i] end
if redis.call('EXISTS', KEYS[2]) == 1 then
  -- Our own earlier run of this very call (the client retried it after the reply was lost:
  -- same job id and intake time): the job is accepted. Anything else is an id collision.
  if redis.call('HGET', KEYS[2], 'created_at') == ARGV[5] then
    return {1, ARGV[2]}
  end
  return {2, ARGV[2]}
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[2])
local entry = {}
for i = 8 + n * 2, #ARGV do entry[#entry + 1] = ARGV[i] end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', unpack(entry))
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], ARGV[2] .. '|' .. ARGV[3], 'EX', ARGV[4])
end
return {1, ARGV[2]}
"""


def shard_for(tenant: str, conversation_id: str, shards: int) -> int:
    """Stable mapping of a conversation to a shard (same on every process and restart)."""
    return zlib.crc32(f"{tenant}\x00{conversation_id}".encode()) % shards


def body_hash(body: Any) -> str:
    """Hash of a request body for idempotency comparison (key order does not matter)."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def new_job_id() -> str:
    """A fresh job id (uuid4 hex)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Accepted:
    """Result of an intake: ``created`` is False for an idempotent repeat."""

    job_id: str
    conversation_id: str
    created: bool
    status: str


SUMMARY_FIELDS = ("status", "updated_at", "created_at", "conv", "intent", "priority", "steps",
                  "error")


class JobStore:
    """Reads and creates job records. Writes after intake belong to the shard."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, shards: int,
                 idempotency_ttl_s: int = 86_400, inbox_maxlen: int = 1_000_000,
                 graph_limits: GraphLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        self.idempotency_ttl_s = idempotency_ttl_s
        self.inbox_maxlen = inbox_maxlen
        self.graph_limits = graph_limits
        self.clock = clock
        self._intake = redis.register_script(_INTAKE_LUA)

    async def submit(self, meta: JobMeta, *, idempotency_key: str | None,
                     body_digest: str) -> Accepted:
        """Durably accept a job: after this returns, it will run even if everything restarts.

        A repeated idempotency key with the same body returns the original job; with a
        different body it raises :class:`IdempotencyMismatch`.
        """
        keys, args = self._intake_call(meta, idempotency_key, body_digest)
        with redis_errors("intake"):
            code, value = await self._intake(keys=keys, args=args)
        value = value.decode() if isinstance(value, bytes) else str(value)
        if int(code) == 1:
            return Accepted(meta.job_id, meta.conversation_id, True, JobStatus.QUEUED.value)
        if int(code) == 2:
            raise InternalError(f"job id {meta.job_id} already exists; job ids must be fresh")
        original_id = _original_job(value, idempotency_key, body_digest)
        summary = await self.summary(meta.tenant, original_id)
        conv = summary["conversation_id"] if summary else meta.conversation_id
        status = summary["status"] if summary else JobStatus.QUEUED.value
        return Accepted(original_id, conv, False, status)

    def _intake_call(self, meta: JobMeta, idempotency_key: str | None, body_digest: str
                     ) -> tuple[list[str], list[str]]:
        meta.shard = shard_for(meta.tenant, meta.conversation_id, self.shards)
        created = meta.created_at or self.clock()
        meta.created_at = created
        fields: dict[str, str] = {
            "meta": meta.to_json(), "status": JobStatus.QUEUED.value,
            "updated_at": repr(created), "created_at": repr(created),
            "conv": meta.conversation_id, "intent": meta.intent or "",
            "priority": meta.priority, "steps": str(len(meta.todos)),
        }
        flat_fields = [x for kv in fields.items() for x in kv]
        entry = ["k", "submit", "t", meta.tenant, "c", meta.conversation_id, "j", meta.job_id]
        if meta.new_conversation:
            entry += ["n", "1"]  # the shard need not look up the conversation's history
        idem_key = (self.keys.idempotency(meta.tenant, _idem_component(idempotency_key))
                    if idempotency_key else self.keys.idempotency(meta.tenant, "-"))
        keys = [idem_key, self.keys.job(meta.tenant, meta.job_id),
                self.keys.jobs_index(meta.tenant),
                self.keys.jobs_by_status(meta.tenant, JobStatus.QUEUED.value),
                self.keys.shard_inbox(meta.shard)]
        args = ["1" if idempotency_key else "0", meta.job_id, body_digest,
                str(self.idempotency_ttl_s), repr(created), str(self.inbox_maxlen),
                str(len(fields)), *flat_fields, *entry]
        return keys, args

    async def submit_many(self, metas: list[JobMeta]) -> list[Accepted]:
        """Accept many jobs (no idempotency keys) in one round trip; each job atomically."""
        pipe = self.redis.pipeline(transaction=False)
        for meta in metas:
            keys, args = self._intake_call(meta, None, "")
            await self._intake(keys=keys, args=args, client=pipe)
        with redis_errors("batch intake"):
            replies = await pipe.execute()
        out = []
        for meta, (code, _) in zip(metas, replies, strict=True):
            if int(code) != 1:
                raise InternalError(f"job id {meta.job_id} already exists")
            out.append(Accepted(meta.job_id, meta.conversation_id, True,
                                JobStatus.QUEUED.value))
        return out

    @property
    def intake_script(self) -> tuple[str, str]:
        """(SHA1, source) of the intake script, for callers that pipeline raw EVALSHAs."""
        return str(self._intake.sha), _INTAKE_LUA

    def intake_command(self, meta: JobMeta, idempotency_key: str | None, body_digest: str
                       ) -> tuple[Any, ...]:
        """The EVALSHA command of one job's intake, for the caller's own pipeline (several
        jobs, each with its own idempotency key, in one round trip; each atomic). Turn the
        replies into results with :meth:`intake_outcomes`."""
        keys, args = self._intake_call(meta, idempotency_key, body_digest)
        return ("EVALSHA", self._intake.sha, len(keys), *keys, *args)

    async def intake_outcomes(self, items: list[tuple[JobMeta, str | None, str, Any]]
                              ) -> list[Accepted | CpaError]:
        """(meta, idempotency key, body digest, intake reply) → Accepted, or the error of
        that job (IdempotencyMismatch, InternalError). Repeats of a key cost one more round
        trip for all of them together (the original jobs' summaries)."""
        out: list[Accepted | CpaError] = []
        repeats: list[tuple[int, str]] = []
        for meta, key, digest, (code, raw) in items:
            value = raw.decode() if isinstance(raw, bytes) else str(raw)
            if int(code) == 1:
                out.append(Accepted(meta.job_id, meta.conversation_id, True,
                                    JobStatus.QUEUED.value))
            elif int(code) == 2:
                out.append(InternalError(f"job id {meta.job_id} already exists"))
            else:
                try:
                    repeats.append((len(out), _original_job(value, key, digest)))
                    out.append(InternalError("unresolved repeat"))
                except IdempotencyMismatch as exc:
                    out.append(exc)
        if repeats:
            pipe = self.redis.pipeline(transaction=False)
            for index, original in repeats:
                pipe.hmget(self.keys.job(items[index][0].tenant, original),
                           list(SUMMARY_FIELDS))
            with redis_errors("idempotent repeats"):
                rows = await pipe.execute()
            for (index, original), row in zip(repeats, rows, strict=True):
                meta = items[index][0]
                summary = _summary(original, row)
                out[index] = Accepted(
                    original, summary["conversation_id"] if summary else meta.conversation_id,
                    False, summary["status"] if summary else JobStatus.QUEUED.value)
        return out

    async def load(self, tenant: str, job_id: str) -> Job:
        """The whole job (graph and every step). Another tenant's job is NotFound."""
        if not _plausible_id(job_id):
            raise NotFound(f"job {job_id[:80]!r} not found")
        with redis_errors("load job"):
            raw = await self.redis.hgetall(self.keys.job(tenant, job_id))
        if not raw:
            raise NotFound(f"job {job_id!r} not found")
        return job_from_hash(raw, self.graph_limits)

    async def summary(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        """Small view of a job without its graph (for lists and idempotent repeats)."""
        with redis_errors("job summary"):
            values = await self.redis.hmget(self.keys.job(tenant, job_id), list(SUMMARY_FIELDS))
        return _summary(job_id, values)

    async def list(self, tenant: str, *, status: str | None, offset: int, limit: int
                   ) -> tuple[list[dict[str, Any]], int]:
        """Newest first; returns (page, total)."""
        index = (self.keys.jobs_by_status(tenant, status) if status
                 else self.keys.jobs_index(tenant))
        with redis_errors("list jobs"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrevrange(index, offset, offset + limit - 1)
            pipe.zcard(index)
            ids_raw, total = await pipe.execute()
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids_raw]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self.keys.job(tenant, job_id), list(SUMMARY_FIELDS))
            rows = await pipe.execute() if ids else []
        out = [s for s in (_summary(j, r) for j, r in zip(ids, rows, strict=True)) if s]
        return out, int(total)

    async def shard_of(self, tenant: str, job_id: str) -> tuple[int, str]:
        """(shard, conversation id) of an existing job; NotFound otherwise."""
        if not _plausible_id(job_id):
            raise NotFound(f"job {job_id[:80]!r} not found")
        with redis_errors("job lookup"):
            meta_raw = await self.redis.hget(self.keys.job(tenant, job_id), "meta")
        if meta_raw is None:
            raise NotFound(f"job {job_id!r} not found")
        meta = json.loads(meta_raw)
        return int(meta["shard"]), str(meta["conversation_id"])

    async def send_control(self, tenant: str, job_id: str, kind: str,
                           extra: dict[str, str] | None = None) -> None:
        """Durably append a control event (cancel, retry) to the job's shard inbox."""
        shard, conv = await self.shard_of(tenant, job_id)
        fields = {"k": kind, "t": tenant, "c": conv, "j": job_id, **(extra or {})}
        with redis_errors("control append"):
            await self.redis.xadd(self.keys.shard_inbox(shard), fields,  # type: ignore[arg-type]
                                  maxlen=self.inbox_maxlen, approximate=True)


def _original_job(value: str, idempotency_key: str | None, body_digest: str) -> str:
    """The job an idempotency key already names (``id|hash``); a different body is an
    IdempotencyMismatch."""
    original_id, _, original_hash = value.partition("|")
    if original_hash != body_digest:
        raise IdempotencyMismatch(idempotency_key or "", original_id)
    return original_id


def _idem_component(key: str) -> str:
    # Keys are user-controlled: hash them so any string is a safe key component.
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _plausible_id(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and all(c in "0123456789abcdefABCDEF-_" for c in job_id)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _summary(job_id: str, values: list[Any]) -> dict[str, Any] | None:
    data = dict(zip(SUMMARY_FIELDS, (_text(v) for v in values), strict=True))
    if data["status"] is None:
        return None
    out: dict[str, Any] = {
        "job_id": job_id,
        "conversation_id": data["conv"],
        "status": data["status"],
        "intent": data["intent"] or None,
        "priority": data["priority"],
        "steps_total": int(data["steps"] or 0),
        "created_at": float(data["created_at"] or 0),
        "updated_at": float(data["updated_at"] or 0),
    }
    if data["error"]:
        out["error"] = data["error"]
    return out


def job_from_hash(raw: dict[Any, Any], limits: GraphLimits | None = None) -> Job:
    """Rebuild a Job from its Redis hash."""
    fields = {(_text(k) or ""): v for k, v in raw.items()}
    meta = JobMeta.from_json(fields["meta"])
    job = Job.new(meta, limits)
    job.status = JobStatus(_text(fields.get("status")) or "queued")
    job.updated_at = float(_text(fields.get("updated_at")) or meta.created_at)
    job.error = _text(fields.get("error")) or None
    sessions = fields.get("sessions")
    if sessions:
        job.sessions = json.loads(sessions)
    restarts = fields.get("session_restarts")
    if restarts:
        job.session_restarts = json.loads(restarts)
    for name, value in fields.items():
        if name.startswith("s:"):
            index = int(name[2:])
            if 0 <= index < len(job.steps):
                job.steps[index] = StepState.from_json(value)
    return job


def job_to_fields(job: Job, changed_steps: set[int] | None, *, job_changed: bool
                  ) -> dict[str, str]:
    """The hash fields to write after a change."""
    out: dict[str, str] = {}
    for i in sorted(changed_steps or ()):
        out[f"s:{i}"] = job.steps[i].to_json()
    if job_changed:
        out["status"] = job.status.value
        out["updated_at"] = repr(job.updated_at)
        out["error"] = job.error or ""
        out["sessions"] = json.dumps(job.sessions, separators=(",", ":"))
        out["session_restarts"] = json.dumps(job.session_restarts, separators=(",", ":"))
    return out
