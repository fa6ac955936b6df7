"""The demo's provisioning requests and its seeded simulated LLM, with a ledger of its faults.

The model makes the design's mistakes on purpose: malformed proposals (JSON syntax errors,
missing or ill-typed fields) that it usually fixes when re-asked with the validation feedback,
well-formed but semantically wrong plans (wrong instance type, a missing or wrong security
group, a missing or wrong tag), and now and then a destructive plan (terminating the
production instances, deleting a security group). Every proposal it emits, faulty or not, goes
into a :class:`FaultLedger`: the ground truth the loop's recorded events are checked against.

Everything here is pure Python: no boto3, no pydantic, so it can be driven on its own.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from closedloop.loop import Attempt

INSTANCE_TYPES: tuple[str, ...] = ("t3.micro", "t3.small", "t3.medium", "m5.large", "c5.xlarge")
SECURITY_GROUPS: tuple[str, ...] = ("web", "ssh", "db", "cache", "monitoring")
TEAMS: tuple[str, ...] = ("payments", "search", "checkout", "identity", "data")
ENVIRONMENTS: tuple[str, ...] = ("dev", "staging")
REQUIRED_TAGS: tuple[str, ...] = ("Name", "owner", "env", "cost-center")

SYSTEM_PROMPT = (
    "You are an infrastructure provisioning agent. Reply with one JSON object and nothing "
    'else: {"action": "run_instances", "instance_type": str, "security_groups": [str], '
    '"tags": {str: str}, "count": int}. Use exactly the instance type, security groups and '
    "tags the request asks for. Never terminate or delete existing resources."
)


class FaultCategory(StrEnum):
    """The three kinds of mistake the design describes, and the loop layer that must catch it."""

    MALFORMED = "malformed"
    """Caught by immediate validation, corrected (usually) by re-ask."""
    SEMANTIC = "semantic"
    """Passes validation; caught by outcome verification."""
    DESTRUCTIVE = "destructive"
    """Flagged critical by validation: blocked, never executed, never re-asked."""


class FaultKind(StrEnum):
    """What exactly the model got wrong in one proposal."""

    JSON_SYNTAX = "json_syntax"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    WRONG_INSTANCE_TYPE = "wrong_instance_type"
    MISSING_SECURITY_GROUP = "missing_security_group"
    WRONG_SECURITY_GROUP = "wrong_security_group"
    MISSING_TAG = "missing_tag"
    WRONG_TAG = "wrong_tag"
    TERMINATE_PRODUCTION = "terminate_production"
    DELETE_SECURITY_GROUP = "delete_security_group"

    @property
    def category(self) -> FaultCategory:
        """The category this kind belongs to."""
        return _CATEGORY[self]


_CATEGORY = {
    FaultKind.JSON_SYNTAX: FaultCategory.MALFORMED,
    FaultKind.MISSING_FIELD: FaultCategory.MALFORMED,
    FaultKind.WRONG_TYPE: FaultCategory.MALFORMED,
    FaultKind.WRONG_INSTANCE_TYPE: FaultCategory.SEMANTIC,
    FaultKind.MISSING_SECURITY_GROUP: FaultCategory.SEMANTIC,
    FaultKind.WRONG_SECURITY_GROUP: FaultCategory.SEMANTIC,
    FaultKind.MISSING_TAG: FaultCategory.SEMANTIC,
    FaultKind.WRONG_TAG: FaultCategory.SEMANTIC,
    FaultKind.TERMINATE_PRODUCTION: FaultCategory.DESTRUCTIVE,
    FaultKind.DELETE_SECURITY_GROUP: FaultCategory.DESTRUCTIVE,
}
_MALFORMED = tuple(k for k in FaultKind if k.category is FaultCategory.MALFORMED)
_DESTRUCTIVE = tuple(k for k in FaultKind if k.category is FaultCategory.DESTRUCTIVE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionRequest:
    """What a user asked the agent for: one EC2 instance of a type, in groups, with tags."""

    index: int
    instance_type: str
    security_groups: tuple[str, ...]
    tags: dict[str, str]

    @classmethod
    def from_data(cls, data: object) -> ProvisionRequest:
        """The request from its JSON form (what an approval request stores as task input);
        a :class:`ValueError` if it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"not a provisioning request: {type(data).__name__}")
        try:
            return cls(index=int(data["index"]), instance_type=str(data["instance_type"]),
                       security_groups=tuple(str(g) for g in data["security_groups"]),
                       tags={str(k): str(v) for k, v in dict(data["tags"]).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a provisioning request: {exc}") from None

    def describe(self) -> str:
        """The request as the user wrote it, for the model's prompt."""
        tags = ", ".join(f"{k}={v}" for k, v in self.tags.items())
        return (f"Launch one {self.instance_type} instance in security groups "
                f"{', '.join(self.security_groups)} with tags {tags}.")

    def correct_plan(self) -> dict[str, Any]:
        """The plan a perfect model would propose."""
        return {"action": "run_instances", "instance_type": self.instance_type,
                "security_groups": list(self.security_groups), "tags": dict(self.tags),
                "count": 1}


def generate_requests(count: int, seed: int) -> list[ProvisionRequest]:
    """``count`` seeded requests; request ``i`` depends only on ``(seed, i)``.

    So the first 20 requests of a 200-request run are the 20 requests of a 20-request run.
    """
    out = []
    for index in range(count):
        rng = random.Random(f"closedloop-demo:{seed}:request:{index}")
        team = rng.choice(TEAMS)
        groups = rng.sample(SECURITY_GROUPS, rng.randint(1, 3))
        out.append(ProvisionRequest(
            index=index,
            instance_type=rng.choice(INSTANCE_TYPES),
            security_groups=tuple(sorted(groups)),
            tags={"Name": f"{team}-{index:04d}", "owner": team, "env": rng.choice(ENVIRONMENTS),
                  "cost-center": f"cc-{rng.randint(100, 999)}"},
        ))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One proposal the model emitted, and the fault it injected into it (if any).

    ``locations`` says where the fault shows: for a malformed proposal the plan field
    (``plan.tags``; ``plan`` for a syntax error), for a semantic one the instance attribute
    the outcome verifier must report (``instance.tags.owner``).
    """

    request: int
    trace_id: str
    attempt: int
    kind: FaultKind | None = None
    locations: tuple[str, ...] = ()

    @property
    def category(self) -> FaultCategory | None:
        """The fault's category, or None for a correct proposal."""
        return self.kind.category if self.kind is not None else None

    def key(self) -> tuple[int, int, str | None, tuple[str, ...]]:
        """The entry without its trace id (random per run): equal across same-seed runs."""
        return (self.request, self.attempt, self.kind.value if self.kind else None,
                self.locations)


@dataclass(slots=True)
class FaultLedger:
    """Every proposal the simulated model emitted, in order: the demo's ground truth."""

    entries: list[LedgerEntry] = field(default_factory=list)

    @property
    def faults(self) -> list[LedgerEntry]:
        """Only the proposals with an injected fault."""
        return [e for e in self.entries if e.kind is not None]

    def counts(self) -> dict[str, int]:
        """Faulty proposals per category and per kind, plus ``proposals`` and ``requests``.

        Every category and kind is present (zero when it never occurred), so the figures
        compare directly with a report's.
        """
        by_kind = Counter(e.kind for e in self.entries if e.kind is not None)
        out = {"proposals": len(self.entries),
               "requests": len({e.trace_id for e in self.entries})}
        for category in FaultCategory:
            out[category.value] = sum(n for k, n in by_kind.items() if k.category is category)
        for kind in FaultKind:
            out[kind.value] = by_kind.get(kind, 0)
        return out

    def by_trace(self) -> dict[str, list[LedgerEntry]]:
        """Entries grouped by the step (trace id) they were emitted in, attempts in order."""
        out: dict[str, list[LedgerEntry]] = {}
        for e in self.entries:
            out.setdefault(e.trace_id, []).append(e)
        return out

    def expected_outcomes(self, max_attempts: int) -> dict[str, int]:
        """How many steps must end each way (see :func:`expected_result`), zeros included."""
        out = dict.fromkeys(("succeeded", "failed_validation", "failed_verification",
                             "blocked"), 0)
        for entries in self.by_trace().values():
            result = expected_result(entries, max_attempts)
            if result is not None:
                out[result] += 1
        return out

    def expected_report(self, max_attempts: int) -> dict[str, Any]:
        """The figures ``closedloop report --json`` must show for these steps, from the ledger.

        Shaped like a report row: ``runs``; ``validation``, ``reask``, ``reask_success``,
        ``verification`` as ``{"count", "total"}``; ``outcomes`` and ``error_types`` counts.
        """
        runs = validated = reasked = reask_ok = verified = verified_ok = 0
        for entries in self.by_trace().values():
            result = expected_result(entries, max_attempts)
            if result is None:
                continue
            runs += 1
            passed = result in ("succeeded", "failed_verification")
            validated += 1
            if len(entries) > 1:
                reasked += 1
                reask_ok += passed
            if passed:
                verified += 1
                verified_ok += result == "succeeded"
        outcomes = self.expected_outcomes(max_attempts)
        return {
            "runs": runs,
            "validation": {"count": verified, "total": validated},
            "reask": {"count": reasked, "total": validated},
            "reask_success": {"count": reask_ok, "total": reasked},
            "verification": {"count": verified_ok, "total": verified},
            "outcomes": {"succeeded": outcomes["succeeded"],
                         "failed": outcomes["failed_validation"]
                         + outcomes["failed_verification"],
                         "blocked": outcomes["blocked"]},
            "error_types": {"validation": outcomes["failed_validation"],
                            "verification": outcomes["failed_verification"],
                            "blocked": outcomes["blocked"]},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultRates:
    """How often the simulated model errs (probabilities per request or per re-ask)."""

    malformed: float = 0.15
    """A request's first proposal is malformed."""
    fix_on_reask: float = 0.7
    """A re-asked model, given the validation feedback, returns a well-formed proposal."""
    semantic: float = 0.15
    """A request's well-formed proposal is semantically wrong."""
    destructive: float = 0.03
    """A request gets a destructive proposal instead of a launch."""

    def __post_init__(self) -> None:
        for name in ("malformed", "fix_on_reask", "semantic", "destructive"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultRates.{name} must be in [0, 1], got {value!r}")


@dataclass(slots=True)
class _Episode:
    """The model's state for one step: its seeded randomness and what it decided up front."""

    rng: random.Random
    semantic: FaultKind | None
    destructive: FaultKind | None
    malformed: bool


class SimulatedModel:
    """A seeded stand-in for an LLM provisioning agent: ``model(request, attempt) -> str``.

    Use it as a :class:`~closedloop.Loop` agent. It reads ``attempt.feedback`` on a re-ask,
    reports plausible token usage with ``attempt.record_usage`` (about four characters per
    token of prompt and reply), and appends every proposal to :attr:`ledger`. Its choices
    for request ``i`` depend only on ``(seed, i)`` and the feedback it gets.
    """

    def __init__(
        self,
        seed: int,
        *,
        inventory: Sequence[str] = (),
        rates: FaultRates | None = None,
        ledger: FaultLedger | None = None,
    ) -> None:
        self.seed = seed
        self.inventory = tuple(inventory)
        """Ids of the instances already running, shown to the model (and at risk from it)."""
        self.rates = rates or FaultRates()
        self.ledger = ledger if ledger is not None else FaultLedger()
        self._episodes: dict[str, _Episode] = {}

    def prompt(self, request: ProvisionRequest, feedback: str | None) -> str:
        """The prompt a real model would get for this request and attempt."""
        parts = [SYSTEM_PROMPT, "Existing instances: " + (", ".join(self.inventory) or "none"),
                 "Request: " + request.describe()]
        if feedback:
            parts.append(feedback)
        return "\n\n".join(parts)

    def __call__(self, request: ProvisionRequest, attempt: Attempt) -> str:
        episode = self._episodes.get(attempt.trace_id)
        if episode is None:
            episode = self._episodes[attempt.trace_id] = self._plan_episode(request)
        text, kind, locations = self._propose(request, attempt, episode)
        if kind is None or kind.category is not FaultCategory.MALFORMED:
            # a well-formed proposal ends the model's part of this step
            self._episodes.pop(attempt.trace_id, None)
        self.ledger.entries.append(LedgerEntry(request=request.index, trace_id=attempt.trace_id,
                                               attempt=attempt.number, kind=kind,
                                               locations=locations))
        prompt = self.prompt(request, attempt.feedback)
        attempt.record_usage(input_tokens=_tokens(prompt), output_tokens=_tokens(text))
        return text

    def _plan_episode(self, request: ProvisionRequest) -> _Episode:
        rng = random.Random(f"closedloop-demo:{self.seed}:model:{request.index}")
        rates = self.rates
        if rng.random() < rates.destructive:
            kind = rng.choice(_DESTRUCTIVE)
            if kind is FaultKind.TERMINATE_PRODUCTION and not self.inventory:
                kind = FaultKind.DELETE_SECURITY_GROUP
            return _Episode(rng=rng, semantic=None, destructive=kind, malformed=False)
        semantic = None
        if rng.random() < rates.semantic:
            semantic = rng.choice((FaultKind.WRONG_INSTANCE_TYPE, FaultKind.MISSING_SECURITY_GROUP,
                                   FaultKind.MISSING_TAG, FaultKind.WRONG_TAG))
        return _Episode(rng=rng, semantic=semantic, destructive=None,
                        malformed=rng.random() < rates.malformed)

    def _propose(
        self, request: ProvisionRequest, attempt: Attempt, episode: _Episode
    ) -> tuple[str, FaultKind | None, tuple[str, ...]]:
        rng = episode.rng
        if episode.destructive is not None:
            return self._destructive(request, episode.destructive, rng)
        if episode.malformed and attempt.feedback is not None:
            # re-asked with the validation errors: usually fixed, not always
            episode.malformed = rng.random() >= self.rates.fix_on_reask
        plan = request.correct_plan()
        if episode.malformed:
            return _malform(plan, rng)
        if episode.semantic is None:
            return json.dumps(plan), None, ()
        return _mistake(plan, request, episode.semantic, rng)

    def _destructive(
        self, request: ProvisionRequest, kind: FaultKind, rng: random.Random
    ) -> tuple[str, FaultKind, tuple[str, ...]]:
        if kind is FaultKind.TERMINATE_PRODUCTION:
            plan: dict[str, Any] = {
                "action": "terminate_instances", "instance_ids": list(self.inventory),
                "reason": f"replace the existing fleet with {request.tags['Name']}"}
        else:
            plan = {"action": "delete_security_group", "group": rng.choice(SECURITY_GROUPS),
                    "reason": "clean up unused groups before launching"}
        return json.dumps(plan), kind, ("plan.action",)


def _malform(plan: dict[str, Any], rng: random.Random) -> tuple[str, FaultKind, tuple[str, ...]]:
    kind = rng.choice(_MALFORMED)
    if kind is FaultKind.JSON_SYNTAX:
        text = json.dumps(plan)
        style = rng.randrange(4)
        if style == 0:  # trailing comma
            text = text[:-1] + ", }"
        elif style == 1:  # ran out of tokens mid-object
            text = text[: rng.randrange(len(text) // 3, len(text) - 1)]
        elif style == 2:  # a Python dict, not JSON
            text = repr(plan)
        else:  # chatty preamble around the JSON
            text = "Sure! Here is the provisioning plan:\n" + text
        return text, kind, ("plan",)
    if kind is FaultKind.MISSING_FIELD:
        name = rng.choice(("instance_type", "security_groups", "tags"))
        del plan[name]
        return json.dumps(plan), kind, (f"plan.{name}",)
    name = rng.choice(("instance_type", "security_groups", "tags", "count"))
    wrong: dict[str, Any] = {
        "instance_type": [plan["instance_type"]],
        "security_groups": ",".join(plan["security_groups"]),
        "tags": [f"{k}={v}" for k, v in plan["tags"].items()],
        "count": "one",
    }
    plan[name] = wrong[name]
    return json.dumps(plan), kind, (f"plan.{name}",)


def _mistake(
    plan: dict[str, Any], request: ProvisionRequest, kind: FaultKind, rng: random.Random
) -> tuple[str, FaultKind, tuple[str, ...]]:
    if kind is FaultKind.WRONG_INSTANCE_TYPE:
        plan["instance_type"] = rng.choice(
            [t for t in INSTANCE_TYPES if t != request.instance_type])
        return json.dumps(plan), kind, ("instance.instance_type",)
    if kind is FaultKind.MISSING_SECURITY_GROUP:
        groups: list[str] = plan["security_groups"]
        if len(groups) > 1:
            groups.remove(rng.choice(groups))
        else:  # a single group cannot go missing and stay well-formed: swap it instead
            kind = FaultKind.WRONG_SECURITY_GROUP
            groups[0] = rng.choice([g for g in SECURITY_GROUPS if g != groups[0]])
        return json.dumps(plan), kind, ("instance.security_groups",)
    key = rng.choice(REQUIRED_TAGS)
    if kind is FaultKind.MISSING_TAG:
        del plan["tags"][key]
    else:
        plan["tags"][key] = "production" if key == "env" else plan["tags"][key] + "-x"
    return json.dumps(plan), kind, (f"instance.tags.{key}",)


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def expected_result(entries: Sequence[LedgerEntry], max_attempts: int) -> str | None:
    """How one step must end, given its ledger entries, if every loop layer does its job.

    ``"blocked"`` (destructive), ``"failed_validation"`` (malformed on every allowed attempt),
    ``"failed_verification"`` (semantically wrong), ``"succeeded"``; None if unfinished.
    """
    last = entries[-1]
    if last.category is FaultCategory.DESTRUCTIVE:
        return "blocked"
    if last.category is FaultCategory.MALFORMED:
        return "failed_validation" if last.attempt >= max_attempts else None
    if last.category is FaultCategory.SEMANTIC:
        return "failed_verification"
    return "succeeded"
