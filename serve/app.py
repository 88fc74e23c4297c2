"""The HTTP/WebSocket API (FastAPI). Runs under Ray Serve (``serve.deployment``) and, for
tests and a Ray-less dev mode, under any ASGI server.

Every accepted request is durably appended to Redis before its 202. Bad input is a 4xx
naming the field, the value and the rule; a dependency that is down is a 503 with
Retry-After; nothing here answers 5xx for a client's mistake. The Redis work of one request
has a time budget (``http.redis_budget_s``, :class:`serve.services.RedisBudget`): a hung
Redis is answered 503 within it, not after socket timeouts. Live WebSocket updates are exempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors import lam
from actors.errors import (
    CpaError,
    DependencyUnavailable,
    InternalError,
    NoIntent,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    Unauthenticated,
    UnsupportedMediaType,
    ValidationFailed,
)
from actors.graph import build_graph
from actors.jobs import PRIORITIES, JobMeta, JobStatus
from actors.jobstore import body_hash, new_job_id
from actors.orchestrator import SCHEDULER_AGENT
from actors.redisconn import ping
from actors.settings import ApiKey, Settings
from serve.health import health_report
from serve.schemas import ScheduleRequest
from serve.services import RedisBudget, Services

HTTP_CHANNEL_AGENT = "agent://channel/http"
log = logging.getLogger(__name__)


class _Guard:
    """Pure ASGI middleware: counts responses by route and status, and turns an unexpected
    exception into a JSON 503 (Redis gone) or 500 instead of a bare traceback. (Starlette's
    BaseHTTPMiddleware cost ~10% of the ingress CPU per request.)"""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"status": 500, "started": False}

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:
            if state["started"]:
                raise
            if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
                response = JSONResponse(DependencyUnavailable("redis", str(exc)).to_dict(),
                                        status_code=503, headers={"Retry-After": "1"})
            else:
                response = JSONResponse({"error": "internal", "retryable": True,
                                         "message": type(exc).__name__}, status_code=500)
            state["status"] = response.status_code
            await response(scope, receive, send)
        route = scope.get("route")
        self.counter.labels(getattr(route, "path", "other"), str(state["status"])).inc()


@dataclass(slots=True)
class _LamOp:
    """One validated LAM message of /lam/message or /lam/stream, ready for Redis: a job to
    create (``meta``), a refused request (``refuse``), or another performative to check
    against its conversation (``check``) and append to the shard inbox."""

    msg: lam.LamMessage
    meta: JobMeta | None = None
    digest: str = ""
    intent: str | None = None
    slots: dict[str, Any] = field(default_factory=dict)
    refuse: str | None = None
    check: bool = False


def _as_error(exc: BaseException) -> CpaError:
    """Any failure of one message as the error its result carries."""
    if isinstance(exc, CpaError):
        return exc
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        return DependencyUnavailable("redis", f"{type(exc).__name__}: {exc}")
    log.exception("unexpected error handling a LAM message", exc_info=exc)
    return InternalError(f"internal error ({type(exc).__name__})")


def _result(exc: CpaError) -> dict[str, Any]:
    """The body /lam/message answers for an error, plus ``code`` (its HTTP status)."""
    return {**exc.to_dict(), "code": exc.status_code}


def create_app(settings: Settings | None = None,
               settings_provider: Callable[[], Settings | None] | None = None) -> FastAPI:
    """Build the API. Services are created lazily in the serving process, from ``settings``,
    else from ``settings_provider()`` (the Serve replica's own), else from the config files."""
    app = FastAPI(title="CPA Scheduler", version="0.1.0",
                  description="LAM-protocol orchestration core (see docs/api.md)")
    app.state.settings = settings
    app.state.services = None
    app.state.lock = asyncio.Lock()
    registry = CollectorRegistry()
    app.state.registry = registry
    requests_total = Counter("cpa_http_requests", "HTTP requests", ["route", "code"],
                             registry=registry)
    accepted_total = Counter("cpa_jobs_accepted", "Jobs durably accepted", ["tenant"],
                             registry=registry)

    async def services(request: Request | WebSocket) -> Services:
        svc: Services | None = request.app.state.services
        if svc is None:
            async with request.app.state.lock:
                svc = request.app.state.services
                if svc is None:
                    resolved = request.app.state.settings
                    if resolved is None and settings_provider is not None:
                        resolved = settings_provider()
                    svc = Services.create(resolved)
                    request.app.state.services = svc
        return svc

    def tenant_of(svc: Services, key: str | None) -> ApiKey:
        if not key:
            raise Unauthenticated("missing X-API-Key header")
        record = svc.settings.tenant_for_key(key)
        if record is None:
            raise Unauthenticated("unknown API key")
        return record

    @app.exception_handler(CpaError)
    async def _cpa_error(request: Request, exc: CpaError) -> JSONResponse:
        headers = {}
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "ApiKey"
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        err = DependencyUnavailable("redis", f"{type(exc).__name__}: {exc}")
        return await _cpa_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path", "header")]
            errors.append({"field": ".".join(loc) or "<request>", "value": repr(
                err.get("input"))[:80], "rule": err["msg"]})
        first = errors[0] if errors else {"field": "<request>", "value": "", "rule": "invalid"}
        return JSONResponse({"error": "validation_failed",
                             "message": f"{first['field']}: got {first['value']}; "
                                        f"{first['rule']}", **first, "errors": errors,
                             "retryable": False}, status_code=422)

    app.add_middleware(_Guard, counter=requests_total)

    # ------------------------------------------------------------------- intake

    async def read_json(request: Request, svc: Services, limit: int | None = None,
                        check: bool = True) -> Any:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type: got {ctype[:60]!r}; send the body as application/json")
        limit = limit or svc.settings.http.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge("<body>", f"<{declared} bytes>",
                                  f"the body must be at most {limit} bytes", quote=False)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge("<body>", f"<more than {limit} bytes>",
                                      f"the body must be at most {limit} bytes", quote=False)
            chunks.append(chunk)
        doc = lam.parse_json(b"".join(chunks), max_bytes=limit)
        if check:
            lam.check_limits(doc, svc.settings.lam)
        return doc

    def idempotency_key(request: Request) -> str | None:
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 256:
            raise ValidationFailed("Idempotency-Key", key, "must be 1..256 characters")
        return key

    async def admit(svc: Services, key: ApiKey, budget: RedisBudget) -> None:
        """Per-tenant rate limit (429), then backpressure (503) while too much work waits."""
        wait_s = svc.take_token(key.tenant)
        if wait_s > 0:
            raise RateLimited(f"tenant {key.tenant} is over its rate of "
                              f"{svc.settings.http.tenant_rate_per_s:g} requests/s",
                              retry_after_s=max(1.0, wait_s))
        backlog = svc.cached_backlog()
        if backlog is None:
            async with budget:
                backlog = await svc.backlog()
        if backlog > svc.settings.http.max_backlog:
            raise Overloaded(
                f"{backlog} events and steps are waiting (limit "
                f"{svc.settings.http.max_backlog}); retry later",
                retry_after_s=min(30.0, 1.0 + backlog / max(svc.settings.http.max_backlog, 1)))

    async def plan_job(svc: Services, key: ApiKey, doc: Any, field: str = ""
                       ) -> tuple[JobMeta | None, dict[str, Any]]:
        """Validate one /schedule body and turn it into a job (or a dry-run answer).

        Returns (meta, info); meta is None for a dry run (info is then the answer).
        ``field`` prefixes error paths (``jobs[3].``) in batches."""
        if not isinstance(doc, dict):
            raise ValidationFailed(field.rstrip(".") or "<body>", doc,
                                   "a schedule request must be a JSON object")
        try:
            body = ScheduleRequest.model_validate(doc)
        except ValidationError as exc:
            raise lam.pydantic_to_failed(exc, prefix=field.rstrip(".")) from exc
        routed: dict[str, Any] | None = None
        intent = None
        slots: dict[str, Any] = {}
        source = "explicit"
        if body.text is not None:
            if len(body.text) > svc.settings.lam.max_task_chars:
                raise ValidationFailed(f"{field}text", body.text, f"must be at most "
                                       f"{svc.settings.lam.max_task_chars} characters")
            locale = body.context.locale if body.context else None
            result = await svc.router.route(body.text, locale=locale)
            routed = result.to_json()
            if not result.complete:
                if body.dry_run:
                    status = "no_match" if result.intent is None else "missing_slots"
                    return None, {"dry_run": True, "status": status, **routed}
                if result.intent is None:
                    raise NoIntent(result.reason)
                raise ValidationFailed(
                    f"{field}text", body.text, f"intent {result.intent} needs "
                    f"{', '.join(result.missing_slots)}; say them in the text",
                )
            todos = [t.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
                     for t in result.plan]
            intent, slots, source = result.intent, dict(result.slots), result.source
        else:
            todos = body.todos or []
        graph = build_graph(todos, limits=svc.settings.graph, field=f"{field}todos")
        if body.dry_run:
            out: dict[str, Any] = {"dry_run": True, "status": "planned", "intent": intent,
                                   "slots": slots, "source": source, "todos": graph.to_json(),
                                   "levels": [list(lv) for lv in graph.levels],
                                   "capabilities": list(graph.capabilities),
                                   "sessions": list(graph.sessions)}
            if routed:
                out.update({k: v for k, v in routed.items() if k not in out and k != "plan"})
            return None, out
        # One random id per job: the job id, the default conversation and the request id.
        job_uuid = uuid.uuid4()
        conv = body.conversation_id or f"conv-{job_uuid.hex}"
        context: dict[str, Any] = {"tenant": key.tenant}
        if body.context is not None:
            context.update(body.context.model_dump(exclude_none=True))
        # The LAM request this job answers (replies thread on it); built as wire JSON
        # directly: every field is already validated above.
        req: dict[str, Any] = {
            "id": str(job_uuid), "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": lam.PROTOCOL_VERSION, "type": "request", "sender": HTTP_CHANNEL_AGENT,
            "to": [SCHEDULER_AGENT], "task": body.text or f"explicit plan of {len(todos)} steps",
            "payload": {"slots": slots} if slots else {}, "context": context,
            "correlation": {"conversationId": conv},
        }
        if intent:
            req["intent"] = intent
        meta = JobMeta(job_id=job_uuid.hex, tenant=key.tenant, conversation_id=conv, shard=0,
                       todos=todos, priority=body.priority, request=req,
                       callback_url=body.callback_url, intent=intent, slots=slots,
                       source=source, text=body.text, max_attempts=body.max_attempts,
                       new_conversation=body.conversation_id is None)
        return meta, {"intent": intent, "steps": len(todos)}

    @app.post("/schedule", status_code=202)
    async def schedule(request: Request) -> JSONResponse:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        budget = svc.budget()
        await admit(svc, key, budget)
        doc = await read_json(request, svc)
        meta, info = await plan_job(svc, key, doc)
        if meta is None:
            return JSONResponse(info, status_code=200)
        idem = idempotency_key(request)
        digest = body_hash(doc)
        async with budget:
            # Out of budget after the script ran: the job exists and the client hears 503;
            # its retry (same Idempotency-Key and body) is answered with that job.
            accepted = await svc.store.submit(meta, idempotency_key=idem, body_digest=digest)
        if accepted.created:
            accepted_total.labels(key.tenant).inc()
        return JSONResponse({"job_id": accepted.job_id,
                             "conversation_id": accepted.conversation_id,
                             "status": accepted.status, **info},
                            status_code=202 if accepted.created else 200)

    @app.post("/schedule/batch", status_code=202)
    async def schedule_batch(request: Request) -> JSONResponse:
        """Many jobs in one round trip (high-volume channels). Every job is validated before
        any is written; each job is then accepted atomically, in order."""
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        budget = svc.budget()
        await admit(svc, key, budget)
        doc = await read_json(request, svc)
        limit = svc.settings.http.max_batch_jobs
        if not isinstance(doc, dict) or set(doc) != {"jobs"}:
            raise ValidationFailed("<body>", doc, 'the body must be {"jobs": [...]}')
        jobs = doc["jobs"]
        if not isinstance(jobs, list) or not 1 <= len(jobs) <= limit:
            raise ValidationFailed("jobs", f"<{type(jobs).__name__} of "
                                   f"{len(jobs) if isinstance(jobs, list) else '?'}>",
                                   f"must be a list of 1..{limit} schedule requests",
                                   quote=False)
        metas = []
        for i, item in enumerate(jobs):
            if isinstance(item, dict) and item.get("dry_run"):
                raise ValidationFailed(f"jobs[{i}].dry_run", True,
                                       "dry runs are not batched; use POST /schedule")
            meta, _ = await plan_job(svc, key, item, field=f"jobs[{i}].")
            assert meta is not None
            metas.append(meta)
        async with budget:
            accepted = await svc.store.submit_many(metas)
        accepted_total.labels(key.tenant).inc(len(accepted))
        return JSONResponse({"jobs": [{"job_id": a.job_id, "conversation_id": a.conversation_id,
                                       "status": a.status} for a in accepted]},
                            status_code=202)

    @app.post("/lam/message", status_code=202)
    async def lam_message(request: Request) -> JSONResponse:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        budget = svc.budget()
        await admit(svc, key, budget)
        # lam.validate checks the document's limits (depth, strings, keys): not twice.
        doc = await read_json(request, svc, svc.settings.lam.max_message_bytes, check=False)
        (outcome,) = await commit_lam(svc, key, [await prepare_lam(svc, key, doc)], budget)
        if isinstance(outcome, CpaError):
            raise outcome
        code, body = outcome
        return JSONResponse(body, status_code=code)

    async def prepare_lam(svc: Services, key: ApiKey, doc: Any) -> _LamOp:
        """Everything /lam/message does before Redis: validation, the tenant, routing or the
        explicit plan, the job to create. Raises the caller's error."""
        msg = lam.validate(doc, svc.settings.lam)
        if msg.context.tenant != key.tenant:
            raise ValidationFailed("context.tenant", msg.context.tenant,
                                   f"must be the tenant of your API key ({key.tenant})")
        if not isinstance(msg, lam.Request):
            # Any other performative joins an existing conversation: checked against the
            # protocol before it is appended (commit_lam), so the channel hears about a
            # mistake; the orchestrator checks again, authoritatively.
            return _LamOp(msg, check=True)
        text = msg.task or ""
        payload = msg.payload
        explicit = payload.get("todos")
        if explicit is not None:
            # An explicit plan in the payload: validated like /schedule's todos.
            graph = build_graph(explicit, limits=svc.settings.graph, field="payload.todos")
            return lam_job(key, msg, doc, graph.to_json(), intent=msg.intent, slots={},
                           source="explicit")
        result = None
        slots = payload.get("slots")
        if msg.intent and msg.intent in svc.router.catalogue:
            # The channel named a known intent: its slots come from payload.slots, the
            # rest (if any) from the task text.
            given = slots if isinstance(slots, dict) else {}
            result = svc.router.plan_for(msg.intent, given)
            if not result.complete and text:
                routed = await svc.router.route(text, locale=msg.context.locale)
                if routed.intent == msg.intent:
                    result = svc.router.plan_for(msg.intent, {**routed.slots, **given})
        elif text:
            result = await svc.router.route(text, locale=msg.context.locale)
        if result is None or not result.complete:
            reason = result.reason if result else "the request has no task text to route"
            return _LamOp(msg, refuse=reason)
        todos = [t.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
                 for t in result.plan]
        return lam_job(key, msg, doc, todos, intent=result.intent, slots=dict(result.slots),
                       source=result.source)

    def lam_job(key: ApiKey, msg: lam.Request, doc: dict[str, Any],
                todos: list[dict[str, Any]], *, intent: str | None, slots: dict[str, Any],
                source: str) -> _LamOp:
        conv = msg.correlation.conversation_id
        payload = msg.payload
        priority = payload.get("priority", "normal")
        if priority not in PRIORITIES:
            raise ValidationFailed("payload.priority", priority,
                                   "must be one of high, normal, low")
        callback = payload.get("callback_url")
        if callback is not None and (not isinstance(callback, str) or
                                     not callback.startswith(("http://", "https://"))):
            raise ValidationFailed("payload.callback_url", callback, "must be an http(s) URL")
        meta = JobMeta(job_id=new_job_id(), tenant=key.tenant, conversation_id=conv, shard=0,
                       todos=todos, priority=priority, request=msg.wire(),
                       callback_url=callback, intent=intent, slots=slots, source=source,
                       text=msg.task)
        return _LamOp(msg, meta=meta, digest=body_hash(doc), intent=intent, slots=slots)

    async def commit_lam(svc: Services, key: ApiKey, ops: list[_LamOp | CpaError],
                         budget: RedisBudget) -> list[tuple[int, dict[str, Any]] | CpaError]:
        """The Redis part of /lam/message for many messages at once: the protocol checks'
        conversation reads in one round trip (only when there are such messages), then every
        job intake and inbox append in one round trip (each atomic), then — only for repeated
        request ids — the original jobs' summaries. Returns (HTTP status, body) or the error
        per message, in order. Errors given in ``ops`` pass through."""
        out: list[Any] = list(ops)  # an op is replaced by its outcome
        try:
            checks = [i for i, op in enumerate(ops) if isinstance(op, _LamOp) and op.check]
            if checks:
                async with budget:
                    rows = await conversation_fields(svc, key.tenant, [
                        op.msg.correlation.conversation_id for op in ops
                        if isinstance(op, _LamOp) and op.check])
                for i, fields in zip(checks, rows, strict=True):
                    op = ops[i]
                    assert isinstance(op, _LamOp)
                    try:
                        conv = op.msg.correlation.conversation_id
                        lam.Conversation.from_fields(conv, fields).check(op.msg)
                    except CpaError as exc:
                        out[i] = exc
            todo = [i for i, op in enumerate(ops) if isinstance(op, _LamOp)
                    and not isinstance(out[i], CpaError)]
            commands = []
            for i in todo:
                op = ops[i]
                assert isinstance(op, _LamOp)
                msg = op.msg
                if op.meta is not None:
                    commands.append(svc.store.intake_command(op.meta, f"lam:{msg.id}",
                                                             op.digest))
                else:
                    commands.append(svc.lam_append_command(
                        key.tenant, msg.correlation.conversation_id, str(msg.id),
                        msg.encode().decode(), refuse=op.refuse))
            async with budget:
                replies = await svc.run_scripts(commands)
            intakes: list[tuple[int, tuple[JobMeta, str | None, str, Any]]] = []
            for i, reply in zip(todo, replies, strict=True):
                op = ops[i]
                assert isinstance(op, _LamOp)
                msg, conv = op.msg, op.msg.correlation.conversation_id
                if isinstance(reply, Exception):
                    out[i] = _as_error(reply)
                elif op.meta is not None:
                    intakes.append((i, (op.meta, f"lam:{msg.id}", op.digest, reply)))
                elif op.refuse is not None:
                    out[i] = (200, {"message_id": str(msg.id), "conversation_id": conv,
                                    "status": "refused", "reason": op.refuse})
                else:
                    appended = int(reply) == 1
                    out[i] = (202 if appended else 200, {
                        "message_id": str(msg.id), "conversation_id": conv,
                        "status": "accepted" if appended else "duplicate"})
            if intakes:
                async with budget:
                    outcomes = await svc.store.intake_outcomes([item for _, item in intakes])
                created = 0
                for (i, _), accepted in zip(intakes, outcomes, strict=True):
                    op = ops[i]
                    assert isinstance(op, _LamOp)
                    if isinstance(accepted, CpaError):
                        out[i] = accepted
                        continue
                    body: dict[str, Any] = {
                        "job_id": accepted.job_id, "message_id": str(op.msg.id),
                            "conversation_id": accepted.conversation_id,
                            "status": accepted.status, "intent": op.intent, "slots": op.slots}
                    if accepted.created:
                        created += 1
                    else:
                        body["duplicate"] = True
                    out[i] = (202 if accepted.created else 200, body)
                if created:
                    accepted_total.labels(key.tenant).inc(created)
        except Exception as exc:  # Redis gone or out of budget: every pending message
            error = _as_error(exc)
            out = [error if isinstance(o, _LamOp) else o for o in out]
        return out

    async def conversation_fields(svc: Services, tenant: str, convs: list[str]
                                  ) -> list[Any]:
        if len(convs) == 1:
            return [await svc.redis.hgetall(svc.keys.conversation(tenant, convs[0]))]
        pipe = svc.redis.pipeline(transaction=False)
        for conv in convs:
            pipe.hgetall(svc.keys.conversation(tenant, conv))
        return list(await pipe.execute())

    @app.websocket("/lam/stream")
    async def lam_stream(ws: WebSocket) -> None:
        """High-volume channels: each text frame is one LAM message or a JSON array of up to
        ``http.max_batch_jobs``; each frame is answered with one frame, a JSON array of what
        /lam/message would have answered per message (plus ``code``, its HTTP status)."""
        svc = await services(ws)
        api_key = ws.headers.get("x-api-key") or ws.query_params.get("api_key")
        record = svc.settings.tenant_for_key(api_key or "")
        await ws.accept()  # then close with a code the client sees (not a bare 403)
        if record is None:
            await ws.close(code=1008, reason="missing or unknown API key")
            return
        svc.ws_clients += 1
        try:
            while True:
                frame = await ws.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                raw = frame.get("text")
                if raw is None:
                    raw = frame.get("bytes") or b""
                results = await stream_frame(svc, record, raw)
                await ws.send_text(json.dumps(results, separators=(",", ":"),
                                              ensure_ascii=False))
        except WebSocketDisconnect:
            pass
        finally:
            svc.ws_clients -= 1

    async def stream_frame(svc: Services, key: ApiKey, raw: str | bytes
                           ) -> list[dict[str, Any]]:
        """One /lam/stream frame → one result per message (never raises)."""
        http, limits = svc.settings.http, svc.settings.lam
        try:
            doc = lam.parse_json(raw, max_bytes=http.max_body_bytes, field="<frame>")
            if isinstance(doc, dict):
                docs: list[Any] = [doc]
            elif isinstance(doc, list) and 1 <= len(doc) <= http.max_batch_jobs:
                docs = doc
            else:
                shape = (f"<array of {len(doc)}>" if isinstance(doc, list)
                         else f"<{type(doc).__name__}>")
                raise ValidationFailed("<frame>", shape, "a frame is one LAM message (a JSON "
                                       f"object) or a JSON array of 1..{http.max_batch_jobs}",
                                       quote=False)
        except CpaError as exc:
            return [_result(exc)]
        # A message must fit lam.max_message_bytes as on /lam/message; only a frame larger
        # than that can hold one that does not, so only then are messages measured.
        measure = len(raw) > limits.max_message_bytes
        budget = svc.budget()
        ops: list[_LamOp | CpaError] = []
        for item in docs:
            try:
                await admit(svc, key, budget)
                if measure:
                    size = len(raw) if len(docs) == 1 else len(json.dumps(item).encode())
                    if size > limits.max_message_bytes:
                        raise PayloadTooLarge("<message>", f"<{size} bytes>", "a message must "
                                              f"be at most {limits.max_message_bytes} bytes",
                                              quote=False)
                ops.append(await prepare_lam(svc, key, item))
            except Exception as exc:
                ops.append(_as_error(exc))
        outcomes = await commit_lam(svc, key, ops, budget)
        results = []
        for item, outcome in zip(docs, outcomes, strict=True):
            if isinstance(outcome, CpaError):
                result = _result(outcome)
                mid = item.get("id") if isinstance(item, dict) else None
                if isinstance(mid, str) and len(mid) <= 128:
                    result["message_id"] = mid
            else:
                code, result = outcome
                result["code"] = code
            results.append(result)
        return results

    # -------------------------------------------------------------------- jobs

    @app.get("/jobs")
    async def list_jobs(request: Request, status: str | None = None, limit: int = 50,
                        offset: int = 0) -> dict[str, Any]:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        if status is not None and status not in {s.value for s in JobStatus}:
            raise ValidationFailed("status", status, "must be one of " +
                                   ", ".join(s.value for s in JobStatus))
        if not 1 <= limit <= 500:
            raise ValidationFailed("limit", limit, "must be between 1 and 500")
        if offset < 0:
            raise ValidationFailed("offset", offset, "must be >= 0")
        async with svc.budget():
            jobs, total = await svc.store.list(key.tenant, status=status, offset=offset,
                                               limit=limit)
        nxt = offset + len(jobs) if offset + len(jobs) < total else None
        return {"jobs": jobs, "total": total, "offset": offset, "limit": limit,
                "next_offset": nxt}

    async def job_summary(svc: Services, key: ApiKey, job_id: str) -> dict[str, Any]:
        summary = await svc.store.summary(key.tenant, job_id)
        if summary is None:
            raise NotFound(f"job {job_id!r} not found")
        return summary

    @app.get("/jobs/{job_id}")
    async def get_job(request: Request, job_id: str) -> dict[str, Any]:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        async with svc.budget():
            job = await svc.store.load(key.tenant, job_id)
        return job.public()

    @app.delete("/jobs/{job_id}", status_code=202)
    async def cancel_job(request: Request, job_id: str) -> JSONResponse:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        async with svc.budget():
            summary = await job_summary(svc, key, job_id)
            if JobStatus(summary["status"]).terminal:
                return JSONResponse({"job_id": job_id, "status": summary["status"],
                                     "message": "job already finished"}, status_code=200)
            await svc.store.send_control(key.tenant, job_id, "cancel")
        return JSONResponse({"job_id": job_id, "status": "cancelling"}, status_code=202)

    @app.post("/jobs/{job_id}/retry", status_code=202)
    async def retry_job(request: Request, job_id: str) -> JSONResponse:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        async with svc.budget():
            summary = await job_summary(svc, key, job_id)
            if summary["status"] not in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
                from actors.errors import Conflict

                raise Conflict(f"job {job_id} is {summary['status']}; only failed or "
                               "cancelled jobs can be retried")
            await svc.store.send_control(key.tenant, job_id, "retry")
        return JSONResponse({"job_id": job_id, "status": "retrying"}, status_code=202)

    @app.get("/conversations/{conversation_id}/messages")
    async def conversation_messages(request: Request, conversation_id: str,
                                    after: str = "-", limit: int = 100) -> dict[str, Any]:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        if not 1 <= limit <= 1000:
            raise ValidationFailed("limit", limit, "must be between 1 and 1000")
        start = "-" if after == "-" else f"({after}"
        async with svc.budget():
            entries: Any = await svc.redis.xrange(
                svc.keys.outbox(key.tenant, conversation_id), min=start, count=limit)
        return {"messages": [{"id": eid, "message": json.loads(f["m"])}
                             for eid, f in entries]}

    @app.websocket("/ws/jobs/{job_id}")
    async def job_updates(ws: WebSocket, job_id: str) -> None:
        svc = await services(ws)
        api_key = ws.headers.get("x-api-key") or ws.query_params.get("api_key")
        record = svc.settings.tenant_for_key(api_key or "")
        if record is None:
            await ws.close(code=4401, reason="missing or unknown API key")
            return
        try:
            job = await svc.store.load(record.tenant, job_id)
        except NotFound:
            await ws.close(code=4404, reason="job not found")
            return
        await ws.accept()
        pubsub = svc.redis.pubsub()
        await pubsub.subscribe(svc.keys.events_channel(record.tenant, job_id))
        svc.ws_clients += 1
        try:
            # Snapshot after subscribing, so no update falls between the two.
            job = await svc.store.load(record.tenant, job_id)
            await ws.send_json({"type": "snapshot", "job": job.public()})
            terminal = job.status.terminal
            while not terminal:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                data = json.loads(msg["data"])
                for event in data if isinstance(data, list) else [data]:
                    if "lam" in event:
                        await ws.send_json({"type": "lam", "message": event["lam"]})
                        continue
                    await ws.send_json({"type": "update", **event})
                    if "step" not in event and event.get("status") in (
                            "succeeded", "failed", "cancelled"):
                        terminal = True
            await ws.close()
        except WebSocketDisconnect:
            pass
        finally:
            svc.ws_clients -= 1
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ ops

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        svc = await services(request)
        try:
            async with svc.budget():
                report = await health_report(svc)
        except DependencyUnavailable as exc:
            report = {"status": "down", "redis": {"ok": False, "error": exc.message}}
        return JSONResponse(report, status_code=200 if report["status"] != "down" else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc = await services(request)
        from serve.health import queue_metrics

        text = generate_latest(request.app.state.registry)
        async with svc.budget():
            text += await queue_metrics(svc)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/dlq")
    async def dead_letters(request: Request, limit: int = 100) -> dict[str, Any]:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        async with svc.budget():
            entries = await svc.queue.list_dead(tenant=key.tenant,
                                                count=min(max(limit, 1), 1000))
        return {"entries": [{"id": e.entry_id, "stream": e.stream, "reason": e.reason,
                             "deliveries": e.deliveries, "ts": e.ts,
                             "job_id": e.fields.get("job"), "step": e.fields.get("step")}
                            for e in entries]}

    @app.post("/dlq/{entry_id}/replay", status_code=202)
    async def replay(request: Request, entry_id: str) -> dict[str, Any]:
        svc = await services(request)
        key = tenant_of(svc, request.headers.get("x-api-key"))
        async with svc.budget():
            entries = await svc.queue.list_dead(tenant=key.tenant, count=10_000)
            entry = next((e for e in entries if e.entry_id == entry_id), None)
            if entry is None:
                raise NotFound(f"dead-letter entry {entry_id!r} not found")
            job_id = entry.fields.get("job")
            if job_id:
                # A step of a job: the job failed because of it, so replay = retry the job's
                # failed steps (its orchestrator re-dispatches them with a fresh attempt).
                summary = await svc.store.summary(key.tenant, job_id)
                if summary is not None and summary["status"] in ("failed", "cancelled"):
                    await svc.store.send_control(key.tenant, job_id, "retry")
                    await svc.queue.purge_dead(entry_id)
                    return {"id": entry_id, "replayed_as": "job_retry", "job_id": job_id}
                if summary is not None:
                    await svc.queue.purge_dead(entry_id)
                    return {"id": entry_id, "replayed_as": "nothing", "job_id": job_id,
                            "status": summary["status"]}
            new_id = await svc.queue.replay_dead(entry_id)
            return {"id": entry_id, "replayed_as": new_id}

    @app.get("/")
    async def index() -> dict[str, Any]:
        return {"service": "cpa-scheduler", "time": time.time(),
                "endpoints": ["/schedule", "/schedule/batch", "/lam/message", "/lam/stream",
                              "/jobs", "/health", "/metrics", "/ws/jobs/{id}", "/docs"]}

    _ = ping  # health uses it through serve.health
    return app
