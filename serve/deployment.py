"""The ingress as a Ray Serve deployment (import path ``serve.deployment:build_ingress``)."""

from __future__ import annotations

from typing import Any

from ray import serve as ray_serve

from actors.gctune import tune_gc
from actors.settings import Settings, load_settings
from serve.app import create_app


def _replica_settings() -> Settings | None:
    """The settings the running Ingress replica was deployed with."""
    try:
        servable = ray_serve.get_replica_context().servable_object
    except Exception:
        return None
    settings = getattr(servable, "settings", None)
    return settings if isinstance(settings, Settings) else None


app = create_app(settings_provider=_replica_settings)


@ray_serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    max_queued_requests=1000,
    logging_config={"enable_access_log": False},
)
@ray_serve.ingress(app)
class Ingress:
    """HTTP/WS entry point. On start it makes sure the ConversationShard actors exist, so a
    plain ``serve deploy configs/serve.yaml`` brings up a working system."""

    def __init__(self, settings: dict[str, Any] | None = None, ensure_shards: bool = True
                 ) -> None:
        overrides = settings or {}
        resolved = load_settings(**overrides)
        tune_gc()
        self.settings = resolved
        if ensure_shards:
            from actors.cluster import ensure_shards as _ensure

            _ensure(resolved, overrides)


def build_ingress(args: dict[str, Any]) -> Any:
    """Application builder: ``args`` = settings (overrides), ensure_shards."""
    return Ingress.bind(**args)  # type: ignore[attr-defined]
