"""A value a check quotes into an issue message is redacted before it is cut short.

A secret cut first may no longer match any redaction rule (a JWT without its second dot, an
AWS secret key of 38 characters), and its remaining part would then stay in the message, fed
back to the model, stored and exported. Each test puts a secret where the quoted value is cut.
"""

from __future__ import annotations

import json
from typing import Any

from closedloop.validate import AllowedInstanceTypes, TerraformPlanValidator
from closedloop.validate._terraform import diagnostic_issues

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # 40 characters


def _pieces(secret: str, size: int = 10) -> list[str]:
    """Every run of ``size`` characters of ``secret``: none may show in a message."""
    return [secret[i:i + size] for i in range(len(secret) - size + 1)]


def _assert_hidden(secret: str, message: str) -> None:
    leaked = [piece for piece in _pieces(secret) if piece in message]
    assert leaked == [], message
    assert "[REDACTED:" in message, message


def _show_plan(after: dict[str, Any]) -> dict[str, Any]:
    return {"format_version": "1.2", "resource_changes": [{
        "address": "aws_instance.web", "mode": "managed", "type": "aws_instance",
        "change": {"actions": ["create"], "after": after, "after_unknown": {}}}]}


def test_a_secret_in_a_rejected_instance_type_is_redacted_before_it_is_cut() -> None:
    # the message quotes the value cut to 40 characters: inside the JWT, before its 2nd dot
    validator = TerraformPlanValidator([AllowedInstanceTypes(["t3.micro"])])
    (issue,) = validator.scan(_show_plan({"instance_type": f"t3 {JWT}"})).issues
    assert issue.code == "tf_instance_type"
    _assert_hidden(JWT, issue.message)


def test_a_secret_in_a_replacement_reason_is_redacted_before_it_is_cut() -> None:
    # the reason is quoted cut to 60 characters: 38 of the key's 40 would be left
    change = {"resource": {"addr": "aws_instance.web", "resource_type": "aws_instance"},
              "action": "replace", "reason": f"aws_secret_access_key = {AWS_SECRET}"}
    plan = json.dumps({"type": "planned_change", "change": change}) + "\n"
    (issue,) = TerraformPlanValidator()(plan).issues
    assert issue.code == "tf_replace"
    _assert_hidden(AWS_SECRET, issue.message)


def test_a_secret_in_a_replace_path_is_redacted_before_it_is_cut() -> None:
    plan = _show_plan({})
    plan["resource_changes"][0]["change"].update(
        actions=["delete", "create"], replace_paths=[["tags", f"k {JWT}"]])
    (issue,) = TerraformPlanValidator().scan(plan).issues
    _assert_hidden(JWT, issue.message)


def test_a_secret_in_a_long_terraform_diagnostic_is_redacted_before_it_is_cut() -> None:
    # summary and detail are quoted cut to 300 characters: the token straddles the cut
    detail = "x" * (300 - len("bad value: ") - 40) + f" token {JWT} rest"
    (issue,) = diagnostic_issues([{"severity": "error", "summary": "bad value",
                                   "detail": detail}])
    _assert_hidden(JWT, issue.message)
