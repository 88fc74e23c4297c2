"""LLM providers: the intent router's fallback and the seed's ``generate`` API.

One contract (:class:`LLMProvider`), two backends:

- :class:`OpenAIProvider` — any OpenAI-compatible chat-completions endpoint through the real
  ``openai.AsyncOpenAI`` client (OpenAI itself, or Ollama via ``router.llm_base_url``). Answers
  are requested as JSON objects and validated with pydantic; every transport or format
  problem becomes one :class:`~actors.errors.DependencyUnavailable`, never a crash.
- :class:`OfflineProvider` — deterministic and without network: word overlap between the
  request and each intent's description, keywords and examples. For tests and air-gapped
  demos.

:func:`make_provider` picks one from the settings, or None when no LLM is configured
(``llm_provider: none``, or ``auto`` without an API key or endpoint).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from actors.errors import ConfigError, DependencyUnavailable, preview
from actors.settings import Settings
from actors.slots import STOPWORDS, normalize

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types.chat import ChatCompletionMessageParam

__all__ = [
    "IntentInfo",
    "LLMGuess",
    "LLMProvider",
    "OfflineProvider",
    "OpenAIProvider",
    "make_provider",
]

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class IntentInfo:
    """What a provider learns about one intent."""

    name: str
    """Intent name, e.g. ``invoice.export_and_mail``; the only valid answers."""
    description: str
    """One or two sentences for the prompt."""
    slots: tuple[str, ...] = ()
    """Slot names the provider may fill."""
    required_slots: tuple[str, ...] = ()
    """The subset of ``slots`` the plan cannot do without."""
    keywords: tuple[str, ...] = ()
    """Keyword stems of the rules (vocabulary for the offline provider)."""
    examples: tuple[str, ...] = ()
    """Example requests (few-shot prompt, offline vocabulary)."""


@dataclass(frozen=True)
class LLMGuess:
    """A provider's answer: an intent name from the list (or None), slots, confidence 0..1."""

    intent: str | None
    slots: dict[str, str] = field(default_factory=dict)
    confidence: float = 0.0
    reason: str = ""
    """Why, in one line (shown in the route result)."""


class LLMProvider(Protocol):
    """The contract every LLM backend fulfils. Errors: :class:`DependencyUnavailable`."""

    name: str
    """Short label for reasons and logs, e.g. ``openai:gpt-4o-mini``."""

    async def classify(
        self, text: str, intents: Sequence[IntentInfo], *, locale: str | None = None
    ) -> LLMGuess:
        """Pick one of ``intents`` for ``text`` (or None) and fill its slots."""
        ...

    async def generate(self, prompt: str) -> str:
        """Free text for ``prompt``."""
        ...

    async def generate_structured(self, prompt: str, schema: type[M]) -> M:
        """An instance of ``schema`` for ``prompt``, validated."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class _Classification(BaseModel):
    """The JSON object the classify prompt asks for."""

    model_config = ConfigDict(extra="ignore")

    intent: str | None = None
    slots: dict[str, str | int | float | bool | None] = {}
    confidence: float = 0.0


def _guess_from(answer: _Classification, intents: Sequence[IntentInfo], who: str) -> LLMGuess:
    """Check an answer against the intent list: unknown names and slots never pass."""
    name = (answer.intent or "").strip()
    if name.lower() in ("", "none", "null"):
        return LLMGuess(None, {}, 0.0, f"{who} found no fitting intent")
    by_name = {info.name: info for info in intents}
    info = by_name.get(name)
    if info is None:
        return LLMGuess(
            None, {}, 0.0,
            f"{who} answered unknown intent {preview(name)}; known: {', '.join(by_name)}",
        )
    slots = {
        key: str(value).strip()
        for key, value in answer.slots.items()
        if key in info.slots and value is not None and str(value).strip()
    }
    confidence = min(1.0, max(0.0, answer.confidence))
    return LLMGuess(name, slots, confidence, f"{who} chose {name}")


def classify_prompt(intents: Sequence[IntentInfo], *, locale: str | None = None) -> str:
    """The system prompt for classification: the intents, their slots and the answer shape."""
    lines = [
        "You route requests for a process-automation platform to exactly one intent.",
        "Intents:",
    ]
    for info in intents:
        slots = ", ".join(
            f"{s} (required)" if s in info.required_slots else s for s in info.slots
        )
        lines.append(f"- {info.name}: {info.description} Slots: {slots or 'none'}.")
        lines.extend(f"  Example: {example}" for example in info.examples[:2])
    lines += [
        'Answer with one JSON object: {"intent": <intent name or null>, "slots": {<slot>: '
        '<value copied from the request>}, "confidence": <number 0..1>}.',
        "Use null when no intent fits. Never invent intent or slot names.",
    ]
    if locale:
        lines.append(f"The request's locale is {locale}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- OpenAI


class OpenAIProvider:
    """Chat completions on an OpenAI-compatible endpoint, JSON answers validated."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 1,
    ) -> None:
        # Imported here so that rules-only routing (CLI, tests) never pays openai's import.
        from openai import AsyncOpenAI

        self.name = f"openai:{model}"
        self.model = model
        self._timeout_s = timeout_s
        self._dependency = f"LLM endpoint {base_url or 'api.openai.com'} (model {model})"
        self._client: AsyncOpenAI = AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=max_retries
        )

    async def classify(
        self, text: str, intents: Sequence[IntentInfo], *, locale: str | None = None
    ) -> LLMGuess:
        content = await self._complete(classify_prompt(intents, locale=locale), text, json=True)
        answer = self._parse(content, _Classification)
        return _guess_from(answer, intents, self.name)

    async def generate(self, prompt: str) -> str:
        return await self._complete("You are a helpful assistant.", prompt, json=False)

    async def generate_structured(self, prompt: str, schema: type[M]) -> M:
        system = (
            "Answer with one JSON object that matches this JSON schema:\n"
            + json.dumps(schema.model_json_schema())
        )
        return self._parse(await self._complete(system, prompt, json=True), schema)

    async def aclose(self) -> None:
        await self._client.close()

    def _parse(self, content: str, schema: type[M]) -> M:
        try:
            return schema.model_validate_json(content)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise DependencyUnavailable(
                self._dependency,
                f"returned an answer that is not a valid {schema.__name__} JSON object "
                f"({first['msg']}): {preview(content)}",
            ) from exc

    async def _complete(self, system: str, user: str, *, json: bool) -> str:
        import openai

        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=0,
                response_format={"type": "json_object"} if json else openai.omit,
            )
        except openai.APITimeoutError as exc:
            raise DependencyUnavailable(
                self._dependency, f"no answer within {self._timeout_s:g} s"
            ) from exc
        except openai.APIConnectionError as exc:
            raise DependencyUnavailable(self._dependency, f"cannot connect: {exc}") from exc
        except openai.RateLimitError as exc:
            raise DependencyUnavailable(
                self._dependency, "rate limit reached (HTTP 429)", retry_after_s=10.0
            ) from exc
        except openai.APIStatusError as exc:
            hint = "; check OPENAI_API_KEY" if exc.status_code in (401, 403) else ""
            raise DependencyUnavailable(
                self._dependency, f"answered HTTP {exc.status_code}{hint}"
            ) from exc
        except openai.OpenAIError as exc:  # malformed responses and the like
            raise DependencyUnavailable(self._dependency, f"failed: {exc}") from exc
        if not response.choices or not response.choices[0].message.content:
            raise DependencyUnavailable(self._dependency, "returned no content")
        return response.choices[0].message.content


