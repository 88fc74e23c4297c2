"""Locust load test: realistic channel traffic against a running CPA Scheduler.

Start the system, then drive it (the base URL is locust's ``--host``)::

    make run
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 60s --host http://127.0.0.1:8000

Pick user classes by naming them (``... ScheduleUser WatcherUser``); add ``--processes 2`` (or
more) when one locust process saturates its core. At the end the run prints a CPA summary
line (jobs and tasks accepted, tasks/min, LAM jobs, overloaded answers) above locust's tables.

User classes (weight):

- ``ScheduleUser`` (6): ``POST /schedule`` with explicit task graphs: single step, 4-step
  diamond A→(B,C)→D, 10-step chain, 20-wide fan-out (root, 20 parallel children, join) —
  ``noop`` steps, or ``sleep`` steps of ``CPA_LOCUST_SLEEP_MS``; priorities high/normal/low
  1:3:1; a share of requests carries an ``Idempotency-Key`` and some of those are sent twice
  (the repeat must answer 200 with the same job id).
- ``LamUser`` (2): routed texts — ``/schedule`` dry runs, and LAM ``request`` messages on
  ``/lam/message`` (a conversation id is reused for 2–4 messages). The intents' plans run on
  the browser/mail/http/file pools, which refuse steps in the default config, so those jobs
  fail fast; that is expected and not counted as a load-test failure.
- ``WatcherUser`` (1): submits a diamond and follows it over ``WS /ws/jobs/{id}`` until the
  terminal update; the end-to-end latency is reported as request type ``WS``, name ``job e2e``.

Answers: 202 (and 200 for idempotent repeats, dry runs, refused or duplicate LAM messages)
are successes; 429/503 are failures marked "overloaded" and the user waits Retry-After (capped
at ``CPA_LOCUST_RETRY_CAP_S``); anything else is a failure carrying the body.

Environment:

- ``CPA_LOCUST_KEYS``: API keys, comma-separated (default ``acme-dev-key,globex-dev-key``);
  each user picks one tenant.
- ``CPA_LOCUST_TENANTS``: the tenant of each key, same order (needed for LAM
  ``context.tenant``; default: acme-dev-key→acme, globex-dev-key→globex).
- ``CPA_LOCUST_SLEEP_MS``: run ``sleep`` steps of this many ms instead of ``noop``.
- ``CPA_LOCUST_WAIT_MAX_S``: wait time between a user's requests, uniform in [0, this]
  (default 0.05).
- ``CPA_LOCUST_IDEMPOTENT_SHARE`` (default 0.1), ``CPA_LOCUST_REPEAT_SHARE`` (default 0.5):
  share of /schedule requests with an Idempotency-Key, and share of those sent twice.
- ``CPA_LOCUST_RETRY_CAP_S``: longest wait on Retry-After, seconds (default 2).
- ``CPA_LOCUST_WATCH_TIMEOUT_S``: how long a watcher follows one job (default 60).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner, WorkerRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

Plan = list[dict[str, Any]]

# ------------------------------------------------------------------------ configuration

DEFAULT_KEYS = "acme-dev-key,globex-dev-key"
KNOWN_TENANTS = {"acme-dev-key": "acme", "globex-dev-key": "globex"}
"""The tenants of the local dev profile's keys (configs/cpa.yaml)."""


@dataclass(frozen=True)
class Tenant:
    key: str
    name: str


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _number(env: Mapping[str, str], name: str, default: float, *, low: float = 0.0,
            high: float = float("inf")) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: got {raw!r}; must be a number") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: got {raw!r}; must be between {low} and {high}")
    return value


def tenants_from_env(env: Mapping[str, str]) -> tuple[Tenant, ...]:
    """The (key, tenant) pairs of ``CPA_LOCUST_KEYS`` / ``CPA_LOCUST_TENANTS``."""
    keys = _split(env.get("CPA_LOCUST_KEYS", "") or DEFAULT_KEYS)
    if not keys:
        raise ValueError("CPA_LOCUST_KEYS: no API key given")
    names = _split(env.get("CPA_LOCUST_TENANTS", ""))
    if names and len(names) != len(keys):
        raise ValueError(f"CPA_LOCUST_TENANTS: got {len(names)} tenants for {len(keys)} keys; "
                         "give one tenant per key, in the same order")
    if not names:
        unknown = [k for k in keys if k not in KNOWN_TENANTS]
        if unknown:
            raise ValueError(f"CPA_LOCUST_TENANTS: the tenant of key(s) {', '.join(unknown)} "
                             "is unknown; set CPA_LOCUST_TENANTS (one tenant per key)")
        names = [KNOWN_TENANTS[k] for k in keys]
    return tuple(Tenant(k, n) for k, n in zip(keys, names, strict=True))


