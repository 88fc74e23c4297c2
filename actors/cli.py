"""The ``cpa`` command line: ``route``, ``up``, ``down``, ``send``, ``jobs``, ``agent``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from actors.errors import CpaError

Command = Callable[[argparse.Namespace], int]
DEFAULT_API = os.environ.get("CPA_API", "http://127.0.0.1:8000")
DEFAULT_KEY = os.environ.get("CPA_API_KEY", "acme-dev-key")


def _cmd_route(args: argparse.Namespace) -> int:
    from actors.router_cli import run_route

    result: int = run_route(args)
    return result


def _cmd_up(args: argparse.Namespace) -> int:
    from actors.launcher import Launcher
    from actors.settings import load_settings

    settings = load_settings()
    launcher = Launcher(settings, Path(args.config) if args.config else None)
    if args.detach:
        log = settings.runtime.data_dir / "run" / "cpa.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "actors.cli", "up"]
        if args.config:
            argv += ["--config", args.config]
        proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        print(f"starting in the background (pid {proc.pid}, log {log}); `cpa down` stops it")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                print(f"error: cpa up exited with {proc.returncode}; see {log}", file=sys.stderr)
                return 1
            if launcher.state_file.exists() and "api" in json.loads(
                    launcher.state_file.read_text() or "{}"):
                print(json.dumps(json.loads(launcher.state_file.read_text()), indent=2))
                return 0
            time.sleep(1)
        print("still starting after 300 s; see the log", file=sys.stderr)
        return 1
    stop = threading.Event()

    def _signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    try:
        urls = launcher.up()
        # ray.init installs its own SIGTERM handler (it exits at once): ours again, so
        # `cpa down` gets the same orderly shutdown as Ctrl-C.
        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGTERM, _signal)
        print("\nCPA Scheduler is running:")
        for name, url in urls.items():
            print(f"  {name:<10} {url}")
        print("  API keys   acme-dev-key (tenant acme), globex-dev-key (tenant globex)")
        print("Ctrl-C stops everything started here.")
        stop.wait()
    finally:
        print("stopping ...")
        launcher.shutdown()
        print("stopped")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from actors.launcher import Launcher
    from actors.settings import load_settings

    stopped = Launcher(load_settings()).down()
    print("stopped: " + ", ".join(stopped) if stopped else "nothing to stop")
    return 0


def _http(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import httpx

    r = httpx.request(method, args.api.rstrip("/") + path, json=body, timeout=30,
                      headers={"X-API-Key": args.key})
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") \
        else {"body": r.text}
    if r.status_code >= 400:
        print(f"HTTP {r.status_code}: {json.dumps(data, ensure_ascii=False)}", file=sys.stderr)
        raise SystemExit(2 if r.status_code < 500 else 1)
    return data


def _cmd_send(args: argparse.Namespace) -> int:
    if args.file:
        body = json.loads(Path(args.file).read_text())
        data = _http(args, "POST", "/lam/message", body)
    elif args.lam:
        body = {
            "id": str(uuid.uuid4()), "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "type": "request", "sender": "agent://channel/cli", "to": ["agent://scheduler/cpa"],
            "task": args.text, "payload": {}, "context": {"tenant": args.tenant},
            "correlation": {"conversationId": args.conversation or f"cli-{uuid.uuid4().hex}"},
        }
        data = _http(args, "POST", "/lam/message", body)
    else:
        data = _http(args, "POST", "/schedule", {"text": args.text, "dry_run": args.dry_run})
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    if args.job_id:
        data = _http(args, "GET", f"/jobs/{args.job_id}")
    else:
        query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
        data = _http(args, "GET", "/jobs" + query)
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    """Thin agent: a PoolWorker outside Ray (Windows hosts), same streams, same code."""
    import asyncio

    from actors.executors.base import load_executor
    from actors.gctune import tune_gc
    from actors.settings import load_settings
    from actors.worker import PoolWorker

    settings = load_settings()
    tune_gc()
    executor = load_executor(args.executor)
    replica = args.replica or f"{args.capability}-agent-{uuid.uuid4().hex[:8]}"
    worker = PoolWorker(args.capability, executor, settings, replica_id=replica,
                        workers=args.workers)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(worker.run())
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"agent {replica} consuming {args.capability} steps; Ctrl-C stops")
        await stop.wait()
        await worker.shutdown()
        task.cancel()

    asyncio.run(main())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpa", description="CPA Scheduler on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    route = sub.add_parser("route", help="route a text to an intent and print its plan")
    route.add_argument("text", help="the request, e.g. 'Analysiere Q3 Churn'")
    route.add_argument("--json", action="store_true", help="print JSON instead of text")
    route.set_defaults(func=_cmd_route)

    up = sub.add_parser("up", help="start Redis (if needed), Ray and Serve locally")
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument("--config", help="Serve config (default configs/serve.yaml)")
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop a detached `cpa up`")
    down.set_defaults(func=_cmd_down)

    for name, helptext in (("send", "send a text or LAM message"), ("jobs", "list/show jobs")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--api", default=DEFAULT_API, help="base URL (env CPA_API)")
        p.add_argument("--key", default=DEFAULT_KEY, help="API key (env CPA_API_KEY)")
        if name == "send":
            p.add_argument("text", nargs="?", default="", help="text to route and run")
            p.add_argument("--file", help="post this LAM JSON file to /lam/message")
            p.add_argument("--lam", action="store_true", help="wrap text in a LAM request")
            p.add_argument("--tenant", default="acme")
            p.add_argument("--conversation")
            p.add_argument("--dry-run", action="store_true")
            p.set_defaults(func=_cmd_send)
        else:
            p.add_argument("job_id", nargs="?")
            p.add_argument("--status")
            p.add_argument("--limit", type=int, default=20)
            p.set_defaults(func=_cmd_jobs)

    agent = sub.add_parser("agent", help="run a pool worker outside Ray (thin agent)")
    agent.add_argument("--capability", required=True)
    agent.add_argument("--executor", required=True, help="module:Class")
    agent.add_argument("--workers", type=int, default=4)
    agent.add_argument("--replica")
    agent.set_defaults(func=_cmd_agent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except CpaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.status_code < 500 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
