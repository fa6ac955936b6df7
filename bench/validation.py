"""The cost of validating a typical proposal: JSON Schema + a 200-resource Terraform plan scan;
and, with ``--largest``, the time and peak memory of ``closedloop check`` on the largest inputs.

Run: ``python bench/validation.py`` (options: ``--resources``, ``--calls``, ``--rounds``);
``python bench/validation.py --largest`` (option: ``--mb``, default 50).

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema

from closedloop.validate import (
    AllowedInstanceTypes,
    HclValidator,
    JsonSchemaValidator,
    PythonSyntax,
    RequiredTags,
    SqlSyntax,
    TerraformPlanValidator,
)

_CAPS = {"sql": SqlSyntax.DEFAULT_MAX_BYTES, "hcl": HclValidator.DEFAULT_MAX_BYTES,
         "python": PythonSyntax.DEFAULT_MAX_BYTES,
         "json-schema": JsonSchemaValidator.DEFAULT_MAX_BYTES,
         "terraform-plan": TerraformPlanValidator.DEFAULT_MAX_BYTES}

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


# --- the largest inputs: `closedloop check` as a subprocess, time and peak RSS -------------

LARGEST_TARGET_S = 10.0
LARGEST_TARGET_MB = 256.0


def _repeat(unit: str, size: int) -> str:
    return unit * (size // len(unit))


def _numbered(template: str, size: int) -> str:
    """Whole copies of ``template``, ``{n}`` filled 0, 1, 2…, up to ``size`` characters."""
    parts, total, n = [], 0, 0
    while total + len(part := template.format(n=n)) <= size:
        parts.append(part)
        total += len(part)
        n += 1
    return "".join(parts)


def realistic(kind: str, size: int) -> str:
    """An input of about ``size`` bytes, shaped like what each check is given in practice."""
    if kind == "sql":
        return _numbered("INSERT INTO orders (id, customer, total) VALUES ({n}, 'c{n}', 9.5);\n",
                         size)
    if kind == "hcl":
        return _numbered('resource "aws_instance" "web{n}" {{\n  ami = "ami-0abc"\n'
                         '  instance_type = "t3.micro"\n  tags = {{ Owner = "platform" }}\n}}\n',
                         size)
    if kind == "python":
        return _numbered("def handler_{n}(event):\n    return {{'id': {n}, 'ok': True}}\n", size)
    if kind == "json-schema":
        return "[" + _repeat('{"name": "web", "cpus": 2, "tags": ["a", "b"]}, ', size)[:-2] + "]"
    resources = max(1, size // 740)
    while len(text := json.dumps(make_plan(resources))) > size and resources > 1:
        resources = int(resources * 0.98)
    return text


def worst(kind: str, size: int) -> str:
    """An input of ``size`` bytes shaped to cost its parser the most we know of."""
    if kind == "sql":
        return "SELECT " + _repeat("1+", size - 8) + "1"  # sqlglot: deepest expression tree
    if kind == "hcl":
        return "locals {\n  x = [" + _repeat('"abc", ', size - 20) + '"z"]\n}\n'
    if kind == "python":
        return _repeat("def f(x):\n    return x + 1\n", size)  # CPython: superlinear
    if kind == "json-schema":
        return "[" + _repeat("[],", size - 4) + "[]]"  # ~20x growth once parsed
    return json.dumps({"format_version": "1.2", "planned_values": {},
                       "resource_changes": [{}] * ((size - 80) // 4)})


def _args(kind: str, path: str, workdir: Path) -> list[str]:
    if kind == "json-schema":
        schema = workdir / "schema.json"
        schema.write_text('{"type": "array", "items": {"type": ["object", "array"]}}')
        return ["json-schema", "--schema", str(schema), path]
    return [kind, path]


_LAUNCHER = """
import os, subprocess, sys, threading, time
stdin_path, argv = sys.argv[1], sys.argv[2:]
def feed(stream, path):
    try:
        with open(path, "rb") as source:
            while chunk := source.read(1 << 16):
                stream.write(chunk)
        stream.close()
    except BrokenPipeError:  # the check stopped reading at its cap, as it should
        pass
start = time.perf_counter()
proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_path else None,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if stdin_path:
    threading.Thread(target=feed, args=(proc.stdin, stdin_path), daemon=True).start()
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss)
"""


def run_check(args: list[str], stdin: Path | None = None) -> tuple[int, float, float]:
    """Run ``closedloop check ARGS`` in a fresh process: exit code, seconds, peak RSS in MB.

    A small launcher process starts it: a child forked from this (large) process would report
    this process's memory as its own peak. ``stdin`` is fed through a real pipe.
    """
    argv = [sys.executable, "-c", "from closedloop.cli import main; main()", "check", *args]
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(stdin or ""), *argv],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), int(out[2]) / 1024


def largest_cases(mb: int, workdir: Path) -> Iterator[tuple[str, str, list[str], Path | None]]:
    """(check, case, args, stdin) for every measured case, its input written to ``workdir``."""
    for kind, cap in _CAPS.items():
        big = workdir / f"big-{kind}"
        big.write_text(realistic(kind, mb * 1_000_000))
        size = f"{big.stat().st_size / 1e6:.0f} MB"
        yield kind, f"{size} file", _args(kind, str(big), workdir), None
        yield kind, f"{size} on a pipe", _args(kind, "-", workdir), big
        for shape, text in (("realistic", realistic(kind, cap)), ("worst", worst(kind, cap))):
            path = workdir / f"cap-{shape}-{kind}"
            path.write_text(text[:cap])
            yield (kind, f"{shape} at the cap ({path.stat().st_size // 1024} KiB)",
                   _args(kind, str(path), workdir), None)


def largest(mb: int) -> None:
    """Time and peak RSS of each check on an ``mb`` MB input and on the largest it accepts."""
    print(f"closedloop check: targets <= {LARGEST_TARGET_S:g} s and <= {LARGEST_TARGET_MB:g} MB "
          "per run (fresh process each; peak RSS from wait4)")
    print(f"{'check':<15} {'input':<34} {'exit':>4} {'seconds':>8} {'peak MB':>8}  target")
    worst_s = worst_mb = 0.0
    with tempfile.TemporaryDirectory(prefix="closedloop-bench-") as tmp:
        for kind, case, args, stdin in largest_cases(mb, Path(tmp)):
            code, seconds, peak = run_check(args, stdin)
            worst_s, worst_mb = max(worst_s, seconds), max(worst_mb, peak)
            met = seconds <= LARGEST_TARGET_S and peak <= LARGEST_TARGET_MB
            print(f"{kind:<15} {case:<34} {code:>4} {seconds:8.2f} {peak:8.0f}  "
                  f"{'met' if met else 'MISSED'}", flush=True)
    within = worst_s <= LARGEST_TARGET_S and worst_mb <= LARGEST_TARGET_MB
    print(f"largest: {worst_s:.2f} s, {worst_mb:.0f} MB "
          f"({'within' if within else 'OVER'} the targets)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--largest", action="store_true",
                        help="Measure `closedloop check` on the largest inputs instead.")
    parser.add_argument("--mb", type=int, default=50, help="Size of the large input (--largest).")
    args = parser.parse_args()
    if args.largest:
        largest(args.mb)
        return

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
