"""Placement by labels/resources on a two-node cluster on one machine (own Ray, subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.redis_fixtures import REDIS_URL, unique_prefix

pytestmark = pytest.mark.ray


def test_browser_pool_lands_only_on_labelled_node() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.probes.placement", unique_prefix(), REDIS_URL],
        capture_output=True, text=True, timeout=240, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    replicas = result["browser_replicas"]
    assert len(replicas) == 2
    assert {node for _, node in replicas} == {result["browser_node"]}
    assert result["browser_node"] != result["head"]
    states = result["windows_replica_states"]
    assert states.get("RUNNING", 0) == 0, states
    assert sum(states.values()) >= 1
