"""CPA Scheduler: the part that runs in the cluster.

The pure domain (LAM protocol, task graph, intent router, orchestrator logic, settings,
errors) imports no ``ray``; the Ray side lives in a few named modules (``shard``, ``pools``).
"""

__version__ = "0.1.0"
