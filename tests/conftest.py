"""Shared fixtures. Unit tests need nothing; Redis tests use a real server on 127.0.0.1:6379
with a unique key prefix per test (and clean up after themselves)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
