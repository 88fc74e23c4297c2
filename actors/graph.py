"""Task graphs: ToDo steps with dependencies, validated once and resolved for execution.

:func:`build_graph` turns a plan (ToDo models or plain dicts straight from JSON) into a frozen
:class:`TaskGraph`: every step checked against :class:`~actors.settings.GraphLimits` and the
:class:`ActionRegistry`, a stable topological order, parallel levels, dependents, the resolved
capability, timeout and browser/desktop session of every step (DESIGN.md D8).

Everything here is iterative and O(V + E) apart from the heap in the topological sort: plans
come from callers and LLMs, so a 10,000-step chain must neither hit the recursion limit nor
take noticeable time. Every problem becomes a :class:`~actors.errors.ValidationFailed` naming
the field path (``todos[3].depends_on[1]``), the bad value and the rule.
"""

from __future__ import annotations

import difflib
import heapq
import math
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError

from actors.errors import CycleError, MultipleValidationFailed, ValidationFailed
from actors.settings import GraphLimits

__all__ = [
    "STATEFUL_CAPABILITIES",
    "ActionRegistry",
    "ActionSpec",
    "TaskGraph",
    "ToDo",
    "build_graph",
    "default_registry",
    "fill_template",
]

STATEFUL_CAPABILITIES: frozenset[str] = frozenset({"browser", "windows"})
"""Capabilities whose steps hold state (a browser context, a desktop session) between steps,
so consecutive steps of one job must run in the same session on the same replica (D8)."""


# ------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class ActionSpec:
    """What the scheduler knows about one action name."""

    name: str
    """The value of ``ToDo.action``."""
    capability: str
    """The executor pool that runs it unless a step overrides it."""
    side_effect: bool = False
    """True when running it twice would double an effect (mail sent, file written); such
    steps carry an idempotency key and are verified before a retry (D5)."""
    description: str = ""
    """One line for docs, the console and LLM prompts."""


class ActionRegistry:
    """The actions a plan may use, each mapped to its default capability."""

    def __init__(self) -> None:
        self._specs: dict[str, ActionSpec] = {}
        self._capabilities: frozenset[str] | None = None
        self._action_caps: dict[str, str] | None = None

    def register(
        self, name: str, capability: str, *, side_effect: bool = False, description: str = ""
    ) -> None:
        """Add an action. Registering the same spec twice is a no-op; a different one for an
        existing name is a :class:`ValueError` (a silent override would re-route steps)."""
        if not name or not capability:
            raise ValueError("action name and capability must be non-empty")
        spec = ActionSpec(name, capability, side_effect, description)
        existing = self._specs.get(name)
        if existing is not None and existing != spec:
            raise ValueError(f"action {name!r} is already registered as {existing}")
        self._specs[name] = spec
        self._capabilities = self._action_caps = None

    def get(self, name: str) -> ActionSpec:
        """The spec of ``name``; :class:`KeyError` when it is unknown."""
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> tuple[str, ...]:
        """All action names, in registration order."""
        return tuple(self._specs)

    def capabilities(self) -> frozenset[str]:
        """Every capability some action maps to: the values a step's override may take."""
        if self._capabilities is None:
            self._capabilities = frozenset(spec.capability for spec in self._specs.values())
        return self._capabilities

    def action_capabilities(self) -> dict[str, str]:
        """action name → default capability (cached; build_graph reads it per plan)."""
        if self._action_caps is None:
            self._action_caps = {name: spec.capability for name, spec in self._specs.items()}
        return self._action_caps


_SHARED_DEFAULT: ActionRegistry | None = None


def shared_default_registry() -> ActionRegistry:
    """The default registry, built once per process (build_graph's default; do not
    register into it — make your own with :func:`default_registry`)."""
    global _SHARED_DEFAULT
    if _SHARED_DEFAULT is None:
        _SHARED_DEFAULT = default_registry()
    return _SHARED_DEFAULT


