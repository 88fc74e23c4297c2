"""``cpa up`` / ``cpa down``: start and stop the whole system on one machine.

Starts only what is missing: a Redis (when none answers at ``redis.url``), a Ray head with its
GCS off port 6379 and the dashboard on loopback, then deploys ``configs/serve.yaml`` through
the dashboard (the same path ops use). Everything started is recorded with its pid in
``<data_dir>/run/state.json`` and stopped by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import yaml

from actors.errors import ConfigError, DependencyUnavailable
from actors.settings import CONFIG_DIR, Settings

LOCAL_RESOURCES = {"browser": 4, "windows": 1}
"""Custom resources a local head advertises so every pool of serve.yaml can be placed."""
LOCAL_LABELS = {"cpa-browser": "true", "cpa-windows": "true"}
"""Node labels of a local head (pools select nodes by these; see cluster.yaml)."""


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")  # loopback dev cluster; set token for prod
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


class Launcher:
    """Starts/stops the local system; state is kept so ``down`` works from another shell."""

    def __init__(self, settings: Settings, serve_config: Path | None = None) -> None:
        self.settings = settings
        self.serve_config = serve_config or CONFIG_DIR / "serve.yaml"
        self.run_dir = settings.runtime.data_dir / "run"
        self.state_file = self.run_dir / "state.json"
        self.state: dict[str, Any] = {}

    # -------------------------------------------------------------------- up

    def up(self) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())
        self._ensure_redis()
        self.state["supervisor_pid"] = os.getpid()
        self._save()
        self._ensure_ray()
        self._save()
        self._deploy()
        urls = self._wait_healthy()
        self._save()
        return urls

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def _ensure_redis(self) -> None:
        url = urlparse(self.settings.redis.url)
        host, port = url.hostname or "127.0.0.1", url.port or 6379
        if _port_open(host, port):
            return
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise DependencyUnavailable("redis", f"nothing answers at {host}:{port}")
        server = shutil.which("redis-server")
        if server is None:
            raise DependencyUnavailable(
                "redis", "no Redis answers and redis-server is not installed "
                "(apt-get install redis-server)")
        data = self.settings.runtime.data_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [server, "--bind", host, "--port", str(port), "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=(data / "redis.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.state["redis_pid"] = proc.pid
        deadline = time.monotonic() + 10
        while not _port_open(host, port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise DependencyUnavailable("redis", f"redis-server did not start; see "
                                                     f"{data / 'redis.log'}")
            time.sleep(0.1)
        print(f"started redis-server pid {proc.pid} on {host}:{port} (data in {data})")

    def _ensure_ray(self) -> None:
        """Start a local Ray head in this process (or join ``runtime.ray_address``)."""
        import ray

        rt = self.settings.runtime
        os.environ.update({k: v for k, v in _env().items() if k.startswith("RAY_")})
        if self.settings.http.direct_ingress:
            # Read by every Ray process this head starts (Serve replicas included).
            os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
            # A replica being removed stays open this long so a load balancer can
            # deregister it (Serve's default: 30 s); locally there is none in front.
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
        if rt.ray_address:
            ray.init(address=rt.ray_address, namespace=rt.ray_namespace, log_to_driver=False)
            return
        ctx = ray.init(address="local", namespace=rt.ray_namespace, include_dashboard=True,
                       dashboard_host=rt.dashboard_host, dashboard_port=rt.dashboard_port,
                       resources=dict(LOCAL_RESOURCES), labels=dict(LOCAL_LABELS),
                       log_to_driver=False)
        gcs = str(getattr(ctx, "address_info", {}).get("gcs_address", ""))
        if gcs.endswith(":6379"):
            raise ConfigError("Ray's GCS took port 6379, which belongs to Redis")
        self.state["ray_gcs"] = gcs
        print(f"started Ray (GCS {gcs}, dashboard http://{rt.dashboard_host}:"
              f"{rt.dashboard_port})")

    def _deploy(self) -> None:
        """PUT serve.yaml to the dashboard's Serve REST API — what `serve deploy` does."""
        from ray import serve as ray_serve

        rt = self.settings.runtime
        cfg = check_serve_config(self.serve_config)
        http = cfg.get("http_options", {})
        ray_serve.start(http_options={"host": http.get("host", "127.0.0.1"),
                                      "port": http.get("port", 8000),
                                      "request_timeout_s": http.get("request_timeout_s", 30)})
        url = f"http://{rt.dashboard_host}:{rt.dashboard_port}/api/serve/applications/"
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.put(url, json=cfg, timeout=30)
                if r.status_code < 300:
                    break
                detail = r.text[-1500:]
            except httpx.HTTPError as exc:
                detail = str(exc)
            if time.monotonic() > deadline:
                raise DependencyUnavailable("ray serve", f"deploying {self.serve_config} "
                                                         f"failed: {detail}")
            time.sleep(2)  # the dashboard may still be starting
        print(f"deployed {self.serve_config}")

    def _wait_healthy(self, within_s: float = 180.0) -> dict[str, Any]:
        cfg = yaml.safe_load(self.serve_config.read_text()) or {}
        http = cfg.get("http_options", {})
        base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
        wait_healthy(base, {"noop": 1}, within_s)
        self.state["api"] = base
        rt = self.settings.runtime
        urls = {"api": base, "docs": f"{base}/docs", "health": f"{base}/health",
                "dashboard": f"http://{rt.dashboard_host}:{rt.dashboard_port}"}
        bind = http.get("host", "127.0.0.1")
        direct = direct_ingress_urls("cpa", host=None if bind in ("0.0.0.0", "::") else bind)
        if direct:
            urls["direct"] = ", ".join(direct) + "  (same API, no proxy hop)"
            self.state["api_direct"] = direct
        return urls

    # ------------------------------------------------------------------- down

    def down(self) -> list[str]:
        """Stop a detached ``cpa up`` (SIGTERM to its pid: it stops Ray and its Redis)."""
        stopped: list[str] = []
        if not self.state_file.exists():
            return stopped
        state = json.loads(self.state_file.read_text())
        for name in ("supervisor_pid", "redis_pid"):
            pid = state.get(name)
            if not pid:
                continue
            try:
                os.kill(int(pid), signal.SIGTERM)
                stopped.append(f"{name.removesuffix('_pid')} pid {pid}")
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _alive(int(pid)):
                time.sleep(0.2)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def shutdown(self) -> None:
        """Stop what this process started: Serve, Ray, and the Redis it launched."""
        import ray
        from ray import serve as ray_serve

        if ray.is_initialized():
            try:
                ray_serve.shutdown()  # type: ignore[no-untyped-call]
            finally:
                ray.shutdown()
        pid = self.state.get("redis_pid")
        if pid and _alive(int(pid)):
            os.kill(int(pid), signal.SIGTERM)
        self.state_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def check_serve_config(path: Path) -> dict[str, Any]:
    """Parse serve.yaml and check the parts we rely on (clear error instead of a Ray trace)."""
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("applications"), list):
        raise ConfigError(f"{path}: must have an `applications` list")
    return cfg


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deploy_system(overrides: dict[str, Any], *, http_port: int = 0, route_prefix: str = "/",
                  pools: list[dict[str, Any]] | None = None, ingress_replicas: int = 1,
                  app_suffix: str = "", within_s: float = 120.0) -> str:
    """Deploy the ingress and executor pools on the connected Ray (programmatic twin of
    serve.yaml, for benchmarks and tests); returns the API base URL once healthy.

    ``pools``: build_pool args plus an optional ``num_replicas``. Serve's HTTP proxy is
    started on ``http_port`` (0: a free one) unless it runs already.
    """
    from ray import serve as ray_serve

    from actors.pools import ExecutorPool
    from serve.deployment import Ingress

    pools = pools if pools is not None else [{"capability": "noop", "workers": 16}]
    status = ray_serve.status()
    if not status.proxies:
        port = http_port or free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port,
                                      "request_timeout_s": 30})
    elif http_port:
        port = http_port
    else:
        raise ConfigError("Serve already runs on this cluster: pass its http_port")
    ingress = Ingress.options(num_replicas=ingress_replicas).bind(  # type: ignore[attr-defined]
        settings=overrides)
    ray_serve.run(ingress, name=f"cpa{app_suffix}", route_prefix=route_prefix)
    for pool in pools:
        args = {"settings": overrides, **pool}
        replicas = int(args.pop("num_replicas", 1))
        app = ExecutorPool.options(num_replicas=replicas).bind(**args)  # type: ignore[attr-defined]
        ray_serve.run(app, name=f"pool-{pool['capability']}{app_suffix}", route_prefix=None)
    base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_healthy(base, {p["capability"]: int(p.get("num_replicas", 1)) for p in pools},
                 within_s)
    return base


