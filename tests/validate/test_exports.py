"""The public surfaces of closedloop.validate and closedloop.verify; optional extras."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

import closedloop as cl
from closedloop import validate, verify


@pytest.mark.parametrize("module", [validate, verify])
def test_all_is_sorted_and_complete(module: ModuleType) -> None:
    public = {n for n in dir(module) if not n.startswith("_")
              and getattr(getattr(module, n), "__module__", "").startswith(module.__name__)}
    assert module.__all__ == sorted(module.__all__)
    assert public <= set(module.__all__)
    assert all(hasattr(module, n) for n in module.__all__)


@pytest.mark.parametrize(
    ("module", "build", "extra"),
    [
        ("jsonschema", lambda: validate.JsonSchemaValidator({}), "validators"),
        ("sqlglot", validate.SqlSyntax, "validators"),
        ("hcl2", validate.HclValidator, "validators"),
        ("httpx", lambda: verify.HttpVerifier("http://127.0.0.1"), "http"),
        ("boto3", verify.Ec2InstanceVerifier, "aws"),
    ],
)
def test_a_missing_optional_dependency_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, build: object, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(cl.ConfigError, match=rf"pip install 'closedloop\[{extra}\]'"):
        build()  # type: ignore[operator]


@pytest.mark.parametrize("check", [
    validate.JsonSchemaValidator({}), validate.PydanticValidator(int), validate.MaxSize(10),
    validate.PythonSyntax(), validate.RuffLint(), validate.SqlSyntax(), validate.HclValidator(),
    validate.TerraformPlanValidator(), validate.TerraformCli(),
])
def test_every_validator_has_a_name_for_the_loop(check: object) -> None:
    name = getattr(check, "name", "")
    assert isinstance(name, str) and name
