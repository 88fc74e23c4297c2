"""The load test's builders, offline: job shapes are valid plans, LAM bodies are valid LAM,
answers are judged and tasks counted right. No network, no Ray.

Importing locust normally monkey-patches the whole process with gevent, which would break the
asyncio/Ray tests sharing this pytest process; the module is loaded with
``LOCUST_SKIP_MONKEY_PATCH`` set, and its users are never run here.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from actors import lam
from actors.graph import build_graph
from actors.router import IntentCatalogue, IntentRouter
from actors.settings import RouterSettings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lf() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCUST_SKIP_MONKEY_PATCH", "1")
        for name in ("CPA_LOCUST_KEYS", "CPA_LOCUST_TENANTS", "CPA_LOCUST_SLEEP_MS",
                     "CPA_LOCUST_WAIT_MAX_S"):
            mp.delenv(name, raising=False)
        spec = importlib.util.spec_from_file_location("cpa_locustfile",
                                                      ROOT / "loadtests" / "locustfile.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, "cpa_locustfile", module)
        spec.loader.exec_module(module)
        yield module


def levels(plan: list[dict[str, object]]) -> list[list[int]]:
    return [list(level) for level in build_graph(plan).levels]


def test_shapes_are_valid_graphs(lf: ModuleType) -> None:
    assert levels(lf.single()) == [[0]]
    assert levels(lf.diamond()) == [[0], [1, 2], [3]]
    chain = build_graph(lf.chain())
    assert len(chain) == 10 and len(chain.levels) == 10
    fan = build_graph(lf.fan_out())
    assert len(fan) == 22
    assert [len(level) for level in fan.levels] == [1, 20, 1]
    assert set(fan.capabilities) == {"noop"}


def test_sleep_steps_and_schedule_bodies(lf: ModuleType) -> None:
    plan = lf.diamond(sleep_ms=25)
    graph = build_graph(plan)
    assert {s.action for s in graph.steps} == {"sleep"}
    assert {s.params["ms"] for s in graph.steps} == {25}
    assert set(graph.capabilities) == {"noop"}
    for shape in lf.SHAPES:
        body = lf.schedule_body(shape, "high")
        assert body["priority"] == "high"
        build_graph(body["todos"])
    rng = random.Random(7)
    assert {lf.pick_priority(rng) for _ in range(200)} == {"high", "normal", "low"}


def test_lam_bodies_validate_and_texts_route(lf: ModuleType) -> None:
    rng = random.Random(1)
    conversations = lf.Conversations(rng)
    ids = [conversations.next() for _ in range(40)]
    runs = [len(list(g)) for _, g in itertools.groupby(ids)]
    assert all(2 <= r <= 4 for r in runs[:-1]), runs
    router = IntentRouter(IntentCatalogue.from_yaml(ROOT / "configs" / "intents.yaml"),
                          settings=RouterSettings(llm_provider="none"))
    seen = set()
    for text, intent, locale in lf.LAM_TEXTS:
        doc = lf.lam_request(text, "acme", ids[0], priority="low", locale=locale)
        msg = lam.validate(doc)
        assert isinstance(msg, lam.Request)
        assert msg.context.tenant == "acme" and msg.task == text
        assert msg.correlation.conversation_id == ids[0]
        assert str(msg.id) not in seen
        seen.add(str(msg.id))
        result = router.route_rules(text)
        assert result.intent == intent, (text, result.intent)
        assert result.complete == (intent is not None)


def test_tenants_from_env(lf: ModuleType) -> None:
    pairs = lf.tenants_from_env({})
    assert [(t.key, t.name) for t in pairs] == [("acme-dev-key", "acme"),
                                                ("globex-dev-key", "globex")]
    pairs = lf.tenants_from_env({"CPA_LOCUST_KEYS": "k1, k2", "CPA_LOCUST_TENANTS": "a,b"})
    assert [(t.key, t.name) for t in pairs] == [("k1", "a"), ("k2", "b")]
    with pytest.raises(ValueError, match="CPA_LOCUST_TENANTS"):
        lf.tenants_from_env({"CPA_LOCUST_KEYS": "k1"})
    with pytest.raises(ValueError, match="one tenant per key"):
        lf.tenants_from_env({"CPA_LOCUST_KEYS": "k1,k2", "CPA_LOCUST_TENANTS": "a"})
    config = lf.Config.from_env({"CPA_LOCUST_SLEEP_MS": "40", "CPA_LOCUST_WAIT_MAX_S": "0.2"})
    assert config.sleep_ms == 40 and config.wait_max_s == 0.2
    assert lf.Config.from_env({}).sleep_ms is None
    with pytest.raises(ValueError, match="CPA_LOCUST_WAIT_MAX_S"):
        lf.Config.from_env({"CPA_LOCUST_WAIT_MAX_S": "soon"})


def test_answers_are_classified(lf: ModuleType) -> None:
    assert lf.classify(202, "{}", None, accept=(202,), cap=2).ok
    assert not lf.classify(200, "{}", None, accept=(202,), cap=2).ok
    busy = lf.classify(429, '{"error": "rate_limited"}', "5", accept=(202,), cap=2)
    assert not busy.ok and busy.overloaded and busy.retry_after_s == 2
    assert "overloaded" in busy.reason and "rate_limited" in busy.reason
    down = lf.classify(503, "", None, accept=(202,), cap=2)
    assert down.overloaded and down.retry_after_s == 1
    bad = lf.classify(422, '{"field": "todos[0].action"}', None, accept=(202,), cap=2)
    assert not bad.ok and not bad.overloaded and "todos[0].action" in bad.reason
    assert "no answer" in lf.classify(0, "", None, accept=(202,), cap=2).reason


def test_websocket_helpers(lf: ModuleType) -> None:
    assert lf.ws_url("http://127.0.0.1:8000/", "/ws/jobs/j1") == "ws://127.0.0.1:8000/ws/jobs/j1"
    assert lf.ws_url("https://h/p", "/ws/jobs/j1") == "wss://h/p/ws/jobs/j1"
    assert lf.terminal_status({"type": "snapshot", "job": {"status": "running"}}) is None
    assert lf.terminal_status({"type": "snapshot", "job": {"status": "succeeded"}}) == \
        "succeeded"
    assert lf.terminal_status({"type": "update", "step": 3, "status": "succeeded"}) is None
    assert lf.terminal_status({"type": "update", "status": "failed"}) == "failed"
    assert lf.terminal_status({"type": "lam", "message": {}}) is None


def test_task_counting_and_worker_merge(lf: ModuleType) -> None:
    worker, master = lf.Tally(), lf.Tally()
    worker.add("diamond", 4)
    worker.add("fanout20", 22)
    worker.note("overloaded")
    master.add("single", 1)
    master.merge(worker.drain())
    assert worker.total_tasks == 0
    assert master.total_tasks == 27 and sum(master.jobs.values()) == 3
    assert master.tasks_per_min(30.0) == 54.0
    text = master.summary(30.0)
    assert "27 tasks in 3 explicit jobs" in text and "54 tasks/min" in text
    assert "overloaded 1" in text
    master.reset()
    assert master.total_tasks == 0 and master.started is None


def test_user_classes(lf: ModuleType) -> None:
    assert lf.ScheduleUser.weight > lf.LamUser.weight >= lf.WatcherUser.weight
    assert lf.CpaUser.abstract
    names = {t.__name__ for t in lf.ScheduleUser.tasks}
    assert names == {"single", "diamond", "chain10", "fanout20"}


def test_loading_it_did_not_monkey_patch_this_process(lf: ModuleType) -> None:
    from gevent import monkey

    assert not monkey.is_module_patched("socket")
    assert not monkey.is_module_patched("threading")
