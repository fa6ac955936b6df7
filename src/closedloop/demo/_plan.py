"""The provisioning plan's schema (pydantic) and the demo's two immediate validators.

:func:`plan_schema` catches malformed proposals: bad JSON, missing or ill-typed fields, each
reported as an ``ERROR`` issue the model gets back on re-ask. :func:`no_destructive_actions`
flags a plan that would terminate or delete existing resources as ``CRITICAL``: the loop
blocks it at once, without asking the model to try again.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from closedloop._approvals import Risk
from closedloop._verdict import Issue, Severity, Verdict
from closedloop.demo._model import REQUIRED_TAGS


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    reason: str | None = None


class RunInstances(_Plan):
    """Launch ``count`` instances of a type, in security groups (by name), with tags."""

    action: Literal["run_instances"]
    instance_type: Annotated[str, Field(min_length=1)]
    security_groups: Annotated[list[str], Field(min_length=1)]
    tags: dict[str, str]
    count: Annotated[int, Field(ge=1, le=10)] = 1


class TerminateInstances(_Plan):
    """Terminate existing instances (destructive)."""

    action: Literal["terminate_instances"]
    instance_ids: Annotated[list[str], Field(min_length=1)]


class DeleteSecurityGroup(_Plan):
    """Delete a security group by name (destructive)."""

    action: Literal["delete_security_group"]
    group: str


Plan = Annotated[RunInstances | TerminateInstances | DeleteSecurityGroup,
                 Field(discriminator="action")]
PLAN: TypeAdapter[RunInstances | TerminateInstances | DeleteSecurityGroup] = TypeAdapter(Plan)
DESTRUCTIVE_ACTIONS = frozenset({"terminate_instances", "delete_security_group"})
PLAN_ACTIONS = frozenset({"run_instances", *DESTRUCTIVE_ACTIONS})


def parse_plan(text: str) -> RunInstances | TerminateInstances | DeleteSecurityGroup:
    """Parse and validate a proposal's JSON text; raises pydantic's ``ValidationError``."""
    return PLAN.validate_json(text)


def _data(proposal: str | dict[str, Any]) -> Any:
    """The plan as data, from its JSON text or as given; None when the text is not JSON."""
    if not isinstance(proposal, str):
        return proposal
    try:
        return json.loads(proposal)
    except ValueError:
        return None


def plan_schema(proposal: str | dict[str, Any]) -> Verdict:
    """Immediate validation: the proposal is a JSON plan with every field present and typed.

    Each problem is one issue, located at the plan field (``plan.tags``; ``plan`` for JSON
    syntax), so the model can fix them all in one re-ask. The plan may also be given as data
    (``closedloop replay`` hands back recorded JSON as data).
    """
    try:  # data is checked as the JSON it came from, so both give the very same issues
        text = proposal if isinstance(proposal, str) else json.dumps(proposal)
    except (TypeError, ValueError) as exc:
        return Verdict(issues=(Issue(message=f"not a JSON plan: {exc}", code="json_invalid",
                                     location="plan"),))
    try:
        parse_plan(text)
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False):
            loc = [str(p) for p in err["loc"]]
            if loc and loc[0] in PLAN_ACTIONS:
                loc = loc[1:]  # drop the discriminator's tag pydantic puts first
            issues.append(Issue(message=err["msg"], code=err["type"],
                                location=".".join(["plan", *loc])))
        return Verdict(issues=tuple(issues))
    return Verdict()


def no_destructive_actions(proposal: str | dict[str, Any]) -> Verdict:
    """Immediate validation: a provisioning agent may create, never terminate or delete.

    Reads the ``action`` even from a plan that fails the schema, so a destructive intent is
    blocked whatever else is wrong with it.
    """
    data = _data(proposal)  # None for a syntax error, which plan_schema reports
    action = data.get("action") if isinstance(data, dict) else None
    if action not in DESTRUCTIVE_ACTIONS:
        return Verdict()
    if action == "terminate_instances":
        targets = data.get("instance_ids")
        what = f"terminate instances {targets}"
    else:
        what = f"delete security group {data.get('group')!r}"
    return Verdict(issues=(Issue(
        message=f"destructive operation: the plan would {what}; this agent may only launch",
        code="destructive", location="plan.action", severity=Severity.CRITICAL),))


def required_tags(proposal: str | dict[str, Any]) -> Verdict:
    """A validator the demo's loop does not run: every launch carries the required tags.

    It sees only the plan, not the request, so it cannot tell a wrong tag value; it can tell
    a missing one. Try it on what the demo recorded, before putting it in the loop::

        closedloop replay --task-type ec2.provision --validator closedloop.demo:required_tags
    """
    data = _data(proposal)
    if not isinstance(data, dict) or data.get("action") != "run_instances":
        return Verdict()  # not a launch: plan_schema and no_destructive_actions judge it
    tags = data.get("tags")
    present = tags if isinstance(tags, dict) else {}
    return Verdict(issues=tuple(
        Issue(message=f"tag {key!r} is required", code="missing_tag", location=f"plan.tags.{key}")
        for key in REQUIRED_TAGS if not present.get(key)))


def destructive_plan(proposal: str | dict[str, Any]) -> Risk | None:
    """The demo's risk rule: a plan that terminates instances or deletes a security group is
    high-stakes, so it waits for a person at every autonomy level (``--autonomy approve``
    runs it instead of :func:`no_destructive_actions`, so such plans queue, marked
    destructive, rather than being blocked)."""
    data = _data(proposal)
    action = data.get("action") if isinstance(data, dict) else None
    if action == "terminate_instances":
        targets = data.get("instance_ids")
        items = tuple({"action": "terminate", "instance": str(t)}
                      for t in (targets if isinstance(targets, list) else [targets]))
        return Risk(summary=f"terminates {len(items)} instance(s)", items=items,
                    rule="destructive_plan")
    if action == "delete_security_group":
        group = str(data.get("group"))
        return Risk(summary=f"deletes security group {group!r}",
                    items=({"action": "delete", "security_group": group},),
                    rule="destructive_plan")
    return None
