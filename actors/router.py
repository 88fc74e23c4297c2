"""Intent router: rules first (``configs/intents.yaml``), LLM fallback (:mod:`actors.llm`).

A request is tokenised once. Each intent scores keyword evidence (stems, so inflections and
light typos match; see the YAML header for the stem syntax) plus the evidence of the slots
its extractors find, scaled by the share of required slots found::

    confidence = keyword_score × (0.75 + 0.25 × required_slots_found / required_slots)

The best intent at or above ``router.min_confidence`` wins; otherwise the LLM provider (if
any) is asked. The plan is the intent's template filled with the slots and validated by
:func:`actors.graph.build_graph`. The catalogue is validated at load, plans included, so a
bad YAML file fails at start-up with a :class:`~actors.errors.ConfigError`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from actors import slots as _slots
from actors.errors import ConfigError, ValidationFailed
from actors.graph import TaskGraph, ToDo, build_graph, fill_template
from actors.llm import IntentInfo, LLMGuess, LLMProvider, make_provider
from actors.settings import GraphLimits, RouterSettings, Settings

__all__ = ["MAX_TEXT_CHARS", "IntentCatalogue", "IntentRouter", "RouteResult"]

MAX_TEXT_CHARS = 8_192
"""Longest request routed, characters (the LAM ``task`` limit's default)."""

Source = Literal["rules", "llm", "none", "explicit"]
Extractor = Literal[
    "email", "url", "company", "person", "period", "date", "time", "quoted", "after_colon",
    "patterns", "residual",
]
_NO_LLM_HINT = "no LLM is configured (set OPENAI_API_KEY or router.llm_provider)"


# ------------------------------------------------------------------------ YAML schema


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KeywordGroup(_Spec):
    """One piece of evidence: counts once, with ``weight``, when any stem matches."""

    group: str = Field(min_length=1, description="Name shown in reasons.")
    weight: float = Field(ge=-1, le=1, description="Score added on a match; < 0 penalises.")
    stems: tuple[str, ...] = Field(min_length=1, description="word, =word, *word, two words.")
    strip: bool = Field(True, description="Matched words are instruction, not slot content.")

    @field_validator("stems")
    @classmethod
    def _stems_ok(cls, stems: tuple[str, ...]) -> tuple[str, ...]:
        for stem in stems:
            parts = stem.split(" ")
            if len(parts) > 1:  # a phrase: word, =word or ... (any words) per part
                bad = "..." in (parts[0], parts[-1]) or not all(
                    p == "..." or p.lstrip("=").isalpha() for p in parts)
            else:
                body = stem.lstrip("=*")
                bad = len(stem) - len(body) > 1 or not body or not body.replace("-", "").isalnum()
            if bad:
                raise ValueError(f"stem {stem!r} is malformed; write word, =word, *word or a "
                                 "phrase of words (=word exact, ... for any words between)")
        return stems


class SlotSpec(_Spec):
    """A slot: how to find its value, and whether the plan needs it."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Placeholder name in the plan.")
    required: bool = Field(False, description="The plan cannot run without it.")
    extractor: tuple[Extractor, ...] = Field(min_length=1, description="Tried in order.")
    default: str | None = Field(None, description="Value of an optional slot not found.")
    evidence: float = Field(0.0, ge=0, le=1, description="Score added when found.")

    @field_validator("extractor", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_only_when_optional(self) -> SlotSpec:
        if self.required and self.default is not None:
            raise ValueError(f"slot {self.name!r} is required, so it cannot have a default")
        return self


class IntentSpec(_Spec):
    """One intent: evidence, slots, regexes and the plan template."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
    description: str = Field(min_length=1)
    priority: int = Field(0, ge=-1000, le=1000, description="Breaks exact score ties.")
    examples: tuple[str, ...] = ()
    keywords: tuple[KeywordGroup, ...] = Field(min_length=1)
    slots: tuple[SlotSpec, ...] = ()
    patterns: tuple[str, ...] = ()
    plan: tuple[dict[str, Any], ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> IntentSpec:
        names = [s.name for s in self.slots]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"slot names must be unique; repeated: {', '.join(dupes)}")
        if not any(g.weight > 0 for g in self.keywords):
            raise ValueError("at least one keyword group needs a positive weight")
        for i, pattern in enumerate(self.patterns):
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"patterns[{i}] {pattern!r} is not a valid regex: {exc}") from exc
            unknown = sorted(set(compiled.groupindex) - set(names))
            if unknown:
                raise ValueError(
                    f"patterns[{i}] captures {', '.join(unknown)}, which is not a slot; "
                    f"slots are {', '.join(names) or 'none'}"
                )
        for slot in self.slots:
            if "patterns" in slot.extractor and not any(
                f"(?P<{slot.name}>" in p for p in self.patterns
            ):
                raise ValueError(f"slot {slot.name!r} uses 'patterns' but no pattern captures it")
        used = set(_placeholders(self.plan))
        missing = sorted(used - set(names))
        if missing:
            raise ValueError(
                f"plan uses {', '.join('{' + m + '}' for m in missing)}, which is not a slot; "
                f"slots are {', '.join(names) or 'none'}"
            )
        return self


