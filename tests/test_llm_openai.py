"""OpenAIProvider through the real ``openai`` client against a local chat-completions server.

The server (aiohttp on 127.0.0.1, a free port) speaks ``POST /v1/chat/completions`` and is
told per test how to answer: a good classification, garbage, an unknown intent, HTTP 500, or
nothing at all (timeout). Nothing here reaches the real OpenAI.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel

from actors.errors import DependencyUnavailable
from actors.llm import OpenAIProvider, make_provider
from actors.router import IntentCatalogue, IntentRouter
from actors.settings import CONFIG_DIR, RouterSettings, load_settings

UNCLEAR = "Wie steht's eigentlich um die Churn Rate in Q3?"


@dataclass
class FakeOpenAI:
    """A chat-completions endpoint whose next answers the test decides."""

    mode: str = "ok"
    content: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def answer(self, **payload: Any) -> None:
        self.mode, self.content = "ok", json.dumps(payload)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.mode == "http500":
            return web.json_response({"error": {"message": "boom", "type": "server_error"}},
                                     status=500)
        if self.mode == "hang":
            await self.release.wait()
        body = self.requests[-1]
        return web.json_response({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


@pytest.fixture(autouse=True)
def _no_real_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


def _provider(fake: FakeOpenAI, *, timeout_s: float = 5.0) -> OpenAIProvider:
    return OpenAIProvider(api_key="sk-local-test", model="test-model", base_url=fake.url,
                          timeout_s=timeout_s, max_retries=0)


@pytest.fixture
async def router(fake: FakeOpenAI) -> AsyncIterator[IntentRouter]:
    provider = _provider(fake, timeout_s=0.5)
    catalogue = IntentCatalogue.from_yaml(CONFIG_DIR / "intents.yaml")
    yield IntentRouter(catalogue, settings=RouterSettings(), llm=provider)
    await provider.aclose()


async def test_a_good_answer_routes_through_the_llm(
    fake: FakeOpenAI, router: IntentRouter
) -> None:
    assert router.route_rules(UNCLEAR).intent is None  # so the LLM is asked
    fake.answer(intent="report.analyse", slots={"topic": "Churn Rate", "bogus": "x"},
                confidence=0.87)
    result = await router.route(UNCLEAR, locale="de-DE")
    assert (result.intent, result.source, result.confidence) == ("report.analyse", "llm", 0.87)
    assert result.slots["period"] == "Q3" and "Churn Rate" in result.slots["topic"]
    assert "bogus" not in result.slots
    assert [s.action for s in result.plan] == ["http_request", "http_request", "write_file"]

    (request,) = fake.requests
    assert request["model"] == "test-model"
    assert request["response_format"] == {"type": "json_object"}
    system, user = request["messages"]
    assert system["role"] == "system" and user == {"role": "user", "content": UNCLEAR}
    for name in router.catalogue.names:
        assert f"- {name}:" in system["content"]
    assert "topic (required)" in system["content"] and "de-DE" in system["content"]
    assert fake.headers[0]["Authorization"] == "Bearer sk-local-test"


async def test_garbage_json_is_a_clear_dependency_error(
    fake: FakeOpenAI, router: IntentRouter
) -> None:
    fake.mode, fake.content = "ok", "Sure! The intent is report.analyse {"
    with pytest.raises(DependencyUnavailable) as err:
        await router.route(UNCLEAR)
    assert "not a valid _Classification JSON object" in err.value.message
    assert "test-model" in err.value.message and err.value.retryable


async def test_an_unknown_intent_is_no_intent(fake: FakeOpenAI, router: IntentRouter) -> None:
    fake.answer(intent="pizza.order", slots={}, confidence=0.99)
    result = await router.route(UNCLEAR)
    assert result.intent is None and result.source == "none" and result.plan == []
    assert "unknown intent 'pizza.order'" in result.reason


async def test_null_intent_and_low_confidence_are_no_intent(
    fake: FakeOpenAI, router: IntentRouter
) -> None:
    fake.answer(intent=None, slots={}, confidence=0.0)
    assert "found no fitting intent" in (await router.route(UNCLEAR)).reason
    fake.answer(intent="report.analyse", slots={}, confidence=0.3)
    result = await router.route(UNCLEAR)
    assert result.intent is None and "confidence 0.30 < 0.5" in result.reason


async def test_http_500_is_a_dependency_error(fake: FakeOpenAI, router: IntentRouter) -> None:
    fake.mode = "http500"
    with pytest.raises(DependencyUnavailable, match="answered HTTP 500"):
        await router.route(UNCLEAR)
    assert len(fake.requests) == 1  # max_retries=0


async def test_a_hanging_endpoint_times_out(fake: FakeOpenAI, router: IntentRouter) -> None:
    fake.mode = "hang"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DependencyUnavailable, match=r"no answer within 0\.5 s"):
        await router.route(UNCLEAR)
    assert loop.time() - started < 3


async def test_nobody_listening_is_a_dependency_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIProvider(api_key="k", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                              timeout_s=2, max_retries=0)
    try:
        with pytest.raises(DependencyUnavailable, match="cannot connect"):
            await provider.generate("hi")
    finally:
        await provider.aclose()


class Plan(BaseModel):
    steps: list[str]


async def test_generate_and_generate_structured(fake: FakeOpenAI) -> None:
    provider = _provider(fake)
    try:
        fake.mode, fake.content = "ok", "Hallo!"
        assert await provider.generate("Sag hallo") == "Hallo!"
        assert "response_format" not in fake.requests[-1]
        fake.answer(steps=["login", "export"])
        assert await provider.generate_structured("plan it", Plan) == Plan(
            steps=["login", "export"])
        assert '"steps"' in fake.requests[-1]["messages"][0]["content"]  # the JSON schema
        fake.answer(steps="not a list")
        with pytest.raises(DependencyUnavailable, match="not a valid Plan JSON object"):
            await provider.generate_structured("plan it", Plan)
        fake.mode, fake.content = "ok", ""
        with pytest.raises(DependencyUnavailable, match="returned no content"):
            await provider.generate("x")
    finally:
        await provider.aclose()


async def test_a_local_endpoint_needs_no_key(fake: FakeOpenAI) -> None:
    """Ollama-style: only router.llm_base_url is set; auto picks the OpenAI client."""
    settings = load_settings(router={"llm_base_url": fake.url, "llm_model": "llama3"})
    provider = make_provider(settings)
    assert isinstance(provider, OpenAIProvider)
    try:
        fake.answer(intent="web.open", slots={"url": "https://example.com"}, confidence=0.9)
        router = IntentRouter(IntentCatalogue.from_yaml(settings.router.intents_file),
                              settings=settings.router, llm=provider)
        result = await router.route("die Beispielseite bitte")
        assert result.slots == {"url": "https://example.com"} and result.source == "llm"
        assert fake.requests[-1]["model"] == "llama3"
    finally:
        await provider.aclose()
