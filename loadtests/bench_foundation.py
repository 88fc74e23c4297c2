"""Foundation micro-benchmark: intent routing latency and task-graph build + validation.

Seed targets: routing < 100 ms, graph building < 200 ms. Prints both tables.
Run: ``.venv/bin/python loadtests/bench_foundation.py`` (or ``make bench``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_graph
import bench_router


def main() -> int:
    print("== intent routing ==")
    rc_router = bench_router.main([])
    print("\n== task graph build + validation ==")
    rc_graph = bench_graph.main([])
    return int(bool(rc_router) or bool(rc_graph))


if __name__ == "__main__":
    sys.exit(main())