# ------------------------------------------------------------------------------ offline

def _words(text: str) -> list[str]:
    """Normalised content words (the router's normalisation and stop words)."""
    return [w for w in (normalize(raw) for raw in _WORD.findall(text))
            if len(w) >= 2 and w not in STOPWORDS and not w.isdigit()]


_WORD = re.compile(r"\w+")


class OfflineProvider:
    """Deterministic, network-free stand-in for an LLM.

    ``classify`` scores each intent by the share of the request's content words that
    prefix-match its vocabulary (description, keyword stems, examples); the confidence is
    that share. It fills no slots — the router's extractors do. ``generate`` answers from
    ``responses`` (the first key contained in the prompt wins) or echoes the prompt.
    """

    def __init__(self, *, responses: Mapping[str, str] | None = None) -> None:
        self.name = "offline"
        self._responses = dict(responses or {})

    async def classify(
        self, text: str, intents: Sequence[IntentInfo], *, locale: str | None = None
    ) -> LLMGuess:
        words = _words(text)
        if not words:
            return LLMGuess(None, {}, 0.0, "offline provider: the text has no content words")
        best: tuple[float, str] = (0.0, "")
        for info in intents:
            source = " ".join((info.description, *info.keywords, *info.examples))
            vocab = {w for w in _words(source.replace("*", " ").replace("=", " ")) if len(w) >= 3}
            hits = sum(1 for w in words if any(_related(w, v) for v in vocab))
            score = hits / len(words)
            if score > best[0]:
                best = (score, info.name)
        if not best[1]:
            return LLMGuess(None, {}, 0.0, "offline provider: no word matches any intent")
        share = round(best[0], 3)
        return LLMGuess(best[1], {}, share, f"offline provider: {share:.0%} of the words fit")

    async def generate(self, prompt: str) -> str:
        for key, answer in self._responses.items():
            if key in prompt:
                return answer
        return f"[offline] {prompt[:200]}"

    async def generate_structured(self, prompt: str, schema: type[M]) -> M:
        text = await self.generate(prompt)
        try:
            return schema.model_validate_json(text)
        except ValidationError as exc:
            raise DependencyUnavailable(
                "offline LLM",
                f"no canned JSON answer for {schema.__name__}; pass responses={{...}}",
            ) from exc

    async def aclose(self) -> None:
        return None


def _related(word: str, vocab: str) -> bool:
    """Same word up to its inflection: one is a prefix of the other (5 letters suffice)."""
    if word.startswith(vocab) or vocab.startswith(word):
        return min(len(word), len(vocab)) >= 3
    return len(word) >= 5 and len(vocab) >= 5 and word[:5] == vocab[:5]


# ----------------------------------------------------------------------------- factory


def make_provider(settings: Settings) -> LLMProvider | None:
    """The provider ``settings.router`` asks for; None when no LLM is configured."""
    router = settings.router
    kind = router.llm_provider
    if kind == "none":
        return None
    if kind == "offline":
        return OfflineProvider()
    key = settings.llm_api_key()
    if kind == "auto" and key is None and router.llm_base_url is None:
        return None
    if key is None and router.llm_base_url is None:
        raise ConfigError(
            "router.llm_provider is 'openai' but no API key is set: set OPENAI_API_KEY or "
            "router.llm_api_key, or router.llm_base_url for a local endpoint such as Ollama"
        )
    return OpenAIProvider(
        # Local endpoints (Ollama) ignore the key, but the client insists on one.
        api_key=key or "unused",
        model=router.llm_model,
        base_url=router.llm_base_url,
        timeout_s=router.llm_timeout_s,
        max_retries=router.llm_max_retries,
    )
