"""AWS EC2 outcome verification: does the real instance match what was asked for?"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from closedloop._checks import clip, require
from closedloop._verdict import Issue, Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceExpectation:
    """What one instance should look like; ``None`` fields are not checked.

    ``security_groups`` is compared as a set (ids or names, exactly these, no more);
    ``tags`` maps each required key to its required value, or ``None`` for any value.
    """

    instance_id: str
    instance_type: str | None = None
    security_groups: Iterable[str] | None = None
    tags: Mapping[str, str | None] | None = None
    state: str | None = "running"
    subnet_id: str | None = None
    vpc_id: str | None = None


Expect = Callable[[Any, Any], "InstanceExpectation | Iterable[InstanceExpectation]"]


def _result_is_expectation(intent: Any, result: Any) -> Any:
    return result


class Ec2InstanceVerifier:
    """Reads the instances with one ``DescribeInstances`` call and reports every mismatch.

    ``expect(intent, result)`` says what to check (by default the executor's result is the
    expectation, or a list of them). ``client`` is a boto3 EC2 client (built from
    ``client_options`` by default). If EC2 cannot be reached or read — no endpoint, no
    credentials, throttled — the verdict is *unknown*, never a pass; an instance that does
    not exist (yet) is a mismatch, which :class:`~closedloop.verify.Eventually` can wait out.
    """

    def __init__(self, expect: Expect | None = None, *, client: Any = None,
                 name: str = "ec2_instance", **client_options: Any) -> None:
        self.expect = expect or _result_is_expectation
        self._client = client
        self._client_options = client_options
        self.name = name
        if client is None:
            require("boto3")

    @property
    def client(self) -> Any:
        """The boto3 EC2 client, created on first use."""
        if self._client is None:
            import boto3

            self._client = boto3.client("ec2", **self._client_options)
        return self._client

    def __call__(self, intent: Any, result: Any) -> Verdict:
        wanted = self.expect(intent, result)
        items = [wanted] if isinstance(wanted, InstanceExpectation) else list(wanted)
        if not all(isinstance(w, InstanceExpectation) for w in items):
            # the verifier's own wiring is wrong: raise, so the loop records verifier_error
            raise TypeError("Ec2InstanceVerifier: expect(intent, result) must return an "
                            "InstanceExpectation or a list of them")
        return self.check(items)

    def check(self, expectations: Iterable[InstanceExpectation]) -> Verdict:
        """Compare each expectation with the instance's real state."""
        wanted = list(expectations)
        if not wanted:
            return Verdict.ok(check=self.name)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            found = self._describe([w.instance_id for w in wanted])
        except (BotoCoreError, ClientError) as exc:
            return Verdict.cannot_tell(f"cannot read EC2: {clip(str(exc), 200)}",
                                       check=self.name)
        issues: list[Issue] = []
        for w in wanted:
            actual = found.get(w.instance_id)
            if actual is None:
                issues.append(Issue(code="ec2_not_found", location=w.instance_id,
                                    message="instance does not exist"))
            else:
                issues.extend(_compare(w, actual))
        return Verdict(issues=tuple(issues), check=self.name)

    def _describe(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        pages = self.client.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": ids}])
        return {i["InstanceId"]: i for page in pages for r in page.get("Reservations", [])
                for i in r.get("Instances", [])}


def _mismatch(instance_id: str, field: str, want: object, have: object) -> Issue:
    return Issue(code=f"ec2_{field}", location=instance_id,
                 message=f"{field} is {have!r}, expected {want!r}")


def _compare(w: InstanceExpectation, actual: Mapping[str, Any]) -> list[Issue]:
    iid = w.instance_id
    issues = []
    state = (actual.get("State") or {}).get("Name")
    if w.state is not None and state != w.state:
        issues.append(_mismatch(iid, "state", w.state, state))
    for field, key, want in (("instance_type", "InstanceType", w.instance_type),
                             ("subnet_id", "SubnetId", w.subnet_id),
                             ("vpc_id", "VpcId", w.vpc_id)):
        if want is not None and actual.get(key) != want:
            issues.append(_mismatch(iid, field, want, actual.get(key)))
    if w.security_groups is not None:
        issues.extend(_compare_groups(iid, set(w.security_groups),
                                      actual.get("SecurityGroups") or []))
    if w.tags is not None:
        have = {t["Key"]: t.get("Value") for t in actual.get("Tags") or []}
        for key, value in w.tags.items():
            if key not in have:
                issues.append(Issue(code="ec2_tag_missing", location=iid,
                                    message=f"tag {key!r} is missing"))
            elif value is not None and have[key] != value:
                issues.append(_mismatch(iid, "tag", f"{key}={value}", f"{key}={have[key]}"))
    return issues


def _compare_groups(iid: str, wanted: set[str], groups: list[Mapping[str, Any]]) -> list[Issue]:
    names = {g.get("GroupId"): g.get("GroupName") for g in groups}
    matched = {gid for gid, gname in names.items() if gid in wanted or gname in wanted}
    missing = sorted(w for w in wanted if w not in names and w not in names.values())
    extra = sorted(str(gid) for gid in names if gid not in matched)
    if not missing and not extra:
        return []
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected {', '.join(extra)}")
    return [Issue(code="ec2_security_groups", location=iid,
                  message=f"security groups differ: {'; '.join(parts)}")]
