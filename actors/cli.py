"""The ``cpa`` command line: ``route``, ``up``, ``down``, ``send``, ``jobs``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from actors.errors import CpaError

Command = Callable[[argparse.Namespace], int]


def _cmd_route(args: argparse.Namespace) -> int:
    from actors.router_cli import run_route

    return run_route(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpa", description="CPA Scheduler on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    route = sub.add_parser("route", help="route a text to an intent and print its plan")
    route.add_argument("text", help="the request, e.g. 'Analysiere Q3 Churn'")
    route.add_argument("--json", action="store_true", help="print JSON instead of text")
    route.set_defaults(func=_cmd_route)
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
