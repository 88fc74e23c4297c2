"""Garbage-collector settings for the long-running hot processes (shards, pool replicas,
ingress).

Measured with loadtests/bench_runtime.py (one shard + one worker in process, 10,000
diamond jobs queued): with CPython's defaults (700, 10, 10) the collector took 8 of 18 CPU
seconds — 25 full collections of ~290 ms each, because every full pass walks every live
object (Ray's own modules included, and every job in flight). Freezing what exists after
start-up (it is never garbage) and collecting the young generation less often removed the
full passes and halved the CPU per task (0.46 → 0.25 ms). Almost everything these processes
allocate is freed by reference counting; the collector only reclaims cycles, and it still
runs, just less often.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 50, 100)
"""gen0 allocations, gen1 and gen2 collection counts (CPython default: 700, 10, 10)."""


def tune_gc() -> None:
    """Collect once, freeze the survivors (start-up objects), raise the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
