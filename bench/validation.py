"""The cost of validating a typical proposal: JSON Schema + a 200-resource Terraform plan scan.

Run: ``python bench/validation.py`` (options: ``--resources``, ``--calls``, ``--rounds``).

A typical Terraform agent's proposal is a small structured answer (checked with a JSON
Schema) plus the ``terraform show -json`` plan it leads to (scanned for destructive changes
and policy: required tags, an instance-type allow-list). The plan is synthetic but shaped
exactly like the recorded Terraform 1.7.5 fixtures in ``tests/data/terraform``: 200
``aws_instance`` changes (creates and updates, a few replacements), with before/after values.

Target: ≤ 2 ms per proposal with the plan already parsed (the loop hands validators the
agent's parsed output). Also reported, in the same run, as ratios against two baselines:
``json.loads`` of the plan text (the price of merely reading it) and ``jsonschema.validate``
called the naive way (the schema re-checked and the validator rebuilt on every call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jsonschema

from closedloop.validate import (
    AllowedInstanceTypes,
    JsonSchemaValidator,
    RequiredTags,
    TerraformPlanValidator,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["summary", "instance_type", "count", "tags", "files"],
    "properties": {
        "summary": {"type": "string", "maxLength": 500},
        "instance_type": {"type": "string", "enum": ["t3.micro", "t3.small", "t3.medium"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 200},
        "tags": {"type": "object", "required": ["Owner", "Env"],
                 "additionalProperties": {"type": "string"}},
        "files": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

PROPOSAL: dict[str, Any] = {
    "summary": "Scale the web tier to 200 t3.small instances behind the existing ALB.",
    "instance_type": "t3.small",
    "count": 200,
    "tags": {"Owner": "platform", "Env": "prod", "Service": "web"},
    "files": {"main.tf": 'resource "aws_instance" "web" {\n  count = 200\n}\n'},
}


def make_plan(resources: int) -> dict[str, Any]:
    """A show-json plan with ``resources`` aws_instance changes, 1 in 50 a replacement."""
    changes = []
    for n in range(resources):
        address = f"aws_instance.web[{n}]"
        after = {"ami": "ami-0abcdef1234567890", "instance_type": "t3.small",
                 "subnet_id": "subnet-0123456789abcdef0",
                 "vpc_security_group_ids": ["sg-0123456789abcdef0"],
                 "tags": {"Owner": "platform", "Env": "prod", "Service": "web"},
                 "tags_all": {"Owner": "platform", "Env": "prod", "Service": "web"}}
        before: dict[str, Any] | None = None
        actions = ["create"]
        if n % 2:
            before = {**after, "id": f"i-{n:017x}", "instance_type": "t3.micro"}
            actions = ["update"]
        change: dict[str, Any] = {"address": address, "mode": "managed", "type": "aws_instance",
                                  "name": "web", "index": n,
                                  "provider_name": "registry.terraform.io/hashicorp/aws",
                                  "change": {"actions": actions, "before": before, "after": after,
                                             "after_unknown": {"id": True, "arn": True},
                                             "before_sensitive": {}, "after_sensitive": {}}}
        if n % 50 == 49:
            change["change"]["actions"] = ["delete", "create"]
            change["change"]["replace_paths"] = [["ami"]]
            change["action_reason"] = "replace_because_cannot_update"
        changes.append(change)
    return {"format_version": "1.2", "terraform_version": "1.7.5",
            "resource_changes": changes, "errored": False}


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    plan = make_plan(args.resources)
    plan_text = json.dumps(plan)
    schema_check = JsonSchemaValidator(SCHEMA)
    plan_check = TerraformPlanValidator([
        RequiredTags(["Owner", "Env"], resource_types=["aws_*"]),
        AllowedInstanceTypes(["t3.micro", "t3.small", "t3.medium"]),
    ])

    def typical() -> None:
        schema_check(PROPOSAL)
        plan_check(plan)

    def typical_from_text() -> None:
        schema_check(PROPOSAL)
        plan_check(plan_text)

    def read_only() -> None:
        json.loads(plan_text)

    def naive_schema() -> None:
        jsonschema.validate(PROPOSAL, SCHEMA)

    verdict = plan_check(plan)
    assert schema_check(PROPOSAL).passed
    assert sum(i.code == "tf_replace" for i in verdict.issues) == args.resources // 50
    assert not any(i.code.startswith("tf_missing") for i in verdict.issues)

    cases = {"typical": typical, "typical_from_text": typical_from_text,
             "json_loads_plan": read_only, "naive_jsonschema_validate": naive_schema,
             "schema_only": lambda: schema_check(PROPOSAL),
             "plan_scan_only": lambda: plan_check(plan)}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved rounds, so load on the machine hits all alike
        for name, fn in cases.items():
            samples[name].append(per_call(fn, args.calls))
    med = {name: statistics.median(s) * 1e3 for name, s in samples.items()}

    print(f"plan: {args.resources} resource changes, {len(plan_text) / 1024:.0f} KiB of JSON; "
          f"{args.rounds} rounds x {args.calls} calls, medians")
    for name, ms in med.items():
        print(f"  {name:<28} {ms:8.3f} ms")
    print(f"typical proposal (parsed plan): {med['typical']:.3f} ms "
          f"(target <= 2 ms: {'met' if med['typical'] <= 2.0 else 'MISSED'})")
    print(f"  = {med['typical'] / med['json_loads_plan']:.2f}x the cost of json.loads "
          "of the plan text")
    print(f"precompiled schema check vs naive jsonschema.validate: "
          f"{med['naive_jsonschema_validate'] / med['schema_only']:.1f}x faster")


if __name__ == "__main__":
    main()
