"""HCL parsing with located errors and user-configured policy rules."""

from __future__ import annotations

import pytest

import closedloop as cl
from closedloop.validate import (
    AllowedInstanceTypes,
    ForbiddenResourceTypes,
    HclValidator,
    RequiredTags,
    Rule,
    TerraformResource,
)

GOOD = """
resource "aws_instance" "web" {
  ami           = "ami-123"
  instance_type = "t3.micro"
  tags = {
    Owner = "platform"
    Env   = "prod"
  }
}
"""

POLICY: list[Rule] = [
    RequiredTags({"Owner": None, "Env": "prod"}, resource_types=["aws_*"]),
    AllowedInstanceTypes(["t3.micro", "t3.small"]),
    ForbiddenResourceTypes(["aws_iam_user", "aws_iam_access_key"], reason="use roles"),
]


def test_compliant_configuration_passes() -> None:
    assert HclValidator(POLICY)(GOOD).passed


def test_syntax_error_is_located_by_file_line_and_column() -> None:
    (issue,) = HclValidator()('resource "aws_instance" "web" {\n  ami = \n}\n').issues
    assert issue.code == "hcl_syntax"
    assert issue.location == "main.tf:line 2, column 9"  # where the value is missing


def test_unclosed_block_is_a_syntax_error() -> None:
    assert [i.code for i in HclValidator()('resource "a" "b" {\n').issues] == ["hcl_syntax"]


def test_each_file_of_a_module_is_parsed_and_named() -> None:
    verdict = HclValidator(POLICY)({"main.tf": GOOD, "extra.tf": "variable {{"})
    (issue,) = verdict.issues
    assert issue.location is not None
    assert issue.location.startswith("extra.tf:line 1")


def test_missing_and_wrong_tags_are_reported() -> None:
    config = 'resource "aws_instance" "web" {\n  instance_type = "t3.micro"\n' \
             '  tags = { Env = "dev" }\n}\n'
    issues = HclValidator(POLICY)(config).issues
    assert [(i.code, i.location) for i in issues] == [
        ("tf_missing_tag", "aws_instance.web"), ("tf_tag_value", "aws_instance.web")]


def test_instance_type_outside_the_allow_list_is_reported() -> None:
    issues = HclValidator(POLICY)(GOOD.replace("t3.micro", "p4d.24xlarge")).issues
    assert [i.code for i in issues] == ["tf_instance_type"]
    assert "t3.micro, t3.small" in issues[0].message


def test_forbidden_resource_type_is_reported_with_the_reason() -> None:
    issues = HclValidator(POLICY)(GOOD + 'resource "aws_iam_user" "bot" {\n  name = "bot"\n'
                                         '  tags = { Owner = "x", Env = "prod" }\n}\n').issues
    assert [(i.code, i.location) for i in issues] == [("tf_forbidden_type", "aws_iam_user.bot")]
    assert "use roles" in issues[0].message


def test_expressions_are_not_judged_before_apply() -> None:
    config = ('resource "aws_instance" "web" {\n  instance_type = var.size\n'
              '  tags = var.tags\n}\n')
    assert HclValidator(POLICY)(config).passed


def test_rules_only_apply_to_their_resource_types() -> None:
    assert HclValidator(POLICY)('resource "random_pet" "p" {\n  length = 2\n}\n').passed


def test_a_plain_function_is_a_rule() -> None:
    def no_public_buckets(r: TerraformResource) -> list[cl.Issue]:
        if r.type == "aws_s3_bucket" and r.values.get("acl") == "public-read":
            return [cl.Issue(code="public_bucket", message="make it private",
                             location=r.address)]
        return []

    verdict = HclValidator([no_public_buckets])(
        'resource "aws_s3_bucket" "b" {\n  acl = "public-read"\n}\n')
    assert [i.code for i in verdict.issues] == ["public_bucket"]


def test_rule_configuration_mistakes_are_config_errors() -> None:
    with pytest.raises(cl.ConfigError):
        RequiredTags([])
    with pytest.raises(cl.ConfigError):
        AllowedInstanceTypes([])


def test_non_text_proposal_fails() -> None:
    assert [i.code for i in HclValidator()(3).issues] == ["not_text"]


def test_an_instance_type_that_is_not_a_string_is_reported() -> None:
    rule = AllowedInstanceTypes(["t3.micro"])
    resource = TerraformResource("aws_instance.w", "aws_instance", {"instance_type": ["t3"]})
    assert [i.code for i in rule(resource)] == ["tf_instance_type"]


def test_terraform_json_syntax_files_get_the_same_rules() -> None:
    config = ('{"resource": {"aws_instance": {"web": {"instance_type": "m5.large",'
              ' "tags": {"Owner": "x", "Env": "prod"}}}}}')
    issues = HclValidator(POLICY)({"main.tf.json": config}).issues
    assert [(i.code, i.location) for i in issues] == [("tf_instance_type", "aws_instance.web")]


def test_malformed_terraform_json_is_located() -> None:
    (issue,) = HclValidator()({"main.tf.json": '{"resource": }'}).issues
    assert (issue.code, issue.location) == ("hcl_syntax", "main.tf.json:line 1, column 14")


def test_policy_issues_reach_the_agent_as_reask_feedback(memory_store: cl.Store) -> None:
    seen: list[str | None] = []

    def agent(task: str, attempt: cl.Attempt) -> str:
        seen.append(attempt.feedback)
        if attempt.feedback and "use one of: t3.micro" in attempt.feedback:
            return GOOD
        return GOOD.replace("t3.micro", "m5.24xlarge")

    loop = cl.Loop(agent, task_type="tf", validators=[HclValidator(POLICY)], store=memory_store)
    result = loop.run("a web server")
    assert (result.outcome, result.attempts) == (cl.Outcome.SUCCEEDED, 2)
    assert seen[1] is not None
    assert "terraform_hcl: [error] tf_instance_type at aws_instance.web" in seen[1]
