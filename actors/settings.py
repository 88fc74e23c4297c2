"""The one settings object: ``configs/cpa.yaml`` + environment, validated once, frozen.

Precedence (highest first): keyword arguments, environment variables (``CPA_`` prefix, nested
fields joined with ``__``, e.g. ``CPA_REDIS__URL``), the YAML file named by ``CPA_CONFIG_FILE``
(default ``configs/cpa.yaml``), the defaults below. Unknown keys anywhere are an error.
Every field carries its unit in the name (``_s`` seconds, ``_bytes``, ``_chars``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from actors.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("CPA_CONFIG_DIR", str(REPO_ROOT / "configs")))
"""Where ``cpa.yaml``, ``intents.yaml`` and ``serve.yaml`` live."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LamLimits(_Section):
    """Bounds every incoming LAM message must respect."""

    max_message_bytes: int = Field(
        1_048_576, ge=1_024, le=64 * 1_048_576, description="Largest encoded message, bytes."
    )
    max_payload_depth: int = Field(
        32, ge=1, le=256, description="Deepest nesting of objects/arrays in a message, levels."
    )
    max_string_chars: int = Field(
        65_536, ge=64, description="Longest string anywhere in a message, characters."
    )
    max_task_chars: int = Field(
        8_192, ge=16, description="Longest `task` (the natural-language request), characters."
    )
    max_recipients: int = Field(64, ge=1, le=10_000, description="Most entries in `to`, count.")
    max_keys_per_object: int = Field(
        1_024, ge=8, description="Most keys in one JSON object inside a message, count."
    )


