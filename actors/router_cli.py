"""``cpa route TEXT [--json]``: route one request and show the intent, slots and plan.

Exit codes: 0 an intent was found (even with missing slots, which are listed), 3 no intent
matched. Errors (empty text, a bad ``intents.yaml``, an unreachable LLM) are raised as
:class:`~actors.errors.CpaError` and rendered by :func:`actors.cli.main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TextIO

from actors.router import IntentRouter, RouteResult
from actors.settings import load_settings

EXIT_OK = 0
EXIT_NO_MATCH = 3


async def _route(router: IntentRouter, text: str) -> RouteResult:
    try:
        return await router.route(text)
    finally:
        if router.llm is not None:
            await router.llm.aclose()


def run_route(args: argparse.Namespace) -> int:
    """Entry point of ``cpa route``; ``args`` has ``text`` and ``json``."""
    router = IntentRouter.from_settings(load_settings())
    result = asyncio.run(_route(router, args.text))
    if getattr(args, "json", False):
        print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    else:
        render(result, sys.stdout)
    return EXIT_OK if result.intent is not None else EXIT_NO_MATCH


def render(result: RouteResult, out: TextIO) -> None:
    """The human view: step numbers and dependencies are 1-based, like the seed's plans."""
    if result.intent is None:
        out.write(f"no intent matched: {result.reason}\n")
        for name, confidence in result.alternatives:
            out.write(f"  candidate: {name} ({confidence:.2f})\n")
        return
    out.write(f"intent:      {result.intent}\n")
    out.write(f"confidence:  {result.confidence:.2f} ({result.source})\n")
    out.write(f"reason:      {result.reason}\n")
    label = "slots:"
    for name, value in result.slots.items():
        out.write(f"{label:<13}{name} = {value!r}\n")
        label = ""
    if result.missing_slots:
        out.write(f"missing:     {', '.join(result.missing_slots)} (ask the user)\n")
    graph = result.graph
    if graph is None:
        return
    out.write(f"plan:        {len(graph.steps)} steps in {len(graph.levels)} levels\n")
    for i, step in enumerate(graph.steps):
        where = graph.capabilities[i]
        if graph.sessions[i]:
            where += f", session {graph.sessions[i]}"
        after = ", ".join(str(d + 1) for d in step.depends_on) or "-"
        detail = step.text or step.selector or step.params.get("url") or ""
        out.write(f"  {i + 1:>2}. {step.name or step.action}\n")
        out.write(f"      {step.action} [{where}] after: {after}"
                  + (f" | {detail}" if detail else "") + "\n")