class CatalogueSpec(_Spec):
    """The whole ``intents.yaml``."""

    version: Literal[1] = 1
    intents: tuple[IntentSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> CatalogueSpec:
        names = [i.name for i in self.intents]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"intent names must be unique; repeated: {', '.join(dupes)}")
        return self


def _placeholders(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        try:
            yield from (name for _, name, _, _ in string.Formatter().parse(value) if name)
        except ValueError:
            return  # fill_template reports malformed braces with the path
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _placeholders(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _placeholders(item)


# -------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class CompiledIntent:
    """An intent ready for matching: stem ids per keyword group, phrases, regexes."""

    spec: IntentSpec
    groups: tuple[tuple[KeywordGroup, frozenset[int]], ...]  # group, ids of its word stems
    phrases: tuple[tuple[int, tuple[str, ...]], ...]  # (group index, phrase parts)
    patterns: tuple[re.Pattern[str], ...]
    info: IntentInfo


class IntentCatalogue:
    """The validated intents, with their stems compiled for fast matching.

    Build it with :meth:`from_yaml` or :meth:`from_mapping`, which also validate the plans.
    """

    def __init__(self, spec: CatalogueSpec) -> None:
        self.spec = spec
        ids: dict[tuple[str, str], int] = {}  # (kind, normalised stem) -> id
        intents: list[CompiledIntent] = []
        for ispec in spec.intents:
            groups: list[tuple[KeywordGroup, frozenset[int]]] = []
            phrases: list[tuple[int, tuple[str, ...]]] = []
            for gi, group in enumerate(ispec.keywords):
                members: set[int] = set()
                for stem in group.stems:
                    kind, text = _stem_kind(stem)
                    if kind == "phrase":
                        phrases.append((gi, tuple(_slots.normalize(p) for p in text.split(" "))))
                        continue
                    key = (kind, _slots.normalize(text))
                    members.add(ids.setdefault(key, len(ids)))
                groups.append((group, frozenset(members)))
            keywords = tuple(s.lstrip("=*") for g in ispec.keywords if g.weight > 0
                             for s in g.stems)
            info = IntentInfo(
                name=ispec.name, description=ispec.description,
                slots=tuple(s.name for s in ispec.slots),
                required_slots=tuple(s.name for s in ispec.slots if s.required),
                keywords=keywords, examples=ispec.examples,
            )
            intents.append(CompiledIntent(ispec, tuple(groups), tuple(phrases),
                                   tuple(re.compile(p) for p in ispec.patterns), info))
        # Prefix, exact and typo matches share the word's first letter; only infix stems
        # ("*rechnung") must be tried against every word.
        self._by_letter: dict[str, list[tuple[int, str, str]]] = {}
        self._infix: list[tuple[int, str, str]] = []
        for (kind, stem), sid in ids.items():
            bucket = self._infix if kind == "infix" else self._by_letter.setdefault(stem[0], [])
            bucket.append((sid, kind, stem))
        self._intents = {i.spec.name: i for i in intents}
        self._cache: dict[str, frozenset[int]] = {}

    @classmethod
    def from_yaml(cls, path: str | Path, *, graph_limits: GraphLimits | None = None
                  ) -> IntentCatalogue:
        """Load, validate (plans included) and compile ``path``; :class:`ConfigError` if bad."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"intents file {path} not found; set router.intents_file") from exc
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"intents file {path} cannot be read: {exc}") from exc
        return cls.from_mapping(raw, source=str(path), graph_limits=graph_limits)

    @classmethod
    def from_mapping(cls, raw: object, *, source: str = "<mapping>",
                     graph_limits: GraphLimits | None = None) -> IntentCatalogue:
        """Validate an already parsed catalogue (as ``from_yaml`` does)."""
        try:
            spec = CatalogueSpec.model_validate(raw)
        except ValidationError as exc:
            lines = []
            for err in exc.errors(include_url=False):
                loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"{loc.lstrip('.') or '<root>'}: {msg} (got {err['input']!r:.80})")
            raise ConfigError(f"intents file {source} is invalid:\n  " + "\n  ".join(lines)
                              ) from exc
        for i, ispec in enumerate(spec.intents):
            dummy = {s.name: f"<{s.name}>" for s in ispec.slots}
            at = f"intents[{i}].plan"
            try:
                build_graph(fill_template(ispec.plan, dummy, field=at), limits=graph_limits,
                            field=at)
            except ValidationFailed as exc:
                raise ConfigError(f"intents file {source}: {ispec.name}: {exc.message}"
                                  ) from exc
        return cls(spec)

    @property
    def names(self) -> tuple[str, ...]:
        """Intent names in file order."""
        return tuple(self._intents)

    @property
    def infos(self) -> tuple[IntentInfo, ...]:
        """What LLM providers are told about each intent."""
        return tuple(i.info for i in self._intents.values())

    def __contains__(self, name: object) -> bool:
        return name in self._intents

    def __getitem__(self, name: str) -> IntentSpec:
        return self._intents[name].spec

    def compiled(self, name: str) -> CompiledIntent:
        """The matching structures of one intent."""
        return self._intents[name]

    def word_stems(self, doc: _slots.Doc) -> list[frozenset[int]]:
        """Per token of ``doc``, the ids of the stems it matches (none inside addresses,
        URLs and quotes)."""
        return [frozenset() if t.masked or t.quoted else self._stem_ids(t.norm)
                for t in doc.tokens]

    def _stem_ids(self, word: str) -> frozenset[int]:
        """Ids of the word stems matching one normalised word (cached: words repeat)."""
        hit = self._cache.get(word)
        if hit is None:
            candidates = self._by_letter.get(word[:1], []) + self._infix
            hit = frozenset(sid for sid, kind, stem in candidates
                            if _stem_matches(kind, stem, word))
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[word] = hit
        return hit


def _stem_kind(stem: str) -> tuple[str, str]:
    if stem.startswith("="):
        return "exact", stem[1:]
    if stem.startswith("*"):
        return "infix", stem[1:]
    return ("phrase" if " " in stem else "prefix"), stem


def _stem_matches(kind: str, stem: str, word: str) -> bool:
    if kind == "exact":
        return word == stem
    if word.startswith(stem) or (kind == "infix" and stem in word):
        return True
    return len(stem) >= 5 and _slots.typo_prefix(word, stem)


# ------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class RouteResult:
    """What the router decided, and why."""

    intent: str | None
    slots: dict[str, str]
    confidence: float
    """0..1: the rule score, or the LLM's own confidence when ``source`` is ``llm``."""
    source: Source
    plan: list[ToDo]
    """The validated steps; empty without an intent or with required slots missing."""
    missing_slots: tuple[str, ...] = ()
    reason: str = ""
    alternatives: tuple[tuple[str, float], ...] = ()
    """Other intents with a rule score above 0, best first (at most three)."""
    graph: TaskGraph | None = field(default=None, compare=False, repr=False)
    """The plan as a resolved :class:`TaskGraph` (capabilities, sessions, levels)."""

    @property
    def complete(self) -> bool:
        """An intent with every required slot, so a plan to run; otherwise ask the user
        (``missing_slots``) or refuse (no ``intent``)."""
        return self.intent is not None and not self.missing_slots

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: the plan as ToDo dicts with 0-based ``depends_on``."""
        out: dict[str, Any] = {
            "intent": self.intent, "slots": dict(self.slots), "confidence": self.confidence,
            "source": self.source, "complete": self.complete,
            "missing_slots": list(self.missing_slots),
            "reason": self.reason,
            "alternatives": [{"intent": n, "confidence": c} for n, c in self.alternatives],
            "plan": self.graph.to_json() if self.graph else [],
        }
        if self.graph:
            out["capabilities"] = list(self.graph.capabilities)
            out["sessions"] = list(self.graph.sessions)
            out["levels"] = [list(level) for level in self.graph.levels]
        return out


@dataclass
class _Scored:
    name: str
    confidence: float
    groups: list[str]
    slots: dict[str, str]


# ------------------------------------------------------------------------------ router


class IntentRouter:
    """Routes a request to an intent, its slots and a validated plan."""

    def __init__(
        self,
        catalogue: IntentCatalogue,
        *,
        settings: RouterSettings,
        llm: LLMProvider | None = None,
        graph_limits: GraphLimits | None = None,
        max_text_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        self.catalogue = catalogue
        self.settings = settings
        self.llm = llm
        self._limits = graph_limits or GraphLimits()
        self._max_chars = max_text_chars

    @classmethod
    def from_settings(cls, settings: Settings) -> IntentRouter:
        """Catalogue from ``router.intents_file``, provider from :func:`make_provider`."""
        catalogue = IntentCatalogue.from_yaml(settings.router.intents_file,
                                              graph_limits=settings.graph)
        return cls(catalogue, settings=settings.router, llm=make_provider(settings),
                   graph_limits=settings.graph, max_text_chars=settings.lam.max_task_chars)

    def route_rules(self, text: str) -> RouteResult:
        """Rules only, synchronous (well under a millisecond for a typical request)."""
        return self._rules(self._doc(text))

    async def route(self, text: str, *, locale: str | None = None) -> RouteResult:
        """Rules, then the LLM when no rule is confident enough.

        ``locale`` (e.g. ``de-DE``) is a hint for the LLM; the rules are bilingual. Raises
        :class:`~actors.errors.DependencyUnavailable` when the LLM cannot be reached or
        answers garbage — the request may route fine later, so "no intent" would be wrong.
        """
        doc = self._doc(text)
        result = self._rules(doc)
        if result.intent is not None or self.llm is None:
            return result
        guess = await self.llm.classify(text, self.catalogue.infos, locale=locale)
        return self._from_guess(doc, guess, result.alternatives)

    # ----------------------------------------------------------------------- internals

    def _doc(self, text: str) -> _slots.Doc:
        if not isinstance(text, str) or not text.strip():
            raise ValidationFailed("text", text, "the request must not be empty",
                                   hint="send the user's words, e.g. 'Analysiere Q3 Churn'")
        if len(text) > self._max_chars:
            raise ValidationFailed("text", f"{len(text)} characters",
                                   f"a request may have at most {self._max_chars} characters",
                                   quote=False)
        return _slots.Doc(text)

    def _rules(self, doc: _slots.Doc) -> RouteResult:
        stem_ids = self.catalogue.word_stems(doc)
        scored = [self._score(doc, name, stem_ids) for name in self.catalogue.names]
        ranked = sorted(scored, key=lambda s: (
            -s.confidence, -self.catalogue[s.name].priority, s.name))
        best = ranked[0]
        alternatives = tuple((s.name, s.confidence) for s in ranked[1:4] if s.confidence > 0)
        floor = self.settings.min_confidence
        if best.confidence >= floor:
            groups = ", ".join(best.groups)
            reason = f"rules: {best.name} scored {best.confidence:.2f} from {groups}"
            return self._result(best.name, best.slots, best.confidence, "rules", reason,
                                alternatives)
        why = f"no rule matched with confidence ≥ {floor:g}"
        why += f" and {_NO_LLM_HINT}" if self.llm is None else f"; asking the LLM ({self.llm.name})"
        if best.confidence > 0:
            why += f"; best candidate: {best.name} at {best.confidence:.2f}"
        alternatives = tuple((s.name, s.confidence) for s in ranked[:3] if s.confidence > 0)
        return RouteResult(None, {}, best.confidence, "none", [], (), why, alternatives)

    def _score(self, doc: _slots.Doc, name: str, stem_ids: list[frozenset[int]],
               *, force: bool = False) -> _Scored:
        intent = self.catalogue.compiled(name)
        hit_groups: set[int] = set()
        strip: set[int] = set()
        content: set[int] = set()
        for gi, (group, members) in enumerate(intent.groups):
            for ti, ids in enumerate(stem_ids):
                if ids & members:
                    hit_groups.add(gi)
                    (strip if group.strip else content).add(ti)
        for gi, parts in intent.phrases:
            for found in _slots.phrase_hits(doc, parts):
                hit_groups.add(gi)
                (strip if intent.groups[gi][0].strip else content).update(found)
        kw = sum(intent.groups[gi][0].weight for gi in hit_groups)
        groups = [intent.groups[gi][0].group for gi in sorted(hit_groups)]
        if kw <= 0 and not force:
            return _Scored(name, 0.0, groups, {})
        slots, spans = self._extract(doc, intent, strip, content)
        evidence = [s for s in intent.spec.slots if s.name in spans and s.evidence > 0]
        kw += sum(s.evidence for s in evidence)
        groups += [f"slot {s.name}" for s in evidence]
        required = [s.name for s in intent.spec.slots if s.required]
        missing = tuple(n for n in required if n not in slots)
        share = 1 - len(missing) / len(required) if required else 1.0
        confidence = round(max(0.0, min(1.0, kw)) * (0.75 + 0.25 * share), 3)
        return _Scored(name, confidence, groups, slots)

    def _extract(self, doc: _slots.Doc, intent: CompiledIntent, strip: set[int], content: set[int]
                 ) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
        values: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        for slot in intent.spec.slots:
            for kind in slot.extractor:
                hit = self._first_free(doc, intent, slot, kind, spans, strip, content)
                if hit is not None:
                    values[slot.name], spans[slot.name] = hit[0], (hit[1], hit[2])
                    break
        return values, spans

    def _first_free(self, doc: _slots.Doc, intent: CompiledIntent, slot: SlotSpec, kind: str,
                    taken: dict[str, tuple[int, int]], strip: set[int], content: set[int]
                    ) -> _slots.Hit | None:
        """The first candidate of one extractor that overlaps no slot found before."""
        candidates: Iterable[_slots.Hit]
        if kind == "patterns":
            # A regex capture is trimmed like the slot's typed extractor would trim it.
            named = {"company", "person"} & set(slot.extractor)
            cleaner = _slots.clean_name if named else _slots.clean_text
            candidates = _slots.pattern_hits(doc, intent.patterns, slot.name, cleaner)
        elif kind == "residual":
            blank = set(strip)
            for start, end in taken.values():
                blank.update(doc.token_range(start, end))
            found = _slots.residual(doc, blank, content)
            candidates = [found] if found else []
        else:
            candidates = _EXTRACTORS[kind](doc)
        for hit in candidates:
            if hit[0] and not any(hit[1] < e and s < hit[2] for s, e in taken.values()):
                return hit
        return None

    def plan_for(self, intent: str, slots: Mapping[str, Any]) -> RouteResult:
        """The plan of a named intent with caller-given slots (a LAM request that names its
        ``intent`` and carries ``payload.slots`` needs no routing). Unknown intent → a
        result without intent; missing required slots are reported as usual."""
        if intent not in self.catalogue:
            known = ", ".join(info.name for info in self.catalogue.infos)
            return RouteResult(None, {}, 0.0, "none", [], (), f"unknown intent {intent!r}; "
                               f"known intents: {known}", ())
        values = {str(k): str(v) for k, v in slots.items()}
        return self._result(intent, values, 1.0, "explicit", "intent named by the caller",
                            ())

    def _result(self, name: str, slots: dict[str, str], confidence: float, source: Source,
                reason: str, alternatives: tuple[tuple[str, float], ...]) -> RouteResult:
        spec = self.catalogue[name]
        missing = tuple(s.name for s in spec.slots if s.required and s.name not in slots)
        values = {s.name: slots.get(s.name, s.default or "")
                  for s in spec.slots if s.name in slots or not s.required}
        if missing:
            reason += (f"; missing required slot(s) {', '.join(missing)}: ask the user for "
                       "them (no plan built)")
            return RouteResult(name, values, confidence, source, [], missing, reason,
                               alternatives)
        at = f"{name}.plan"
        graph = build_graph(fill_template(spec.plan, values, field=at), limits=self._limits,
                            field=at)
        return RouteResult(name, values, confidence, source, list(graph.steps), (), reason,
                           alternatives, graph)

    def _from_guess(self, doc: _slots.Doc, guess: LLMGuess,
                    alternatives: tuple[tuple[str, float], ...]) -> RouteResult:
        assert self.llm is not None
        floor = self.settings.min_confidence
        head = f"no rule matched with confidence ≥ {floor:g}; the LLM ({self.llm.name})"
        if guess.intent is None or guess.intent not in self.catalogue:
            why = f"{head} found no intent: {guess.reason or 'no answer'}"
            return RouteResult(None, {}, guess.confidence, "none", [], (), why, alternatives)
        if guess.confidence < self.settings.llm_min_confidence:
            why = (f"{head} guessed {guess.intent} with confidence {guess.confidence:.2f} < "
                   f"{self.settings.llm_min_confidence:g}")
            return RouteResult(None, {}, guess.confidence, "none", [], (), why, alternatives)
        # Extractors give canonical values (Q3, 15:00); the LLM fills what they missed.
        found = self._score(doc, guess.intent, self.catalogue.word_stems(doc), force=True).slots
        slots = {**guess.slots, **found}
        return self._result(guess.intent, slots, round(guess.confidence, 3), "llm",
                            f"llm: {guess.reason}", alternatives)


_EXTRACTORS: dict[str, Callable[[_slots.Doc], list[_slots.Hit]]] = {
    "email": _slots.emails, "url": _slots.urls, "company": _slots.companies,
    "person": _slots.persons, "period": _slots.periods, "date": _slots.dates,
    "time": _slots.times, "quoted": _slots.quoted, "after_colon": _slots.after_colon,
}