class GraphLimits(_Section):
    """Bounds on task graphs (ToDo plans)."""

    max_steps: int = Field(20_000, ge=1, description="Most steps in one job, count.")
    max_dependencies_per_step: int = Field(
        1_000, ge=1, description="Most entries in one step's depends_on, count."
    )
    step_timeout_min_s: float = Field(0.01, gt=0, description="Smallest step timeout, seconds.")
    step_timeout_max_s: float = Field(
        86_400.0, gt=0, description="Largest step timeout, seconds."
    )
    default_step_timeout_s: float = Field(
        8.0, gt=0, description="Timeout of a step that names none (the seed's default), seconds."
    )
    max_text_chars: int = Field(
        65_536, ge=16, description="Longest `text`/`selector` of a step, characters."
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> GraphLimits:
        if not self.step_timeout_min_s <= self.default_step_timeout_s <= self.step_timeout_max_s:
            raise ValueError(
                "graph timeouts must satisfy step_timeout_min_s <= default_step_timeout_s"
                " <= step_timeout_max_s"
            )
        return self


class RouterSettings(_Section):
    """Intent routing: rules first, LLM fallback."""

    intents_file: Path = Field(
        CONFIG_DIR / "intents.yaml", description="YAML file with the intent rules."
    )
    min_confidence: float = Field(
        0.6, ge=0, le=1, description="Rule confidence needed to accept without the LLM, 0..1."
    )
    llm_min_confidence: float = Field(
        0.5, ge=0, le=1, description="LLM confidence needed to accept its answer, 0..1."
    )
    llm_provider: Literal["auto", "none", "openai", "offline"] = Field(
        "auto",
        description="LLM fallback: auto = openai when an API key is set, else none; "
        "offline = deterministic provider for tests.",
    )
    llm_model: str = Field("gpt-4o-mini", description="Model name sent to the provider.")
    llm_base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint (e.g. Ollama's http://127.0.0.1:11434/v1)."
    )
    llm_api_key: SecretStr | None = Field(
        None, description="API key; falls back to the OPENAI_API_KEY environment variable."
    )
    llm_timeout_s: float = Field(10.0, gt=0, le=300, description="One LLM call, seconds.")
    llm_max_retries: int = Field(1, ge=0, le=10, description="Client retries per LLM call.")


class RedisSettings(_Section):
    """The Redis server holding queues, job state and journals."""

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL.")
    key_prefix: str = Field(
        "cpa", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every key (lets tests and deployments share a server).",
    )
    socket_timeout_s: float = Field(5.0, gt=0, description="One Redis command, seconds.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Opening a connection, seconds.")
    max_connections: int = Field(64, ge=1, description="Connection pool size per process.")


class QueueSettings(_Section):
    """Task streams, leases, retries and the dead-letter queue."""

    visibility_timeout_s: float = Field(
        30.0, gt=0, description="A lease not renewed for this long is reclaimed, seconds."
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a running step renews its lease, seconds."
    )
    reclaim_interval_s: float = Field(
        2.0, gt=0, description="How often consumers look for expired leases, seconds."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Default attempts per step, count.")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry delay, seconds.")
    backoff_max_s: float = Field(300.0, ge=0, description="Largest retry delay, seconds.")
    backoff_jitter: float = Field(
        0.2, ge=0, le=1, description="Random share added to/subtracted from each delay, 0..1."
    )
    poison_max_deliveries: int = Field(
        5, ge=1, description="Deliveries of one entry before it is dead-lettered, count."
    )
    dispatch_deadline_s: float = Field(
        300.0, gt=0, description="How long a dispatched step attempt may wait (queued, or "
        "after its retry delay) for an executor to start it; later it fails as `lost` and "
        "the retry policy decides (retry or dead-letter), seconds.",
    )
    idempotency_ttl_s: int = Field(
        86_400, ge=60, description="How long an intake id/Idempotency-Key is remembered, seconds."
    )
    job_retention_s: int = Field(
        7 * 86_400, ge=60, description="A finished job's record is kept this long, seconds."
    )
    conversation_retention_s: int = Field(
        7 * 86_400, ge=60, description="A conversation's protocol state, outbox (replies) "
        "and journal are kept this long after its last event, seconds.",
    )
    stream_maxlen: int = Field(
        1_000_000, ge=1_000, description="Approximate cap of each stream's length, entries."
    )

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> QueueSettings:
        if self.heartbeat_interval_s >= self.visibility_timeout_s:
            raise ValueError("queue.heartbeat_interval_s must be below visibility_timeout_s")
        return self


class RuntimeSettings(_Section):
    """Ray cluster, shards and executors."""

    ray_address: str | None = Field(
        None, description="Existing Ray cluster to join (None: start a local one)."
    )
    ray_namespace: str = Field("cpa", description="Ray namespace of every named actor.")
    ray_gcs_port: int = Field(
        6380, ge=1024, le=65535, description="GCS port of a locally started head (never 6379)."
    )
    dashboard_host: str = Field("127.0.0.1", description="Ray dashboard bind address.")
    dashboard_port: int = Field(8265, ge=1024, le=65535, description="Ray dashboard port.")
    shards: int = Field(0, ge=0, le=1024, description="ConversationShard actors; 0 = CPU count.")
    passivate_after_s: float = Field(
        300.0, gt=0, description="Idle conversations are dropped from memory after, seconds."
    )
    data_dir: Path = Field(REPO_ROOT / "data", description="DuckDB, LanceDB, artifacts, Redis.")
    inform: Literal["steps", "results", "none"] = Field(
        "results",
        description="Which finished steps get a LAM inform reply: every step, only steps "
        "that produced a result (default; progress of the rest is on the WebSocket and "
        "GET /jobs), or none (agree/done/failure only).",
    )

    @model_validator(mode="after")
    def _gcs_not_redis(self) -> RuntimeSettings:
        if self.ray_gcs_port == 6379:
            raise ValueError("runtime.ray_gcs_port must not be 6379 (Redis owns it)")
        return self

    def shard_count(self) -> int:
        """Configured shards, or the machine's CPU count."""
        return self.shards or max(1, os.cpu_count() or 1)


class ApiKey(_Section):
    """One API key, stored as its SHA-256 hex digest, mapped to a tenant and roles."""

    tenant: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    key_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    roles: tuple[str, ...] = ("submit", "read", "operate")


class HttpSettings(_Section):
    """The Serve ingress."""

    host: str = Field("127.0.0.1", description="Bind address of the HTTP proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    direct_ingress: bool = Field(
        True, description="`cpa up` starts Ray with Serve's direct ingress: besides the "
        "proxy port, each ingress replica answers on its own port (30000+), without the "
        "proxy hop — ~4x the requests per CPU second, ~6 ms less latency. High-volume "
        "channels and load balancers use those targets (dashboard: GET "
        "/api/serve/applications/ → target_groups); flag.",
    )
    max_body_bytes: int = Field(
        4 * 1_048_576, ge=1_024, description="Largest request body accepted, bytes."
    )
    max_queued_requests: int = Field(
        1_000, ge=1, description="Requests waiting in Serve before 503, count."
    )
    request_timeout_s: float = Field(30.0, gt=0, description="End-to-end request limit, seconds.")
    max_backlog: int = Field(
        20_000, ge=1, description="Intake answers 503 + Retry-After while more events than "
        "this wait in the shard inboxes (backpressure), count.",
    )
    backlog_refresh_s: float = Field(
        0.2, ge=0, le=10, description="How long a backlog reading is reused, seconds."
    )
    tenant_rate_per_s: float = Field(
        2_000.0, ge=0, description="Sustained intake requests per tenant and ingress replica "
        "before 429 (0 = unlimited), requests/second.",
    )
    tenant_burst: int = Field(
        4_000, ge=1, description="Requests a tenant may send at once above the rate, count."
    )
    redis_budget_s: float = Field(
        2.0, gt=0, le=60, description="Redis time budget of one request (of one frame on "
        "WS /lam/stream): its Redis work taking longer answers 503 + Retry-After instead of "
        "waiting for socket timeouts (a hung Redis); live WebSocket updates are exempt, "
        "seconds.",
    )
    max_batch_jobs: int = Field(
        1_000, ge=1, le=100_000, description="Most jobs in one POST /schedule/batch, count."
    )
    api_keys: tuple[ApiKey, ...] = Field(
        (), description="API keys (hashed). The dev profile ships acme and globex."
    )


class Settings(BaseSettings):
    """Everything configurable about the scheduler, validated once at start-up."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="CPA_",
        env_nested_delimiter="__",
        validate_default=True,
    )

    profile: str = Field("dev", description="Name of the configuration profile.")
    lam: LamLimits = LamLimits()
    graph: GraphLimits = GraphLimits()
    router: RouterSettings = RouterSettings()
    redis: RedisSettings = RedisSettings()
    queue: QueueSettings = QueueSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    http: HttpSettings = HttpSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get("CPA_CONFIG_FILE", str(CONFIG_DIR / "cpa.yaml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file and Path(config_file).is_file():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    def llm_api_key(self) -> str | None:
        """The LLM key from settings or ``OPENAI_API_KEY``; None when neither is set."""
        if self.router.llm_api_key is not None:
            return self.router.llm_api_key.get_secret_value() or None
        return os.environ.get("OPENAI_API_KEY") or None

    def tenant_for_key(self, api_key: str) -> ApiKey | None:
        """The key record for a presented API key (compared by hash), or None."""
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        for record in self.http.api_keys:
            if record.key_sha256 == digest:
                return record
        return None


def load_settings(**overrides: Any) -> Settings:
    """Load and validate settings once; turn every problem into one :class:`ConfigError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r:.80})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from exc


def hash_api_key(api_key: str) -> str:
    """SHA-256 hex digest under which an API key is stored."""
    return hashlib.sha256(api_key.encode()).hexdigest()