@dataclass(frozen=True)
class Config:
    tenants: tuple[Tenant, ...]
    sleep_ms: int | None
    wait_max_s: float
    idempotent_share: float
    repeat_share: float
    retry_cap_s: float
    watch_timeout_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        sleep = env.get("CPA_LOCUST_SLEEP_MS", "").strip()
        return cls(
            tenants=tenants_from_env(env),
            sleep_ms=int(_number(env, "CPA_LOCUST_SLEEP_MS", 0, high=600_000)) if sleep
            else None,
            wait_max_s=_number(env, "CPA_LOCUST_WAIT_MAX_S", 0.05, high=3600),
            idempotent_share=_number(env, "CPA_LOCUST_IDEMPOTENT_SHARE", 0.1, high=1),
            repeat_share=_number(env, "CPA_LOCUST_REPEAT_SHARE", 0.5, high=1),
            retry_cap_s=_number(env, "CPA_LOCUST_RETRY_CAP_S", 2.0, high=60),
            watch_timeout_s=_number(env, "CPA_LOCUST_WATCH_TIMEOUT_S", 60.0, low=0.1),
        )


CONFIG = Config.from_env()

# ------------------------------------------------------------------------- job shapes


def step(name: str, depends_on: list[int] | None = None, *, sleep_ms: int | None = None
         ) -> dict[str, Any]:
    """One ToDo: ``noop``, or ``sleep`` for ``sleep_ms`` when given."""
    todo: dict[str, Any] = ({"action": "sleep", "params": {"ms": sleep_ms}}
                            if sleep_ms is not None else {"action": "noop"})
    todo["name"] = name
    if depends_on:
        todo["depends_on"] = depends_on
    return todo


def single(sleep_ms: int | None = None) -> Plan:
    return [step("only", sleep_ms=sleep_ms)]


def diamond(sleep_ms: int | None = None) -> Plan:
    """A→(B, C)→D."""
    return [step("A", sleep_ms=sleep_ms), step("B", [0], sleep_ms=sleep_ms),
            step("C", [0], sleep_ms=sleep_ms), step("D", [1, 2], sleep_ms=sleep_ms)]


def chain(sleep_ms: int | None = None, length: int = 10) -> Plan:
    return [step(f"link{i}", [i - 1] if i else None, sleep_ms=sleep_ms) for i in range(length)]


def fan_out(sleep_ms: int | None = None, width: int = 20) -> Plan:
    """One root, ``width`` parallel children, one join."""
    children = [step(f"child{i}", [0], sleep_ms=sleep_ms) for i in range(1, width + 1)]
    return [step("root", sleep_ms=sleep_ms), *children,
            step("join", list(range(1, width + 1)), sleep_ms=sleep_ms)]


SHAPES: dict[str, Callable[[int | None], Plan]] = {
    "single": single, "diamond": diamond, "chain10": chain, "fanout20": fan_out,
}
SHAPE_WEIGHTS = {"single": 4, "diamond": 3, "chain10": 2, "fanout20": 1}
PRIORITY_WEIGHTS = {"high": 1, "normal": 3, "low": 1}


def pick_priority(rng: random.Random) -> str:
    return rng.choices(list(PRIORITY_WEIGHTS), weights=list(PRIORITY_WEIGHTS.values()))[0]


def schedule_body(shape: str, priority: str = "normal", sleep_ms: int | None = None
                  ) -> dict[str, Any]:
    """A ``POST /schedule`` body with the explicit plan of ``shape``."""
    return {"todos": SHAPES[shape](sleep_ms), "priority": priority}


# -------------------------------------------------------------------------------- LAM

