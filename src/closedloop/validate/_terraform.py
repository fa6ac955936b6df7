"""Terraform: HCL parsing with policy rules, plan scanning for destructive changes, and the
``terraform``/``tofu`` binary's own ``validate``/``plan`` in a fresh directory per run.

Plans come in two formats and both are scanned:

- ``terraform show -json PLANFILE``: one document whose ``resource_changes[].change.actions``
  say ``["delete"]``, ``["delete", "create"]`` / ``["create", "delete"]`` (replace) or
  ``["forget"]``, with an ``action_reason``; its ``resource_drift`` is drift, not a change.
- ``terraform plan -json``: a stream of UI messages, one a line; ``planned_change`` messages
  carry ``action`` ``delete``/``replace``/``remove``, while ``resource_drift`` messages report
  changes made outside Terraform and are reported as drift — never mistaken for the plan.

Resource values are never quoted in messages: a plan carries secrets (``before``/``after``
values, sensitive or not), and messages go to the model and into traces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from closedloop._checks import (
    KiB,
    MiB,
    check_limit,
    clip,
    not_text,
    require,
    short,
    text_input,
    text_size,
    too_large,
)
from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Severity, Verdict
from closedloop.validate._proc import check_policy, find_binary, missing, run_tool
from closedloop.validate._structured import MAX_INT_DIGITS, MAX_ISSUES, load_json, parse_json


class TerraformResource(NamedTuple):
    """One managed resource as policy rules see it, from HCL or from a plan's planned values.

    ``values`` holds the attributes known before apply; an attribute whose value is only known
    after apply (or is an HCL expression such as ``var.tags``) is listed in ``unknown`` instead.
    """

    address: str
    type: str
    values: Mapping[str, Any]
    unknown: frozenset[str] = frozenset()


Rule = Callable[[TerraformResource], Iterable[Issue]]
"""A policy rule: ``rule(resource) -> issues``; plain functions are rules too."""


@functools.lru_cache(maxsize=4096)
def _matches(resource_type: str, patterns: tuple[str, ...]) -> bool:
    # cached: a plan repeats a handful of types over hundreds of resources
    return any(fnmatch.fnmatchcase(resource_type, p) for p in patterns)


class RequiredTags:
    """Every matching resource carries these tags (and, where given, these values).

    ``tags`` is a list of keys, or a mapping of key → required value (``None``: any value).
    ``resource_types`` are glob patterns (default every resource: narrow it to taggable types).
    In plans, ``tags_all`` (tags merged with the provider's ``default_tags``) counts.
    """

    def __init__(self, tags: Mapping[str, str | None] | Iterable[str], *,
                 resource_types: Sequence[str] = ("*",),
                 severity: Severity = Severity.ERROR) -> None:
        self.tags: dict[str, str | None] = (
            dict(tags) if isinstance(tags, Mapping) else dict.fromkeys(tags)
        )
        if not self.tags:
            raise ConfigError("RequiredTags needs at least one tag key")
        self.resource_types = tuple(resource_types)
        self.severity = severity

    def __call__(self, resource: TerraformResource) -> Iterable[Issue]:
        if not _matches(resource.type, self.resource_types):
            return []
        field = "tags_all" if "tags_all" in resource.values else "tags"
        if field in resource.unknown:
            return []
        tags = resource.values.get(field) or {}
        if not isinstance(tags, Mapping):
            return []  # an expression (var.tags): cannot tell before apply
        issues = []
        for key, want in self.tags.items():
            have = tags.get(key)
            if have is None:
                issues.append(Issue(code="tf_missing_tag", location=resource.address,
                                    severity=self.severity,
                                    message=f"add the required tag {key!r}"
                                    + (f" = {want!r}" if want is not None else "")))
            elif want is not None and have != want:
                issues.append(Issue(code="tf_tag_value", location=resource.address,
                                    severity=self.severity,
                                    message=f"tag {key!r} must be {want!r}"))
        return issues


class ForbiddenResourceTypes:
    """Resource types (glob patterns) the agent may not create or change."""

    def __init__(self, types: Iterable[str], *, reason: str = "",
                 severity: Severity = Severity.ERROR) -> None:
        self.types = tuple(types)
        self.reason = reason
        self.severity = severity

    def __call__(self, resource: TerraformResource) -> Iterable[Issue]:
        if not _matches(resource.type, self.types):
            return []
        why = f" ({self.reason})" if self.reason else ""
        return [Issue(code="tf_forbidden_type", location=resource.address,
                      severity=self.severity,
                      message=f"resource type {resource.type} is not allowed{why}; remove it")]


class AllowedInstanceTypes:
    """Instance sizes must come from an allow-list (``aws_instance.instance_type`` and kin)."""

    def __init__(self, allowed: Iterable[str], *,
                 resource_types: Sequence[str] = ("aws_instance", "aws_launch_template",
                                                  "aws_spot_instance_request"),
                 attribute: str = "instance_type",
                 severity: Severity = Severity.ERROR) -> None:
        self.allowed = frozenset(allowed)
        if not self.allowed:
            raise ConfigError("AllowedInstanceTypes needs at least one allowed type")
        self.resource_types = tuple(resource_types)
        self.attribute = attribute
        self.severity = severity

    def __call__(self, resource: TerraformResource) -> Iterable[Issue]:
        if not _matches(resource.type, self.resource_types) or self.attribute in resource.unknown:
            return []
        value = resource.values.get(self.attribute)
        if value is None or (isinstance(value, str) and value in self.allowed):
            return []
        choices = ", ".join(sorted(self.allowed))
        return [Issue(code="tf_instance_type", location=resource.address, severity=self.severity,
                      message=f"{self.attribute} {short(value, 40)!r} is not allowed; "
                              f"use one of: {choices}")]


def apply_rules(rules: Sequence[Rule], resources: Iterable[TerraformResource]) -> list[Issue]:
    """Every rule over every resource, in resource order."""
    return [issue for r in resources for rule in rules for issue in rule(r)]


# --- HCL ----------------------------------------------------------------------------------


def _hcl_options() -> Any:
    from hcl2.utils import SerializationOptions

    return SerializationOptions(strip_string_quotes=True, with_comments=False,
                                explicit_blocks=False)


def _is_expression(value: object) -> bool:
    return isinstance(value, str) and "${" in value


def hcl_resources(config: Mapping[str, Any]) -> list[TerraformResource]:
    """The managed resources of a parsed configuration: python-hcl2's dict form (a list of
    ``resource`` blocks) or Terraform's JSON syntax (``*.tf.json``: one ``resource`` object)."""
    out = []
    blocks = config.get("resource") or []
    for block in [blocks] if isinstance(blocks, Mapping) else blocks:
        if not isinstance(block, Mapping):
            continue
        for rtype, named in block.items():
            if not isinstance(named, Mapping):
                continue
            for rname, raw in named.items():
                # JSON syntax also allows a one-element list around the body
                body = raw[0] if isinstance(raw, list) and len(raw) == 1 else raw
                values = body if isinstance(body, Mapping) else {}
                unknown = frozenset(k for k, v in values.items() if _is_expression(v))
                out.append(TerraformResource(f"{rtype}.{rname}", str(rtype), values, unknown))
    return out


