"""Immediate validation: checks that run on a proposal before anything touches production.

Every check is a small callable object returning a :class:`~closedloop.Verdict`, usable on its
own (``JsonSchemaValidator(schema)(doc)``) and as a ``Loop(validators=[...])`` entry; its
``name`` becomes the verdict's check name. Optional dependencies are imported when a check is
built, and a missing one is a :class:`~closedloop.ConfigError` naming the extra to install.

- structured output: :class:`JsonSchemaValidator`, :class:`PydanticValidator`, :class:`MaxSize`
- code: :class:`PythonSyntax`, :class:`RuffLint`, :class:`SqlSyntax`
- Terraform: :class:`HclValidator` with policy rules (:class:`RequiredTags`,
  :class:`ForbiddenResourceTypes`, :class:`AllowedInstanceTypes`), :class:`TerraformPlanValidator`
  for destructive changes in either plan format, :class:`TerraformCli` for the binary itself
- deadlines: :func:`with_timeout` turns a hung check into :class:`CheckTimeout`, which the loop
  records as ``validator_error`` (the check failed, not the agent)

No input breaks a check: every parsing check refuses, as an issue fed back to the model, input
over its ``max_bytes`` (``DEFAULT_MAX_BYTES`` per class: ``too_large``), bytes that are not
UTF-8 (``not_utf8``), NUL characters (``nul_character``), JSON integers over 4300 digits
(``json_number``) and nesting too deep to parse or walk (``json_depth``).
"""

from closedloop._checks import with_timeout
from closedloop._errors import CheckTimeout
from closedloop.validate._code import PythonSyntax, RuffLint, SqlSyntax
from closedloop.validate._structured import (
    JsonSchemaValidator,
    MaxSize,
    PydanticValidator,
    json_path,
    parse_json,
)
from closedloop.validate._terraform import (
    AllowedInstanceTypes,
    ForbiddenResourceTypes,
    HclValidator,
    PlanFormatError,
    RequiredTags,
    Rule,
    TerraformCli,
    TerraformPlanValidator,
    TerraformResource,
    load_plan,
)

__all__ = [
    "AllowedInstanceTypes",
    "CheckTimeout",
    "ForbiddenResourceTypes",
    "HclValidator",
    "JsonSchemaValidator",
    "MaxSize",
    "PlanFormatError",
    "PydanticValidator",
    "PythonSyntax",
    "RequiredTags",
    "RuffLint",
    "Rule",
    "SqlSyntax",
    "TerraformCli",
    "TerraformPlanValidator",
    "TerraformResource",
    "json_path",
    "load_plan",
    "parse_json",
    "with_timeout",
]
