"""Benchmark of ``actors.graph.build_graph``: validation + toposort + levels + sessions.

Plans arrive as parsed JSON, so every shape is fed as plain dicts (round-tripped through
``json``) and timed end to end per call. The seed's target: 10,000 steps well under 200 ms.

Run: ``.venv/bin/python loadtests/bench_graph.py [--reps-scale 0.2]``
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from actors.graph import build_graph

Plan = list[dict[str, Any]]

SIZES = (100, 1_000, 10_000)
REPS = {100: 300, 1_000: 60, 10_000: 20}
TARGET_MS = 200.0
"""The seed's budget for one 10,000-step graph."""


def chain(n: int) -> Plan:
    """A browser session n steps long: the deepest possible graph."""
    return [
        {"action": "click", "selector": f"#b{i}", "depends_on": [i - 1] if i else []}
        for i in range(n)
    ]


def diamonds(n: int, width: int = 8) -> Plan:
    """Repeated diamonds: a join step, ``width`` parallel steps on it, the next join on all."""
    plan: Plan = []
    join = -1
    while len(plan) < n:
        plan.append({"action": "noop", "depends_on": [join] if join >= 0 else []})
        join = len(plan) - 1
        branch = []
        for _ in range(min(width, n - len(plan))):
            plan.append({"action": "http_request", "params": {"url": "https://x"},
                         "depends_on": [join]})
            branch.append(len(plan) - 1)
        if branch and len(plan) < n:
            plan.append({"action": "noop", "depends_on": branch})
            join = len(plan) - 1
    return plan[:n]


def random_dag(n: int, seed: int = 7) -> Plan:
    """Up to three dependencies on random earlier steps, mixed capabilities and fields."""
    rnd = random.Random(seed)
    actions = ("click", "type", "uia", "open_app", "send_mail", "noop", "read_file")
    plan: Plan = []
    for i in range(n):
        deps = sorted(rnd.sample(range(i), min(i, rnd.randint(0, 3))))
        step: dict[str, Any] = {"action": rnd.choice(actions), "depends_on": deps}
        if rnd.random() < 0.5:
            step["text"] = f"value {i}"
        if rnd.random() < 0.2:
            step["timeout"] = 30
        plan.append(step)
    return plan


SHAPES: dict[str, Callable[[int], Plan]] = {
    "chain": chain,
    "diamonds": diamonds,
    "random": random_dag,
}


def measure(plan: Plan, reps: int) -> list[float]:
    """Milliseconds per build_graph call, after one warm-up call."""
    build_graph(plan)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        build_graph(plan)
        samples.append((time.perf_counter() - start) * 1_000)
    return samples


def p99(samples: Sequence[float]) -> float:
    """Nearest-rank 99th percentile (the maximum for fewer than 100 samples)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


def main(argv: Sequence[str] | None = None) -> int:
    """Print median and p99 per shape and size; exit 1 if 10,000 steps miss the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps-scale", type=float, default=1.0,
                        help="multiply the repetitions per size (e.g. 0.2 for a quick run)")
    args = parser.parse_args(argv)

    print(f"{'shape':<10}{'steps':>8}{'edges':>8}{'reps':>6}{'median ms':>12}{'p99 ms':>10}")
    worst = 0.0
    for shape, make in SHAPES.items():
        for n in SIZES:
            plan: Plan = json.loads(json.dumps(make(n)))  # plain dicts, as from a request
            edges = sum(len(step["depends_on"]) for step in plan)
            reps = max(3, int(REPS[n] * args.reps_scale))
            gc.collect()
            samples = measure(plan, reps)
            median = statistics.median(samples)
            if n == 10_000:
                worst = max(worst, median)
            print(f"{shape:<10}{n:>8}{edges:>8}{reps:>6}{median:>12.2f}{p99(samples):>10.2f}")
    verdict = "ok" if worst < TARGET_MS else "MISSED"
    print(f"\n10,000 steps: worst median {worst:.1f} ms vs target {TARGET_MS:.0f} ms: {verdict}")
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