def _as_files(proposal: object, filename: str, what: str,
              max_bytes: int | None) -> dict[str, str] | Issue:
    """The proposal as file name → text, or the issue that stops it (see ``text_input``);
    ``max_bytes`` caps the files' total size."""
    raw = proposal if isinstance(proposal, Mapping) else {filename: proposal}
    total = 0
    for name, content in raw.items():
        if not isinstance(name, str) or not isinstance(content, str | bytes | bytearray):
            return not_text(proposal, what)
        total += text_size(content)
    if max_bytes is not None and total > max_bytes:
        return too_large(total, max_bytes)
    files = {}
    for name, content in raw.items():
        text = text_input(content, what, None)
        if isinstance(text, Issue):
            where = f"{name}:{text.location}" if text.location else name
            return dataclasses.replace(text, location=where)
        files[name] = text
    return files


class HclValidator:
    """Parses Terraform HCL (python-hcl2): located syntax errors, then the policy ``rules``.

    The proposal is the text of one file, or a mapping of file name → text for a module.
    A module over ``max_bytes`` (all files, UTF-8) is an issue before python-hcl2, a
    pure-Python parser (lark), sees it.
    """

    DEFAULT_MAX_BYTES = 128 * KiB
    """Default ``max_bytes``: python-hcl2 needs ~25 µs and ~1 KB a byte (see BENCHMARKS.md,
    "Largest inputs"); pass a larger one for larger modules."""

    def __init__(self, rules: Sequence[Rule] = (), *, filename: str = "main.tf",
                 max_bytes: int | None = DEFAULT_MAX_BYTES, name: str = "terraform_hcl") -> None:
        require("hcl2")
        self.rules = tuple(rules)
        self.filename = filename
        self.max_bytes = check_limit(max_bytes)
        self.name = name

    def parse(self, files: Mapping[str, str]) -> tuple[list[TerraformResource], list[Issue]]:
        """Parse each file: its resources, and an issue per file that does not parse."""
        import hcl2

        options = _hcl_options()
        resources: list[TerraformResource] = []
        issues: list[Issue] = []
        for fname, text in files.items():
            if fname.endswith(".json"):
                config, problem = parse_json(text)
                if problem is not None or not isinstance(config, Mapping):
                    issues.append(Issue(code="hcl_syntax",
                                        location=f"{fname}:{problem.location}" if problem
                                        and problem.location else fname,
                                        message=problem.message if problem else
                                        "a .tf.json file must hold one JSON object"))
                    continue
            else:
                try:
                    config = hcl2.loads(text, serialization_options=options)
                except Exception as exc:  # noqa: BLE001 - lark raises many types for bad input
                    issues.append(_hcl_issue(fname, exc))
                    continue
            resources.extend(hcl_resources(config))
        return resources, issues

    def __call__(self, proposal: object) -> Verdict:
        files = _as_files(proposal, self.filename, "Terraform HCL", self.max_bytes)
        if isinstance(files, Issue):
            return Verdict.fail(files, check=self.name)
        resources, issues = self.parse(files)
        if not issues:
            issues = apply_rules(self.rules, resources)
        return Verdict(issues=tuple(issues[:MAX_ISSUES]), check=self.name)