def default_registry() -> ActionRegistry:
    """A fresh registry with the seed's actions plus the mail, file, http and noop ones."""
    reg = ActionRegistry()
    for name, capability, side_effect, description in (
        ("open_app", "windows", False, "Start or focus a desktop application."),
        ("click", "browser", False, "Click the element matching `selector`."),
        ("type", "browser", False, "Type `text` into the element matching `selector`."),
        ("wait_for", "browser", False, "Wait until `selector` is visible."),
        ("playwright", "browser", False, "Run a Playwright script/operation from `params`."),
        ("uia", "windows", False, "Windows UI Automation operation on `selector`."),
        ("send_mail", "mail", True, "Send a mail (params: to, subject, body)."),
        ("noop", "noop", False, "Do nothing; useful to join branches."),
        ("sleep", "noop", False, "Wait params.ms (or `text` as ms) milliseconds."),
        ("compose_mail", "mail", False, "Prepare a draft mail."),
        ("attach_file", "mail", False, "Attach a file to the draft."),
        ("verify_mail", "mail", False, "Check Sent Items for a mail with our marker."),
        ("download", "browser", False, "Download a file in the browser session."),
        ("read_file", "file", False, "Read a file from the artifact store."),
        ("write_file", "file", True, "Write a file to the artifact store."),
        ("http_request", "http", False, "Call an HTTP endpoint (params: method, url, ...)."),
    ):
        reg.register(name, capability, side_effect=side_effect, description=description)
    return reg


# -------------------------------------------------------------------------------- steps