LAM_SENDER = "agent://channel/locust"
SCHEDULER = "agent://scheduler/cpa"
LAM_TEXTS: tuple[tuple[str, str | None, str], ...] = (
    ("Finde in DATEV die letzte Rechnung für Firma X, exportiere PDF, sende per Mail an "
     "anna@kunde.de", "invoice.export_and_mail", "de-DE"),
    ("Export the latest invoice for ACME AG as PDF and email it to john@acme.com",
     "invoice.export_and_mail", "en-US"),
    ("Öffne https://portal.example.com", "web.open", "de-DE"),
    ("Suche den Kunden Müller GmbH im CRM", "customer.lookup", "de-DE"),
    ("Look up customer Contoso Ltd in the CRM", "customer.lookup", "en-US"),
    ("Erstelle ein Ticket: Drucker im 2. OG defekt", "ticket.create", "de-DE"),
    ('Send an email to bob@firma.de with subject "Offer"', "mail.send", "en-US"),
    ("Analysiere Q3 Churn", "report.analyse", "de-DE"),
    ("Plane ein Meeting mit Anna am Dienstag um 10 Uhr", "meeting.schedule", "de-DE"),
    ("Schedule a meeting with Bob tomorrow at 3pm", "meeting.schedule", "en-US"),
    ("Lade die Lohnabrechnung für März herunter", "document.download", "de-DE"),
    ("Kannst du mir einen Witz erzählen?", None, "de-DE"),
)
"""(text, the intent the rules route it to or None, locale). The last routes nowhere: its
LAM request is refused (200) and its dry run answers ``no_match``."""


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-29T10:00:00.123Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_conversation_id() -> str:
    return f"locust-{uuid.uuid4().hex[:20]}"


def lam_request(text: str, tenant: str, conversation_id: str, *, priority: str = "normal",
                locale: str | None = None) -> dict[str, Any]:
    """A LAM ``request`` message with a fresh id and timestamp."""
    context = {"tenant": tenant, **({"locale": locale} if locale else {})}
    return {"id": str(uuid.uuid4()), "ts": utc_now(), "version": "1.0", "type": "request",
            "sender": LAM_SENDER, "to": [SCHEDULER], "task": text,
            "payload": {"priority": priority}, "context": context,
            "correlation": {"conversationId": conversation_id}}


class Conversations:
    """Hands out a conversation id for each message, reusing one for 2–4 messages."""

    def __init__(self, rng: random.Random, low: int = 2, high: int = 4) -> None:
        self._rng, self._low, self._high = rng, low, high
        self._current = ""
        self._left = 0

    def next(self) -> str:
        if self._left <= 0:
            self._current = new_conversation_id()
            self._left = self._rng.randint(self._low, self._high)
        self._left -= 1
        return self._current


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""
    retry_after_s: float = 0.0
    overloaded: bool = False


def retry_after_seconds(value: str | None, cap: float) -> float:
    """Retry-After in seconds (a delta; an HTTP date or garbage counts as 1 s), capped."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    return max(0.0, min(seconds, cap))


def classify(status: int, body: str | None, retry_after: str | None, *,
             accept: tuple[int, ...], cap: float) -> Outcome:
    """Judge one answer: ``accept`` is success, 429/503 overloaded, the rest a failure."""
    if status in accept:
        return Outcome(True)
    text = (body or "").strip().replace("\n", " ")[:300]
    if status in (429, 503):
        wait = retry_after_seconds(retry_after, cap)
        return Outcome(False, f"overloaded: HTTP {status} {text}", wait, overloaded=True)
    if status == 0:
        return Outcome(False, f"no answer: {text or 'connection failed'}")
    return Outcome(False, f"HTTP {status} (expected {'/'.join(map(str, accept))}): {text}")


def terminal_status(message: Mapping[str, Any]) -> str | None:
    """The job's final status if this WebSocket message says it finished, else None."""
    final = ("succeeded", "failed", "cancelled")
    if message.get("type") == "snapshot":
        status = (message.get("job") or {}).get("status")
        return status if status in final else None
    if message.get("type") == "update" and "step" not in message:
        status = message.get("status")
        return status if status in final else None
    return None


def ws_url(host: str, path: str) -> str:
    """``http://h:p/prefix`` + ``/ws/jobs/1`` → ``ws://h:p/prefix/ws/jobs/1``."""
    base = host.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return base + path


# ------------------------------------------------------------------------ task counting