def _hcl_issue(filename: str, exc: BaseException) -> Issue:
    line = getattr(exc, "line", None)
    column = getattr(exc, "column", None)
    where = filename + (f":line {line}, column {column}" if isinstance(line, int)
                        and line > 0 else "")
    token = getattr(exc, "token", None)
    if token is not None and str(token):
        what = f"unexpected {clip(str(token), 40)!r}"
    elif getattr(exc, "char", None):
        what = f"unexpected character {exc.char!r}"  # type: ignore[attr-defined]
    elif isinstance(exc, RecursionError):
        what = "nested too deeply"
    else:
        what = clip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 120)
    return Issue(code="hcl_syntax", location=where, message=f"invalid HCL: {what}")


# --- plans --------------------------------------------------------------------------------


class PlanFormatError(ValueError):
    """The input is neither a ``terraform show -json`` plan nor a ``plan -json`` stream."""


_STREAM_TYPES = frozenset({"version", "planned_change", "resource_drift", "change_summary",
                           "diagnostic", "outputs", "refresh_start", "refresh_complete"})
"""Message types of a ``terraform plan -json`` stream; a stream must hold at least one."""


def _is_show_plan(doc: Mapping[str, Any]) -> bool:
    # `terraform show -json PLANFILE` always writes format_version and planned_values; a bare
    # resource_changes list (hand-made or trimmed plans) is accepted too
    return isinstance(doc.get("resource_changes"), list) or (
        "format_version" in doc and "planned_values" in doc)


_NOT_A_PLAN = ("not a Terraform plan: neither a `terraform show -json` plan (resource_changes, "
               "planned_values) nor a `terraform plan -json` stream (messages with a type)")