class ToDo(BaseModel):
    """One step of a plan (the seed's ToDo schema, extended)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: str = Field(description="Action name from the registry, e.g. `click`.")
    selector: str | None = Field(None, description="CSS/UIA selector the action targets.")
    text: str | None = Field(None, description="Text to type, or an action's main argument.")
    timeout: float | None = Field(
        None, description="Step timeout, seconds; None uses the configured default."
    )
    # Strict items: JSON `true` or "1" as a step index is a mistake, not something to coerce.
    depends_on: tuple[Annotated[int, Strict()], ...] = Field(
        (), description="Indices of the steps that must finish first."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Action-specific arguments (url, recipient, ms, ...)."
    )
    capability: str | None = Field(
        None, description="Overrides the action's default capability (executor pool)."
    )
    session: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Explicit session id; steps naming the same id share it (D8).",
    )
    name: str | None = Field(None, description='Human label, e.g. "login".')
    max_attempts: int | None = Field(
        None, ge=1, le=100, description="Attempts for this step, overriding the queue default."
    )


_TODO_FIELDS = ", ".join(ToDo.model_fields)
_TODO_LIST: TypeAdapter[list[ToDo]] = TypeAdapter(list[ToDo])


def _path(prefix: str, loc: Sequence[int | str]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _from_pydantic(prefix: str, exc: ValidationError) -> list[ValidationFailed]:
    """Re-express pydantic's errors in our path style so callers see one error shape."""
    errors: list[ValidationFailed] = []
    for err in exc.errors(include_url=False):
        path = _path(prefix, err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            rule = f"unknown field; allowed fields are {_TODO_FIELDS}"
            hint = _did_you_mean(str(err["loc"][-1]), tuple(ToDo.model_fields))
            errors.append(ValidationFailed(path, err["input"], rule, hint=hint))
        elif kind == "missing":
            errors.append(ValidationFailed(path, None, "required field is missing"))
        elif kind == "model_type":
            rule = f"each step must be an object with the fields {_TODO_FIELDS}"
            errors.append(ValidationFailed(path, err["input"], rule))
        else:
            errors.append(ValidationFailed(path, err["input"], err["msg"][:1].lower()
                                           + err["msg"][1:]))
    return errors


def _did_you_mean(value: str, choices: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"did you mean {match[0]}?" if match else None


# -------------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class TaskGraph:
    """A validated, acyclic plan with everything the orchestrator needs precomputed.

    All per-step tuples are indexed like ``steps``.
    """

    steps: tuple[ToDo, ...]
    """The validated steps, in the caller's order (indices are what ``depends_on`` uses)."""
    capabilities: tuple[str, ...]
    """Resolved capability (executor pool) per step."""
    timeouts_s: tuple[float, ...]
    """Resolved timeout per step, seconds."""
    order: tuple[int, ...]
    """A topological order; among steps ready together the lowest index comes first."""
    levels: tuple[tuple[int, ...], ...]
    """Level k holds the steps whose longest dependency chain has k edges; the steps of one
    level are independent of each other and may run at once. Indices ascend in a level."""
    dependents: tuple[tuple[int, ...], ...]
    """For each step, the steps that depend on it, ascending."""
    sessions: tuple[str | None, ...]
    """Session id per step for stateful capabilities (D8); None for the others."""

    def __len__(self) -> int:
        return len(self.steps)

    def ready(self, done: Collection[int]) -> list[int]:
        """Steps not in ``done`` whose dependencies are all in ``done``, ascending."""
        finished = done if isinstance(done, set | frozenset) else set(done)
        return [
            i
            for i, step in enumerate(self.steps)
            if i not in finished and all(d in finished for d in step.depends_on)
        ]

    def to_json(self) -> list[dict[str, Any]]:
        """The steps as plain JSON-ready dicts, leaving out defaults and None."""
        return [
            step.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
            for step in self.steps
        ]


def build_graph(
    todos: Sequence[ToDo | Mapping[str, Any]],
    *,
    limits: GraphLimits | None = None,
    registry: ActionRegistry | None = None,
    field: str = "todos",
) -> TaskGraph:
    """Validate a plan and resolve it into a :class:`TaskGraph`.

    ``todos`` holds :class:`ToDo` models or mappings (e.g. parsed JSON). ``field`` prefixes
    every error path. Raises :class:`ValidationFailed` for one problem,
    :class:`MultipleValidationFailed` for several (all per-step problems are collected), and
    :class:`CycleError` when the dependencies form a cycle.
    """
    limits = GraphLimits() if limits is None else limits
    registry = shared_default_registry() if registry is None else registry
    given: object = todos  # callers pass parsed JSON: the annotation is a hope, not a fact
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise ValidationFailed(field, given, "a plan must be a list of steps")
    n = len(todos)
    if n == 0:
        raise ValidationFailed(field, [], "a plan needs at least one step")
    if n > limits.max_steps:
        raise ValidationFailed(
            field, f"{n} steps", f"a plan may have at most {limits.max_steps} steps", quote=False
        )

    errors: list[ValidationFailed] = []
    steps: list[ToDo | None]
    try:
        # One call into pydantic-core for the whole list is ~30% faster than one per step.
        steps = list(_TODO_LIST.validate_python(list(given)))
    except ValidationError:
        # Slow path, only for bad input: per step, so the good steps still get checked and
        # the caller learns about every problem at once.
        steps = []
        for i, raw in enumerate(given):
            try:
                steps.append(raw if isinstance(raw, ToDo) else ToDo.model_validate(raw))
            except ValidationError as exc:
                errors.extend(_from_pydantic(f"{field}[{i}]", exc))
                steps.append(None)

    known_caps = registry.capabilities()
    action_caps = registry.action_capabilities()
    capabilities: list[str] = [""] * n
    timeouts: list[float] = [0.0] * n
    for i, step in enumerate(steps):
        if step is not None:
            _check_step(i, step, n=n, limits=limits, action_caps=action_caps,
                        known_caps=known_caps, field=field, errors=errors,
                        capabilities=capabilities, timeouts=timeouts)
    if errors:
        raise errors[0] if len(errors) == 1 else MultipleValidationFailed(errors)

    valid: list[ToDo] = [s for s in steps if s is not None]
    deps = [s.depends_on for s in valid]
    order, levels, dependents = _toposort(deps)
    sessions = _sessions(valid, deps, order, capabilities, field)
    return TaskGraph(
        steps=tuple(valid),
        capabilities=tuple(capabilities),
        timeouts_s=tuple(timeouts),
        order=order,
        levels=levels,
        dependents=dependents,
        sessions=sessions,
    )


def _check_step(
    i: int,
    step: ToDo,
    *,
    n: int,
    limits: GraphLimits,
    action_caps: Mapping[str, str],
    known_caps: frozenset[str],
    field: str,
    errors: list[ValidationFailed],
    capabilities: list[str],
    timeouts: list[float],
) -> None:
    """Check one step against the registry and the limits; fill in its resolved values.

    Runs once per step of every plan, so the common all-good path does no string building;
    messages are only formatted for a step that actually breaks a rule.
    """
    cap = action_caps.get(step.action)
    if cap is None:
        names = tuple(action_caps)
        errors.append(ValidationFailed(
            f"{field}[{i}].action", step.action, f"action must be one of {', '.join(names)}",
            hint=_did_you_mean(step.action, names),
        ))
        cap = ""
    if step.capability is not None:
        if step.capability in known_caps:
            cap = step.capability
        else:
            caps = sorted(known_caps)
            errors.append(ValidationFailed(
                f"{field}[{i}].capability", step.capability,
                f"capability must be one of {', '.join(caps)}",
                hint=_did_you_mean(step.capability, caps),
            ))
    capabilities[i] = cap

    if step.session is not None and cap and cap not in STATEFUL_CAPABILITIES:
        errors.append(ValidationFailed(
            f"{field}[{i}].session", step.session,
            f"session may only be set on steps with a stateful capability "
            f"({', '.join(sorted(STATEFUL_CAPABILITIES))}); this step's is {cap!r}",
        ))

    timeout = step.timeout
    if timeout is None:
        timeouts[i] = limits.default_step_timeout_s
    elif math.isfinite(timeout) and (
        limits.step_timeout_min_s <= timeout <= limits.step_timeout_max_s
    ):
        timeouts[i] = timeout
    else:
        errors.append(ValidationFailed(
            f"{field}[{i}].timeout", timeout,
            f"timeout must be a finite number of seconds between {limits.step_timeout_min_s}"
            f" and {limits.step_timeout_max_s}",
        ))

    for name, value in (("selector", step.selector), ("text", step.text)):
        if value is not None and len(value) > limits.max_text_chars:
            errors.append(ValidationFailed(
                f"{field}[{i}].{name}", value,
                f"{name} has {len(value)} characters; at most {limits.max_text_chars} allowed",
            ))

    deps = step.depends_on
    if not deps:
        return
    if len(deps) > limits.max_dependencies_per_step:
        errors.append(ValidationFailed(
            f"{field}[{i}].depends_on", f"{len(deps)} dependencies",
            f"a step may depend on at most {limits.max_dependencies_per_step} steps",
            quote=False,
        ))
    elif min(deps) < 0 or max(deps) >= n or i in deps or len(set(deps)) != len(deps):
        _explain_deps(i, deps, n, f"{field}[{i}].depends_on", errors)


def _explain_deps(
    i: int, deps: tuple[int, ...], n: int, at: str, errors: list[ValidationFailed]
) -> None:
    """Name every bad entry of a depends_on that the fast check found something wrong in."""
    seen: set[int] = set()
    for k, d in enumerate(deps):
        if not 0 <= d < n:
            errors.append(ValidationFailed(
                f"{at}[{k}]", d, f"a dependency must be the index of another step, 0..{n - 1}",
            ))
        elif d == i:
            errors.append(ValidationFailed(
                f"{at}[{k}]", d, "a step cannot depend on itself", hint="remove it",
            ))
        elif d in seen:
            errors.append(ValidationFailed(
                f"{at}[{k}]", d, "duplicate dependency; list each step once",
            ))
        seen.add(d)


def _toposort(
    deps: list[tuple[int, ...]],
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Kahn's algorithm with a min-heap (stable order), levels and dependents.

    Raises :class:`CycleError` with one concrete cycle when some steps never become ready.
    """
    n = len(deps)
    dependents: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    for i, ds in enumerate(deps):
        indegree[i] = len(ds)
        for d in ds:
            dependents[d].append(i)  # i ascends, so each list ends up sorted

    ready = [i for i in range(n) if indegree[i] == 0]  # ascending: already a valid heap
    level = [0] * n
    order: list[int] = []
    while ready:
        node = heapq.heappop(ready)
        order.append(node)
        next_level = level[node] + 1
        for child in dependents[node]:
            level[child] = max(level[child], next_level)
            indegree[child] -= 1
            if indegree[child] == 0:
                heapq.heappush(ready, child)

    if len(order) < n:
        raise CycleError(_find_cycle(deps, indegree))

    depth = max(level) + 1
    grouped: list[list[int]] = [[] for _ in range(depth)]
    for i in range(n):
        grouped[level[i]].append(i)
    return (
        tuple(order),
        tuple(tuple(g) for g in grouped),
        tuple(tuple(d) for d in dependents),
    )


def _find_cycle(deps: list[tuple[int, ...]], indegree: list[int]) -> list[int]:
    """One cycle among the steps Kahn's algorithm could not schedule.

    Each such step still waits on at least one other unscheduled step (that is why it was
    never ready), so walking "depends on" edges inside that set never gets stuck and must
    revisit a step: the walk from the first revisit is a cycle. It is a depth-first descent
    that never needs to backtrack, done with a loop, so it cannot hit the recursion limit.
    """
    stuck = [c > 0 for c in indegree]
    start = stuck.index(True)
    position: dict[int, int] = {}
    path: list[int] = []
    node = start
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if stuck[d])
    cycle = path[position[node]:]
    # Start at the lowest index so the same graph always reports the same cycle.
    low = cycle.index(min(cycle))
    cycle = cycle[low:] + cycle[:low]
    return [*cycle, cycle[0]]


def _sessions(
    steps: list[ToDo],
    deps: list[tuple[int, ...]],
    order: tuple[int, ...],
    capabilities: list[str],
    field: str,
) -> tuple[str | None, ...]:
    """Assign browser/desktop sessions (D8) in topological order, so deps are decided first.

    A stateful step joins the session of its lowest-index dependency of the same capability,
    else opens ``s{index}``; an explicit ``session`` wins. One session id never spans two
    capabilities: a browser context cannot host a desktop step.
    """
    n = len(steps)
    sessions: list[str | None] = [None] * n
    owner: dict[str, int] = {}
    errors: list[tuple[int, ValidationFailed]] = []
    for i in order:
        cap = capabilities[i]
        if cap not in STATEFUL_CAPABILITIES:
            continue  # _check_step already refused an explicit session here
        explicit = steps[i].session
        same = [d for d in deps[i] if capabilities[d] == cap]
        inherited = sessions[min(same)] if same else None
        session = explicit or inherited or f"s{i}"
        first = owner.setdefault(session, i)
        if capabilities[first] != cap:
            errors.append((i, ValidationFailed(
                f"{field}[{i}].session", session,
                f"session is already used by {field}[{first}] with capability "
                f"{capabilities[first]!r}; one session holds one capability",
            )))
        sessions[i] = session
    if errors:
        errors.sort(key=lambda pair: pair[0])  # by step index, not by visiting order
        found = [err for _, err in errors]
        raise found[0] if len(found) == 1 else MultipleValidationFailed(found)
    return tuple(sessions)


# ----------------------------------------------------------------------------- templates

_FORMATTER = string.Formatter()


def fill_template(
    template: Sequence[Mapping[str, Any]], slots: Mapping[str, Any], *, field: str = "plan"
) -> list[dict[str, Any]]:
    """Copy ``template`` with ``{slot}`` placeholders in every string value replaced.

    Strings nested in dicts and lists are filled too (keys are left alone; tuples come out as
    lists, the JSON shape). ``{{`` and ``}}`` stand for literal braces. Inserted values are
    ``str(slots[name])`` and are not formatted again, so a value holding ``{x}`` stays
    literal. Placeholders must be plain names: no attributes, indices, conversions or format
    specs. Every bad or unfilled placeholder is reported as :class:`ValidationFailed` naming
    its path, e.g. ``plan[2].params.to[0]``.
    """
    given: object = template  # parsed YAML/JSON: check the shape instead of trusting it
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise ValidationFailed(field, given, "a template must be a list of steps")
    errors: list[ValidationFailed] = []
    out: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        if not isinstance(item, Mapping):
            errors.append(ValidationFailed(f"{field}[{i}]", item, "each step must be an object"))
            continue
        out.append(_fill_value(item, f"{field}[{i}]", slots, errors))
    if errors:
        raise errors[0] if len(errors) == 1 else MultipleValidationFailed(errors)
    return out


def _fill_value(root: Any, root_path: str, slots: Mapping[str, Any],
                errors: list[ValidationFailed]) -> Any:
    """Deep-copy ``root`` filling strings, with an explicit stack instead of recursion."""
    holder: list[Any] = [None]
    # (value, its path, the container to write the copy into, the key/index there)
    stack: list[tuple[Any, str, Any, Any]] = [(root, root_path, holder, 0)]
    while stack:
        value, path, parent, key = stack.pop()
        if isinstance(value, str):
            parent[key] = _fill_string(value, path, slots, errors)
        elif isinstance(value, Mapping):
            copy: dict[Any, Any] = dict.fromkeys(value)  # keeps the key order
            parent[key] = copy
            # Pushed in reverse so errors come out in document order.
            for k, v in reversed(list(value.items())):
                stack.append((v, f"{path}.{k}", copy, k))
        elif isinstance(value, list | tuple):
            items: list[Any] = [None] * len(value)
            parent[key] = items
            for j in range(len(value) - 1, -1, -1):
                stack.append((value[j], f"{path}[{j}]", items, j))
        else:
            parent[key] = value
    return holder[0]


def _fill_string(text: str, path: str, slots: Mapping[str, Any],
                 errors: list[ValidationFailed]) -> str:
    if "{" not in text and "}" not in text:
        return text  # the common case: no parsing needed
    try:
        parts = list(_FORMATTER.parse(text))
    except ValueError as exc:
        errors.append(ValidationFailed(
            path, text, f"malformed placeholder ({exc}); write {{{{ and }}}} for literal braces"
        ))
        return text
    out: list[str] = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        placeholder = "{" + name + ("!" + conversion if conversion else "") + (
            ":" + spec if spec else "") + "}"
        if not name.isidentifier() or spec or conversion:
            errors.append(ValidationFailed(
                path, placeholder,
                "a placeholder must be a plain slot name such as {customer}; no index, "
                "attribute, conversion or format spec",
            ))
        elif name not in slots:
            known = ", ".join(sorted(slots)) or "none"
            errors.append(ValidationFailed(
                path, placeholder, f"slot {name!r} has no value; known slots: {known}",
                hint=_did_you_mean(name, sorted(slots)),
            ))
        else:
            out.append(str(slots[name]))
    return "".join(out)