class Tally:
    """Jobs and tasks (steps) the system accepted, by kind, plus notable answers.

    Under ``--processes``/workers each worker drains its tally into its stats report and the
    master merges them, so the master's summary covers the whole run.
    """

    def __init__(self) -> None:
        self.jobs: Counter[str] = Counter()
        self.tasks: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.started: float | None = None
        self.stopped: float | None = None

    def reset(self) -> None:
        self.drain()
        self.started = self.stopped = None

    def add(self, kind: str, steps: int) -> None:
        self.jobs[kind] += 1
        self.tasks[kind] += steps

    def note(self, what: str) -> None:
        self.notes[what] += 1

    def drain(self) -> dict[str, dict[str, int]]:
        data = {"jobs": dict(self.jobs), "tasks": dict(self.tasks), "notes": dict(self.notes)}
        self.jobs.clear()
        self.tasks.clear()
        self.notes.clear()
        return data

    def merge(self, data: Mapping[str, Mapping[str, int]] | None) -> None:
        if not data:
            return
        self.jobs.update(data.get("jobs", {}))
        self.tasks.update(data.get("tasks", {}))
        self.notes.update(data.get("notes", {}))

    @property
    def total_tasks(self) -> int:
        return sum(self.tasks.values())

    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped if self.stopped is not None else time.monotonic()) - self.started

    def tasks_per_min(self, elapsed_s: float | None = None) -> float:
        elapsed = self.elapsed_s() if elapsed_s is None else elapsed_s
        return self.total_tasks * 60.0 / elapsed if elapsed > 0 else 0.0

    def summary(self, elapsed_s: float | None = None) -> str:
        elapsed = self.elapsed_s() if elapsed_s is None else elapsed_s
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(self.jobs.items())) or "none"
        notes = ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items())) or "none"
        return (f"CPA summary: {self.total_tasks} tasks in {sum(self.jobs.values())} explicit "
                f"jobs accepted in {elapsed:.1f} s = {self.tasks_per_min(elapsed):.0f} "
                f"tasks/min (jobs by shape: {shapes}); also: {notes}")


TALLY = Tally()


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    TALLY.reset()
    if not isinstance(environment.runner, WorkerRunner):
        TALLY.started = time.monotonic()


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["cpa_tally"] = TALLY.drain()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    TALLY.merge(data.get("cpa_tally"))


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    TALLY.stopped = time.monotonic()
    if not isinstance(environment.runner, MasterRunner):
        print(TALLY.summary(), flush=True)


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    # The master hears the workers' last reports only after test_stop.
    if isinstance(environment.runner, MasterRunner):
        print(TALLY.summary(), flush=True)


# ------------------------------------------------------------------------------- users

Check = Callable[[dict[str, Any]], str | None]
"""Looks at a successful answer's JSON; returns why it is wrong, or None."""


class CpaUser(FastHttpUser):
    abstract = True
    wait_time = between(0.0, CONFIG.wait_max_s)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random()
        self.tenant = self.rng.choice(CONFIG.tenants)

    def post_json(self, path: str, body: dict[str, Any], *, name: str,
                  accept: tuple[int, ...], headers: dict[str, str] | None = None,
                  check: Check | None = None) -> tuple[Outcome, dict[str, Any]]:
        """POST ``body``; record success/failure; wait out Retry-After when overloaded."""
        data: dict[str, Any] = {}
        with self.client.post(path, json=body, name=name, catch_response=True,
                              headers={"X-API-Key": self.tenant.key, **(headers or {})}
                              ) as resp:
            retry_after = resp.headers.get("Retry-After") if resp.headers else None
            body_text = resp.text if resp.text is not None else str(resp.error or "")
            outcome = classify(resp.status_code, body_text, retry_after, accept=accept,
                               cap=CONFIG.retry_cap_s)
            if outcome.ok:
                try:
                    data = resp.json()
                    problem = check(data) if check else None
                except ValueError:
                    problem = f"answer is not JSON: {body_text[:200]}"
                if problem:
                    outcome = Outcome(False, problem)
            if outcome.ok:
                resp.success()
            else:
                resp.failure(outcome.reason)
        if outcome.overloaded:
            TALLY.note("overloaded")
            if outcome.retry_after_s:
                gevent.sleep(outcome.retry_after_s)
        return outcome, data

    def submit(self, shape: str, *, name: str, priority: str | None = None,
               idempotency_key: str | None = None) -> tuple[Outcome, dict[str, Any]]:
        body = schedule_body(shape, priority or pick_priority(self.rng), CONFIG.sleep_ms)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        outcome, data = self.post_json("/schedule", body, name=name, accept=(202,),
                                       headers=headers, check=_has_job_id)
        if outcome.ok:
            TALLY.add(shape, len(body["todos"]))
        if outcome.ok and idempotency_key and self.rng.random() < CONFIG.repeat_share:
            job_id = data["job_id"]

            def same_job(again: dict[str, Any]) -> str | None:
                got = again.get("job_id")
                return None if got == job_id else f"repeat answered job {got}, not {job_id}"

            repeat, _ = self.post_json("/schedule", body, name="/schedule [idempotent repeat]",
                                       accept=(200,), headers=headers, check=same_job)
            if repeat.ok:
                TALLY.note("idempotent repeats")
        return outcome, data