def _message(message: object, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise PlanFormatError(f"{where} is not a JSON object")
    if not isinstance(message.get("type"), str):
        raise PlanFormatError(f"{where} is not a Terraform UI message: it has no \"type\"")
    return dict(message)


def _stream(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not any(m["type"] in _STREAM_TYPES for m in messages):
        raise PlanFormatError(_NOT_A_PLAN)
    return messages


def _document(doc: Mapping[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    # one JSON object: a show-json plan, or a one-message stream
    if _is_show_plan(doc):
        return dict(doc)
    if not isinstance(doc.get("type"), str):
        raise PlanFormatError(_NOT_A_PLAN)
    return _stream([dict(doc)])


def _json(text: str, where: str) -> Any:
    """Parse plan JSON; ``JSONDecodeError`` is left to the caller (a whole document that does
    not parse may still be a stream), every other failure is a :class:`PlanFormatError`."""
    try:
        return load_json(text)
    except json.JSONDecodeError:
        raise
    except RecursionError as exc:
        raise PlanFormatError(f"{where} is nested too deeply") from exc
    except ValueError as exc:  # an integer over MAX_INT_DIGITS
        raise PlanFormatError(f"{where} holds a number longer than {MAX_INT_DIGITS} "
                              "digits") from exc


def load_plan(data: object) -> dict[str, Any] | list[dict[str, Any]]:
    """Normalise a plan: a show-json document (dict) or a list of streamed UI messages.

    Accepts the parsed forms or their text (``str``/``bytes``); raises :class:`PlanFormatError`
    for anything else — naming the first bad line of a stream — including valid JSON that is
    not a Terraform plan, text that is not UTF-8, and JSON nested too deeply or holding a
    number over :data:`~closedloop.validate._structured.MAX_INT_DIGITS` digits.
    """
    if isinstance(data, Mapping):
        return _document(data)
    if isinstance(data, list):
        return _stream([_message(m, f"message {n}") for n, m in enumerate(data, 1)])
    text = text_input(data, "plan JSON", None)
    if isinstance(text, Issue):
        raise PlanFormatError(text.message + (f" ({text.location})" if text.location else ""))
    try:
        doc = _json(text, "plan JSON")
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        return _document(doc)
    if isinstance(doc, list):  # a JSON array of messages, as accepted parsed
        return load_plan(doc)
    messages = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            message = _json(line, f"line {number}")
        except json.JSONDecodeError as exc:
            raise PlanFormatError(f"line {number} is not JSON: neither a `terraform show -json` "
                                  "plan nor a `terraform plan -json` stream") from exc
        messages.append(_message(message, f"line {number}"))
    if not messages:
        raise PlanFormatError("the plan is empty")
    return _stream(messages)


_REPLACE = (["delete", "create"], ["create", "delete"])


def _replace_detail(change: Mapping[str, Any], reason: object) -> str:
    paths = change.get("replace_paths") or []
    names = []
    for path in paths[:5] if isinstance(paths, list) else []:
        if isinstance(path, list) and path:
            names.append(short(".".join(short(p, 60) for p in path
                                        if isinstance(p, str | int)), 60))
    parts = []
    if reason:
        parts.append(short(reason, 60))
    if names:
        parts.append("forced by " + ", ".join(names))
    return f" ({'; '.join(parts)})" if parts else ""


class TerraformPlanValidator:
    """Scans a Terraform plan, in either format, for destructive changes, drift and errors.

    Deletions, replacements and removals from state are ``severity`` (``CRITICAL`` by default:
    the loop stops without re-ask, since deleting infrastructure needs a human). Addresses
    matching ``allow_destroy`` glob patterns are reported as warnings instead. Drift is a
    warning. Policy ``rules`` run over the planned values of created/updated resources
    (show-json plans only: the stream carries no values). Plan text over ``max_bytes`` is an
    issue before it is parsed.
    """

    DEFAULT_MAX_BYTES = 8 * MiB
    """Default ``max_bytes``: ~9,000 resource changes; parsed and scanned in ~1 s and under
    256 MB, even for the densest JSON (see BENCHMARKS.md, "Largest inputs")."""

    def __init__(self, rules: Sequence[Rule] = (), *, allow_destroy: Sequence[str] = (),
                 severity: Severity = Severity.CRITICAL,
                 max_bytes: int | None = DEFAULT_MAX_BYTES,
                 name: str = "terraform_plan") -> None:
        self.rules = tuple(rules)
        self.allow_destroy = tuple(allow_destroy)
        self.severity = severity
        self.max_bytes = check_limit(max_bytes)
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        if self.max_bytes is not None and isinstance(proposal, str | bytes | bytearray):
            size = text_size(proposal)
            if size > self.max_bytes:
                return Verdict.fail(too_large(size, self.max_bytes), check=self.name)
        try:
            plan = load_plan(proposal)
        except PlanFormatError as exc:
            return Verdict.fail(Issue(code="plan_format", message=str(exc)), check=self.name)
        return self.scan(plan)

    def scan(self, plan: dict[str, Any] | list[dict[str, Any]]) -> Verdict:
        """Scan an already-loaded plan (see :func:`load_plan`)."""
        issues = self._stream(plan) if isinstance(plan, list) else self._show(plan)
        return Verdict(issues=tuple(issues), check=self.name)

    def _destroy(self, address: str, verb: str, detail: str) -> Issue:
        allowed = any(fnmatch.fnmatchcase(address, p) for p in self.allow_destroy)
        advice = ("allowed by allow_destroy" if allowed else
                  "destructive changes need human approval; keep the resource or change it "
                  "in place")
        return Issue(code=f"tf_{verb}", location=address,
                     severity=Severity.WARNING if allowed else self.severity,
                     message=f"plan will {verb} {address}{detail}: {advice}")

    @staticmethod
    def _drift(address: str, action: object) -> Issue:
        return Issue(code="tf_drift", location=address, severity=Severity.WARNING,
                     message=f"{address} changed outside Terraform (drift: {short(action, 20)}); "
                             "the plan reconciles it")

    def _show(self, plan: Mapping[str, Any]) -> list[Issue]:
        if "resource_changes" not in plan and "format_version" not in plan:
            return [Issue(code="plan_format",
                          message="not a `terraform show -json` plan: no resource_changes")]
        issues: list[Issue] = []
        if plan.get("errored"):
            issues.append(Issue(code="tf_plan_errored",
                                message="terraform reported errors while planning; the plan "
                                        "is incomplete"))
        resources: list[TerraformResource] = []
        for rc in _dicts(plan.get("resource_changes")):
            address = short(rc.get("address", "?"), 500)
            change = _mapping(rc.get("change"))
            actions = change.get("actions")
            if not isinstance(actions, list):
                continue
            reason = rc.get("action_reason")
            deposed = f" (deposed object {short(rc['deposed'], 16)})" if rc.get("deposed") else ""
            if actions in _REPLACE:
                issues.append(self._destroy(address, "replace", _replace_detail(change, reason)))
            elif actions == ["delete"]:
                detail = deposed or (f" ({short(reason, 60)})" if reason else "")
                issues.append(self._destroy(address, "delete", detail))
            elif actions == ["forget"]:
                issues.append(self._destroy(address, "remove", " from state (forget)"))
            if self.rules and rc.get("mode", "managed") == "managed" and (
                    "create" in actions or "update" in actions):
                after = change.get("after")
                if type(after) is dict or isinstance(after, Mapping):
                    unknown = _mapping(change.get("after_unknown"))
                    keys = frozenset(k for k, v in unknown.items() if v)
                    resources.append(TerraformResource(address, short(rc.get("type", ""), 200),
                                                       after, keys))
        for rd in _dicts(plan.get("resource_drift")):
            actions = _mapping(rd.get("change")).get("actions")
            issues.append(self._drift(short(rd.get("address", "?"), 500), "+".join(
                short(a, 20) for a in (actions if isinstance(actions, list) else []))))
        issues.extend(apply_rules(self.rules, resources))
        return issues

    def _stream(self, messages: Sequence[Mapping[str, Any]]) -> list[Issue]:
        issues: list[Issue] = []
        for m in messages:
            kind = m.get("type")
            if kind == "diagnostic":
                issues.extend(diagnostic_issues([m.get("diagnostic")]))
                continue
            if kind not in ("planned_change", "resource_drift"):
                continue
            change = _mapping(m.get("change"))
            address = short(_mapping(change.get("resource")).get("addr", "?"), 500)
            action = change.get("action")
            if kind == "resource_drift":
                issues.append(self._drift(address, action))
                continue
            reason = change.get("reason")
            detail = f" ({short(reason, 60)})" if reason else ""
            if action == "replace":
                issues.append(self._destroy(address, "replace", detail))
            elif action == "delete":
                issues.append(self._destroy(address, "delete", detail))
            elif action == "remove":
                issues.append(self._destroy(address, "remove", " from state (forget)"))
        return issues


def _mapping(value: object) -> Mapping[str, Any]:
    # `type(...) is dict` first: the ABC check is slow, and parsed JSON is always a dict
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def _dicts(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [v for v in value if type(v) is dict or isinstance(v, Mapping)]


def diagnostic_issues(diagnostics: Iterable[object]) -> list[Issue]:
    """Terraform diagnostics (``validate -json``, ``plan -json``) as issues.

    Only the summary, detail and location are used: ``snippet.values`` can hold variable
    values, secrets included, and is never quoted.
    """
    issues = []
    for d in diagnostics:
        if not isinstance(d, Mapping):
            continue
        severity = Severity.WARNING if d.get("severity") == "warning" else Severity.ERROR
        where = None
        rng = d.get("range")
        if isinstance(rng, Mapping) and isinstance(rng.get("start"), Mapping):
            start = rng["start"]
            where = f"{short(rng.get('filename', '?'), 200)}:line " \
                    f"{short(start.get('line'), 12)}, column {short(start.get('column'), 12)}"
        summary = short(d.get("summary") or "terraform error", 1000)
        detail = short(d.get("detail") or "", 1000)
        message = clip(f"{summary}: {detail}" if detail else summary)
        issues.append(Issue(code="tf_diagnostic", location=where, severity=severity,
                            message=message))
    return issues


# --- the terraform / tofu binary ----------------------------------------------------------

_ENV = {"TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}


class TerraformCli:
    """Runs ``terraform`` (or ``tofu``) on the proposed configuration: ``init``, then
    ``validate -json``, and with ``plan=True`` also ``plan -json``, scanned by
    ``plan_validator`` for destructive changes and policy. The plan is saved and read back with
    ``show -json`` so that policy rules see the planned values; if that fails, the streamed
    messages are scanned instead.

    Each run gets its own fresh temporary directory, removed afterwards, so concurrent agents
    never share files. ``state`` (a ``terraform.tfstate`` to plan against) is copied in.
    ``timeout`` bounds the whole run (the process is killed and
    :class:`~closedloop.validate.CheckTimeout` raised); ``max_output`` bounds what is read.
    ``init`` failing (no network for providers, bad credentials) is *unknown*, not the agent's
    fault; with no binary on ``PATH`` the check is skipped with a recorded warning
    (``if_missing="unknown"`` makes that block instead). Providers are downloaded by each
    run's ``init``; set ``TF_PLUGIN_CACHE_DIR`` (in ``env`` or the environment) to share them.
    """

    DEFAULT_MAX_BYTES = 8 * MiB
    """Default ``max_bytes`` of the module's files (terraform itself parses them)."""

    def __init__(
        self,
        *,
        plan: bool = False,
        plan_validator: TerraformPlanValidator | None = None,
        state: str | Path | None = None,
        binary: str | None = None,
        timeout: float = 300.0,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_output: int = 5_000_000,
        env: Mapping[str, str] | None = None,
        if_missing: str = "skip",
        filename: str = "main.tf",
        name: str = "terraform",
    ) -> None:
        self.plan = plan
        self.plan_validator = plan_validator or TerraformPlanValidator()
        self.state = Path(state) if state is not None else None
        self.binary = binary
        self.timeout = timeout
        self.max_bytes = check_limit(max_bytes)
        self.max_output = max_output
        self.env = {**_ENV, **(env or {})}
        self.if_missing = check_policy(if_missing)
        self.filename = filename
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        files = _as_files(proposal, self.filename, "Terraform configuration", self.max_bytes)
        if isinstance(files, Issue):
            return Verdict.fail(files, check=self.name)
        for fname in files:
            if Path(fname).name != fname or not fname.endswith((".tf", ".tf.json", ".tfvars")):
                return Verdict.fail(Issue(code="tf_file_name", location=fname,
                                          message="file names must be plain *.tf, *.tf.json "
                                                  "or *.tfvars names"), check=self.name)
        binary = self.binary or find_binary(["terraform", "tofu"])
        if binary is None:
            return missing("terraform (or tofu)", self.if_missing, self.name)
        deadline = time.monotonic() + self.timeout
        with tempfile.TemporaryDirectory(prefix="closedloop-tf-") as workdir:
            for fname, text in files.items():
                Path(workdir, fname).write_text(text, encoding="utf-8")
            if self.state is not None:
                shutil.copyfile(self.state, Path(workdir, "terraform.tfstate"))
            return self._run(binary, workdir, deadline)

    def _tool(self, binary: str, workdir: str, deadline: float, *args: str) -> Any:
        remaining = max(deadline - time.monotonic(), 0.001)
        return run_tool([binary, *args], cwd=workdir, env=self.env, timeout=remaining,
                        max_output=self.max_output)

    def _run(self, binary: str, workdir: str, deadline: float) -> Verdict:
        init = ["init", "-input=false", "-no-color"] + ([] if self.plan else ["-backend=false"])
        out = self._tool(binary, workdir, deadline, *init)
        if out.returncode != 0:
            return self._failed(f"terraform init failed: {_last_error(out.stderr)}")
        out = self._tool(binary, workdir, deadline, "validate", "-json", "-no-color")
        if out.truncated:
            return self._failed("terraform validate output exceeded the limit")
        try:
            report = json.loads(out.stdout)
        except json.JSONDecodeError:
            return self._failed(f"terraform validate failed: {_last_error(out.stderr)}")
        issues = diagnostic_issues(report.get("diagnostics") or [])
        if not self.plan or any(i.severity >= Severity.ERROR for i in issues):
            return Verdict(issues=tuple(issues[:MAX_ISSUES]), check=self.name)
        out = self._tool(binary, workdir, deadline, "plan", "-json", "-input=false",
                         "-lock=false", "-no-color", "-out=closedloop.tfplan")
        if out.truncated:
            return self._failed("terraform plan output exceeded the limit")
        try:
            plan = load_plan(out.stdout)
        except PlanFormatError:
            return self._failed(f"terraform plan failed: {_last_error(out.stderr)}")
        if out.returncode == 0:
            # the saved plan, as `show -json`, also carries the planned values for the rules
            shown = self._tool(binary, workdir, deadline, "show", "-json", "-no-color",
                               "closedloop.tfplan")
            if shown.returncode == 0 and not shown.truncated:
                # if unreadable, keep the streamed plan: destructive changes are in it too
                with contextlib.suppress(PlanFormatError):
                    plan = load_plan(shown.stdout)
        issues += self.plan_validator.scan(plan).issues
        if out.returncode != 0 and not any(i.severity >= Severity.ERROR for i in issues):
            return self._failed(f"terraform plan failed: {_last_error(out.stderr)}")
        return Verdict(issues=tuple(issues[:MAX_ISSUES]), check=self.name)

    def _failed(self, reason: str) -> Verdict:
        return Verdict.cannot_tell(reason, check=self.name)


def _last_error(stderr: str) -> str:
    lines = [ln.strip(" │╷╵") for ln in stderr.splitlines()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    if errors:
        return clip(errors[-1])
    from closedloop._redact import redact_text  # only on this failure path

    # the tail of the output, redacted before it is cut (a secret cut short may not match)
    return clip(redact_text(" ".join(ln for ln in lines if ln))[-300:] or "?")