def direct_ingress_urls(app_name: str = "cpa", host: str | None = "127.0.0.1") -> list[str]:
    """Base URLs of the app's ingress replicas' own HTTP servers when Serve's direct ingress
    is on (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the cluster's environment): each
    replica answers on its own port, without the proxy hop. Empty when it is off. The same
    targets are published as ``target_groups`` by the dashboard's
    ``GET /api/serve/applications/`` for a load balancer. The replicas bind Serve's HTTP
    host (loopback for a local system): ``host`` replaces the node IPs the targets report
    (None keeps them, for a cluster whose Serve binds 0.0.0.0)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        return []
    controller = client._controller
    try:
        groups = ray.get(controller.get_target_groups.remote(app_name), timeout=30)
    except Exception:
        return []
    out = []
    for group in groups:
        if str(getattr(group.protocol, "value", group.protocol)).lower() != "http" or \
                group.app_name != app_name:
            continue
        prefix = group.route_prefix.rstrip("/")
        out += [f"http://{host or t.ip}:{t.port}{prefix}" for t in group.targets]
    return out


def wait_healthy(base: str, replicas: dict[str, int], within_s: float) -> None:
    """Poll ``base``/health until each named pool has at least that many replicas."""
    deadline = time.monotonic() + within_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=5)
            pools = r.json()["pools"]
            if r.status_code == 200 and all(pools[cap]["replicas"] >= n
                                            for cap, n in replicas.items()):
                return
            last = r.text[:500]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise DependencyUnavailable("cpa", f"system not healthy after {within_s:.0f} s: {last}")