def _has_job_id(data: dict[str, Any]) -> str | None:
    return None if data.get("job_id") else f"no job_id in {str(data)[:200]}"


class ScheduleUser(CpaUser):
    """Explicit task graphs of four shapes on ``POST /schedule``."""

    weight = 6

    def _shape(self, shape: str) -> None:
        key = (f"locust-{uuid.uuid4().hex}"
               if self.rng.random() < CONFIG.idempotent_share else None)
        self.submit(shape, name=f"/schedule [{shape}]", idempotency_key=key)

    @task(SHAPE_WEIGHTS["single"])
    def single(self) -> None:
        self._shape("single")

    @task(SHAPE_WEIGHTS["diamond"])
    def diamond(self) -> None:
        self._shape("diamond")

    @task(SHAPE_WEIGHTS["chain10"])
    def chain10(self) -> None:
        self._shape("chain10")

    @task(SHAPE_WEIGHTS["fanout20"])
    def fanout20(self) -> None:
        self._shape("fanout20")


class LamUser(CpaUser):
    """Routed texts: dry runs on /schedule and LAM requests on /lam/message."""

    weight = 2

    def on_start(self) -> None:
        super().on_start()
        self.conversations = Conversations(self.rng)

    @task(1)
    def dry_run(self) -> None:
        text, _, locale = self.rng.choice(LAM_TEXTS)

        def planned(data: dict[str, Any]) -> str | None:
            ok = data.get("dry_run") is True and data.get("status") in (
                "planned", "no_match", "missing_slots")
            return None if ok else f"not a dry-run answer: {str(data)[:200]}"

        self.post_json("/schedule", {"text": text, "dry_run": True,
                                     "context": {"locale": locale}},
                       name="/schedule [dry-run text]", accept=(200,), check=planned)

    @task(2)
    def lam_message(self) -> None:
        text, _, locale = self.rng.choice(LAM_TEXTS)
        msg = lam_request(text, self.tenant.name, self.conversations.next(),
                          priority=pick_priority(self.rng), locale=locale)
        outcome, data = self.post_json("/lam/message", msg, name="/lam/message [request]",
                                       accept=(200, 202))
        if outcome.ok:
            if data.get("job_id"):
                TALLY.note("lam jobs")  # steps unknown here: they are not counted as tasks
            else:
                TALLY.note(f"lam {data.get('status', 'answered')}")


class WatcherUser(CpaUser):
    """Submits a diamond and follows it over the job WebSocket to its terminal update."""

    weight = 1

    @task
    def watch_diamond(self) -> None:
        started = time.perf_counter()
        outcome, data = self.submit("diamond", name="/schedule [watched diamond]")
        if not outcome.ok:
            return
        messages, error = self._follow(str(data["job_id"]), started)
        self.environment.events.request.fire(
            request_type="WS", name="job e2e",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=messages, exception=error, context={})

    def _follow(self, job_id: str, started: float) -> tuple[int, Exception | None]:
        deadline = started + CONFIG.watch_timeout_s
        url = ws_url(self.host or "", f"/ws/jobs/{job_id}")
        count = 0
        try:
            with connect(url, additional_headers={"X-API-Key": self.tenant.key},
                         open_timeout=max(1.0, deadline - time.perf_counter())) as ws:
                while True:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        return count, TimeoutError(
                            f"job {job_id} not finished after {CONFIG.watch_timeout_s:g} s")
                    message = json.loads(ws.recv(timeout=left))
                    count += 1
                    status = terminal_status(message)
                    if status is not None:
                        if status != "succeeded":
                            return count, RuntimeError(f"job {job_id} ended {status}")
                        return count, None
        except ConnectionClosed as exc:
            return count, RuntimeError(f"WebSocket closed before the job finished: {exc}")
        except TimeoutError:
            return count, TimeoutError(
                f"job {job_id} not finished after {CONFIG.watch_timeout_s:g} s")
        except Exception as exc:  # a refused handshake, a reset connection, bad JSON
            return count, exc
