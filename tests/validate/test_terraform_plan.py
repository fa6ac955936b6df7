"""Destructive-change detection in both Terraform plan formats, on recorded Terraform plans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.validate import (
    PlanFormatError,
    RequiredTags,
    TerraformPlanValidator,
    load_plan,
)

DATA = Path(__file__).parent.parent / "data" / "terraform"


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def stream(*messages: dict[str, Any]) -> str:
    return "\n".join(json.dumps(m) for m in messages) + "\n"


def planned(addr: str, action: str, reason: str | None = None) -> dict[str, Any]:
    change: dict[str, Any] = {"resource": {"addr": addr, "resource_type": addr.partition(".")[0]},
                              "action": action}
    if reason:
        change["reason"] = reason
    return {"@level": "info", "@message": f"{addr}: Plan to {action}", "type": "planned_change",
            "change": change}


VERSION = {"@level": "info", "terraform": "1.7.5", "type": "version", "ui": "1.2"}
SUMMARY = {"type": "change_summary", "changes": {"add": 0, "change": 1, "remove": 0}}


def test_in_place_update_is_not_destructive() -> None:
    verdict = TerraformPlanValidator()(fixture("update.json"))
    assert verdict.passed
    assert verdict.issues == ()


def test_delete_is_critical() -> None:
    verdict = TerraformPlanValidator()(fixture("delete.json"))
    (issue,) = verdict.issues
    assert verdict.critical
    assert (issue.code, issue.location) == ("tf_delete", "random_pet.example")
    assert "delete_because_no_resource_config" in issue.message


def test_delete_create_replacement_is_critical_with_its_reason() -> None:
    (issue,) = TerraformPlanValidator()(fixture("delete-create.json")).issues
    assert (issue.code, issue.severity) == ("tf_replace", cl.Severity.CRITICAL)
    assert "replace_because_cannot_update" in issue.message
    assert "separator" in issue.message


def test_delete_of_a_deposed_object_is_critical_and_named() -> None:
    # after a failed create_before_destroy, the state holds the current object and a deposed
    # one; the plan keeps the current object (no-op) and deletes the deposed one
    plan = json.loads(fixture("delete.json"))
    (change,) = plan["resource_changes"]
    current = {**change, "change": {**change["change"], "actions": ["no-op"]}}
    del current["action_reason"]
    deposed = {**change, "deposed": "00000001"}
    del deposed["action_reason"]
    plan["resource_changes"] = [current, deposed]
    verdict = TerraformPlanValidator()(plan)
    (issue,) = verdict.issues
    assert verdict.critical
    assert (issue.code, issue.location) == ("tf_delete", "random_pet.example")
    assert "deposed object 00000001" in issue.message


def test_create_before_destroy_replacement_is_detected() -> None:
    plan = json.loads(fixture("delete-create.json"))
    plan["resource_changes"][0]["change"]["actions"] = ["create", "delete"]
    (issue,) = TerraformPlanValidator()(plan).issues
    assert issue.code == "tf_replace"


def test_sensitive_values_are_never_echoed() -> None:
    plan = json.loads(fixture("sensitive-replace.json"))
    verdict = TerraformPlanValidator([RequiredTags(["Owner"])])(plan)
    assert verdict.critical
    rendered = json.dumps(verdict.to_dict()) + cl.render_feedback([verdict])
    change = plan["resource_changes"][0]["change"]
    for secret in (change["before"]["base64"], change["before"]["hex"]):
        assert secret not in rendered


def test_no_resource_value_is_echoed_even_when_not_marked_sensitive() -> None:
    verdict = TerraformPlanValidator()(fixture("delete.json"))
    assert "civil-mongoose" not in json.dumps(verdict.to_dict())


def test_allowed_destroy_becomes_a_warning() -> None:
    verdict = TerraformPlanValidator(allow_destroy=["random_pet.*"])(fixture("delete.json"))
    assert verdict.passed
    assert [i.severity for i in verdict.issues] == [cl.Severity.WARNING]


def test_severity_can_be_lowered_to_error_for_reask() -> None:
    verdict = TerraformPlanValidator(severity=cl.Severity.ERROR)(fixture("delete.json"))
    assert not verdict.passed
    assert not verdict.critical


def test_forget_is_reported_as_removal() -> None:
    plan = json.loads(fixture("delete.json"))
    plan["resource_changes"][0]["change"]["actions"] = ["forget"]
    assert [i.code for i in TerraformPlanValidator()(plan).issues] == ["tf_remove"]


def test_show_json_drift_is_a_warning_not_a_change() -> None:
    plan = json.loads(fixture("update.json"))
    plan["resource_drift"] = [{"address": "random_pet.gone", "change": {"actions": ["delete"]}}]
    verdict = TerraformPlanValidator()(plan)
    assert verdict.passed
    assert [(i.code, i.location) for i in verdict.issues] == [("tf_drift", "random_pet.gone")]


def test_errored_plan_blocks() -> None:
    plan = json.loads(fixture("update.json"))
    plan["errored"] = True
    assert [i.code for i in TerraformPlanValidator()(plan).issues] == ["tf_plan_errored"]


def test_streamed_planned_delete_is_detected() -> None:
    text = stream(VERSION, planned("aws_instance.web", "delete"), SUMMARY)
    verdict = TerraformPlanValidator()(text)
    assert verdict.critical
    assert [(i.code, i.location) for i in verdict.issues] == [("tf_delete", "aws_instance.web")]


def test_streamed_replace_and_remove_are_detected() -> None:
    text = stream(VERSION, planned("aws_instance.web", "replace", "cannot_update"),
                  planned("aws_s3_bucket.logs", "remove"), SUMMARY)
    issues = TerraformPlanValidator()(text).issues
    assert [i.code for i in issues] == ["tf_replace", "tf_remove"]
    assert "cannot_update" in issues[0].message


def test_streamed_drift_is_drift_not_a_planned_deletion() -> None:
    drift = {"type": "resource_drift",
             "change": {"resource": {"addr": "aws_instance.web"}, "action": "delete"}}
    verdict = TerraformPlanValidator()(stream(VERSION, drift, SUMMARY))
    assert verdict.passed
    assert [i.code for i in verdict.issues] == ["tf_drift"]


def test_drift_does_not_hide_a_planned_change_to_the_same_resource() -> None:
    drift = {"type": "resource_drift",
             "change": {"resource": {"addr": "aws_instance.web"}, "action": "update"}}
    text = stream(VERSION, drift, planned("aws_instance.web", "delete"))
    assert [i.code for i in TerraformPlanValidator()(text).issues] == ["tf_drift", "tf_delete"]


def test_streamed_create_update_and_noop_pass() -> None:
    text = stream(VERSION, planned("a.b", "create"), planned("a.c", "update"),
                  planned("a.d", "noop"), planned("a.e", "read"), SUMMARY)
    assert TerraformPlanValidator()(text).issues == ()


def test_streamed_error_diagnostic_blocks_without_echoing_values() -> None:
    diag = {"type": "diagnostic", "@level": "error",
            "diagnostic": {"severity": "error", "summary": "Invalid value",
                           "detail": "bad instance type",
                           "range": {"filename": "main.tf", "start": {"line": 3, "column": 5}},
                           "snippet": {"values": [{"traversal": "var.password",
                                                   "statement": "is \"hunter2\""}]}}}
    verdict = TerraformPlanValidator()(stream(VERSION, diag))
    (issue,) = verdict.issues
    assert (issue.code, issue.location) == ("tf_diagnostic", "main.tf:line 3, column 5")
    assert "hunter2" not in json.dumps(verdict.to_dict())


def test_a_parsed_stream_list_is_accepted() -> None:
    verdict = TerraformPlanValidator()([VERSION, planned("a.b", "delete")])
    assert verdict.critical


def test_policy_rules_run_over_planned_values() -> None:
    verdict = TerraformPlanValidator([RequiredTags(["Owner"])])(fixture("update.json"))
    assert [(i.code, i.location) for i in verdict.issues] == [
        ("tf_missing_tag", "terraform_data.replacement")]


@pytest.mark.parametrize("text", ["", "not json", '{"a": 1}\n[1]', "[1, 2]", '"x"'])
def test_malformed_plans_are_a_format_issue(text: str) -> None:
    with pytest.raises(PlanFormatError):
        load_plan(text)
    assert [i.code for i in TerraformPlanValidator()(text).issues] == ["plan_format"]


def test_a_json_document_that_is_not_a_plan_is_a_format_issue() -> None:
    assert [i.code for i in TerraformPlanValidator()({"hello": 1}).issues] == ["plan_format"]


def test_malformed_stream_line_is_named() -> None:
    with pytest.raises(PlanFormatError, match="line 2"):
        load_plan(json.dumps(VERSION) + "\n{oops\n")


def test_destructive_plan_blocks_the_loop_without_reask(memory_store: cl.Store) -> None:
    calls: list[int] = []

    def agent(task: str, attempt: cl.Attempt) -> str:
        calls.append(attempt.number)
        return fixture("delete.json")

    loop = cl.Loop(agent, task_type="tf", store=memory_store,
                                            validators=[TerraformPlanValidator()])
    result = loop.run("remove the pet")
    assert result.outcome is cl.Outcome.BLOCKED
    assert calls == [1]
    assert result.validation[0].check == "terraform_plan"


def test_a_one_line_stream_is_read_as_a_stream() -> None:
    verdict = TerraformPlanValidator()(json.dumps(planned("a.b", "delete")))
    assert [i.code for i in verdict.issues] == ["tf_delete"]


def test_recorded_terraform_stream_deletes_and_replaces_are_critical() -> None:
    verdict = TerraformPlanValidator()(fixture("plan-stream-delete-replace.jsonl"))
    assert verdict.critical
    assert [(i.code, i.location) for i in verdict.issues] == [
        ("tf_delete", "terraform_data.db"), ("tf_replace", "terraform_data.app")]
    assert "delete_because_no_resource_config" in verdict.issues[0].message
