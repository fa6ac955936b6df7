"""The terraform binary's own validate and plan, each in a fresh directory (real terraform).

Only Terraform's builtin ``terraform_data`` resource is used, so ``init`` needs no network.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

import _services
import closedloop as cl
from closedloop.validate import (
    CheckTimeout,
    TerraformCli,
    TerraformPlanValidator,
    TerraformResource,
)

needs_terraform = pytest.mark.requires("terraform")

CONFIG = 'resource "terraform_data" "app" {\n  input = "v1"\n}\n'


@needs_terraform
def test_valid_configuration_passes() -> None:
    assert TerraformCli()(CONFIG).passed


@needs_terraform
def test_validate_diagnostics_are_located() -> None:
    verdict = TerraformCli()('resource "terraform_data" "app" {\n  inputt = "v1"\n}\n')
    (issue,) = verdict.issues
    assert issue.code == "tf_diagnostic"
    assert issue.location == "main.tf:line 2, column 3"
    assert 'Did you mean "input"?' in issue.message


@needs_terraform
def test_plan_of_new_resources_passes() -> None:
    assert TerraformCli(plan=True)(CONFIG).passed


@pytest.fixture(scope="module")
def applied_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real state holding terraform_data.app, made with ``terraform apply``."""
    binary = _services.program("terraform")
    work = tmp_path_factory.mktemp("applied")
    (work / "main.tf").write_text(CONFIG)
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    for args in (["init", "-input=false"], ["apply", "-auto-approve", "-input=false"]):
        subprocess.run([binary, *args], cwd=work, env=env, check=True, capture_output=True)
    return work / "terraform.tfstate"


@needs_terraform
def test_plan_that_deletes_a_resource_is_critical(applied_state: Path) -> None:
    other = 'resource "terraform_data" "other" {\n  input = "x"\n}\n'
    verdict = TerraformCli(plan=True, state=applied_state)(other)
    assert verdict.critical
    assert ("tf_delete", "terraform_data.app") in {(i.code, i.location) for i in verdict.issues}


@needs_terraform
def test_plan_that_replaces_a_resource_is_critical(applied_state: Path) -> None:
    replaced = CONFIG.replace('input = "v1"', 'input = "v1"\n  triggers_replace = ["v2"]')
    verdict = TerraformCli(plan=True, state=applied_state)(replaced)
    assert verdict.critical
    assert [(i.code, i.location) for i in verdict.issues] == [
        ("tf_replace", "terraform_data.app")]


@needs_terraform
def test_each_run_uses_its_own_directory_and_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[str] = []
    real = tempfile.TemporaryDirectory

    def spy(*args: Any, **kwargs: Any) -> tempfile.TemporaryDirectory[str]:
        made = real(*args, **kwargs)
        seen.append(made.name)
        return made

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    TerraformCli()(CONFIG)
    TerraformCli()(CONFIG)
    assert len(set(seen)) == 2
    assert all(Path(d).parent == tmp_path and not Path(d).exists() for d in seen)


def _fake_binary(tmp_path: Path, script: str) -> str:
    path = tmp_path / "terraform"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_hung_binary_is_killed_and_raises_timeout(tmp_path: Path) -> None:
    check = TerraformCli(binary=_fake_binary(tmp_path, "exec sleep 30\n"), timeout=0.3)
    with pytest.raises(CheckTimeout, match="did not finish within"):
        check(CONFIG)


def test_init_failure_is_unknown_not_the_agents_fault(tmp_path: Path) -> None:
    script = 'echo "Error: Failed to query available provider packages" >&2\nexit 1\n'
    verdict = TerraformCli(binary=_fake_binary(tmp_path, script))(CONFIG)
    assert verdict.unknown is not None
    assert "Failed to query available provider packages" in verdict.unknown


def test_output_over_the_limit_is_unknown(tmp_path: Path) -> None:
    script = 'if [ "$1" = validate ]; then head -c 5000 /dev/zero; fi\nexit 0\n'
    verdict = TerraformCli(binary=_fake_binary(tmp_path, script), max_output=1000)(CONFIG)
    assert verdict.unknown == "terraform validate output exceeded the limit"


def test_no_binary_is_a_recorded_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    verdict = TerraformCli()(CONFIG)
    assert verdict.passed
    assert [i.code for i in verdict.issues] == ["skipped"]
    assert TerraformCli(if_missing="unknown")(CONFIG).unknown is not None


def test_file_names_cannot_escape_the_directory() -> None:
    verdict = TerraformCli()({"../evil.tf": CONFIG})
    assert [i.code for i in verdict.issues] == ["tf_file_name"]


def test_timeout_in_the_loop_is_a_validator_error(tmp_path: Path,
                                                  memory_store: cl.Store) -> None:
    check = TerraformCli(binary=_fake_binary(tmp_path, "exec sleep 30\n"), timeout=0.3)
    loop = cl.Loop(lambda t, a: CONFIG, task_type="tf",
                                            validators=[check], store=memory_store)
    result = loop.run("x")
    assert result.outcome is cl.Outcome.ERROR
    assert result.error_type is cl.ErrorType.VALIDATOR_ERROR
    assert result.error_message is not None
    assert "CheckTimeout" in result.error_message


@needs_terraform
def test_policy_rules_see_the_real_planned_values() -> None:
    def no_v1(resource: TerraformResource) -> list[cl.Issue]:
        if resource.values.get("input") == "v1":
            return [cl.Issue(code="no_v1", location=resource.address, message="use v2")]
        return []

    check = TerraformCli(plan=True, plan_validator=TerraformPlanValidator([no_v1]))
    assert [(i.code, i.location) for i in check(CONFIG).issues] == [
        ("no_v1", "terraform_data.app")]
    assert check(CONFIG.replace("v1", "v2")).passed
