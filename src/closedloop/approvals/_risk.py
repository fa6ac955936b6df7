"""Risk rules: what makes a proposal high-stakes, so that it always waits for a human.

A risk rule is any callable ``rule(proposal) -> Risk | str | None`` (``None``: no risk; a
string: a destructive risk with that summary), plain or ``async def``. Give them to the loop
(``Loop(risk_rules=[...])``): a proposal any rule marks is gated at every autonomy level,
even ``autonomous``, and never by an inline ``approver=``: it becomes a durable request a
person decides, with the risk shown (and, with ``two_approvers=True``, two distinct people
when it is destructive).

Built in: :func:`destructive_terraform` (deletes, replacements and removals from state in a
Terraform plan, through :class:`~closedloop.validate.TerraformPlanValidator`'s scan) and
:func:`destructive_sql` (``DROP``, ``TRUNCATE``, ``DELETE``/``UPDATE`` without ``WHERE``,
``ALTER … DROP``, through sqlglot as :class:`~closedloop.validate.SqlSyntax` parses it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from closedloop._approvals import Risk, RiskRule
from closedloop._redact import clip


def _text(proposal: object) -> object:
    return proposal


class _TerraformRisk:
    """Planned deletes, replacements and removals from state in a Terraform plan."""

    def __init__(self, allow_destroy: tuple[str, ...],
                 extract: Callable[[Any], Any]) -> None:
        from closedloop.validate import TerraformPlanValidator

        self.name = "destructive_terraform"
        self._extract = extract
        from closedloop._verdict import Severity

        self._scan = TerraformPlanValidator(allow_destroy=allow_destroy,
                                            severity=Severity.CRITICAL, name=self.name)

    def __call__(self, proposal: object) -> Risk | None:
        verdict = self._scan(self._extract(proposal))
        items: list[dict[str, Any]] = [
            {"address": i.location, "action": i.code[3:], "message": i.message}
                 for i in verdict.issues
                 if i.code in ("tf_delete", "tf_replace", "tf_remove")
                 and i.severity >= i.severity.CRITICAL]
        if not items:
            return None
        counts: dict[str, int] = {}
        for item in items:
            counts[item["action"]] = counts.get(item["action"], 0) + 1
        summary = "Terraform plan will " + ", ".join(
            f"{verb} {n} resource{'s' if n != 1 else ''}" for verb, n in sorted(counts.items()))
        return Risk(summary=summary, items=tuple(items), rule=self.name)


def destructive_terraform(*, allow_destroy: tuple[str, ...] | list[str] = (),
                          extract: Callable[[Any], Any] = _text) -> RiskRule:
    """A rule marking Terraform plans (``terraform show -json`` or a ``plan -json`` stream,
    as text or parsed) that delete, replace or forget resources; ``allow_destroy`` globs of
    addresses are not counted. ``extract(proposal)`` picks the plan out of a larger proposal.
    A proposal that is not a plan carries no Terraform risk. Needs the ``validators`` extra.
    """
    return _TerraformRisk(tuple(allow_destroy), extract)


class _SqlRisk:
    """Statements that destroy data."""

    def __init__(self, dialect: str, extract: Callable[[Any], Any]) -> None:
        from closedloop.validate import SqlSyntax

        self.name = "destructive_sql"
        self._check = SqlSyntax(dialect, forbid_destructive=True, name=self.name)
        self._dialect = dialect
        self._extract = extract

    def __call__(self, proposal: object) -> Risk | None:
        text = self._extract(proposal)
        if not isinstance(text, str):
            return None
        verdict = self._check(text)
        items: list[dict[str, Any]] = [{"statement": i.location, "message": i.message}
                                       for i in verdict.issues if i.code == "sql_destructive"]
        items += self._alter_drops(text)
        if not items:
            return None
        return Risk(summary=f"SQL destroys data: {clip(str(items[0]['message']), 200)}"
                    + (f" (+{len(items) - 1} more)" if len(items) > 1 else ""),
                    items=tuple(items), rule=self.name)

    def _alter_drops(self, text: str) -> list[dict[str, Any]]:
        import sqlglot
        from sqlglot import exp
        from sqlglot.errors import SqlglotError

        try:
            statements = sqlglot.parse(text, read=self._dialect)
        except (SqlglotError, RecursionError):
            return []  # not SQL the parser reads: the SqlSyntax validator reports it
        found = []
        for n, s in enumerate(statements, 1):
            if isinstance(s, exp.Alter) and any(isinstance(a, exp.Drop)
                                                for a in s.args.get("actions") or []):
                found.append({"statement": f"statement {n}",
                              "message": f"ALTER … DROP on {clip(s.this.sql(), 80)} "
                                         "destroys data"})
        return found


def destructive_sql(dialect: str = "postgres", *,
                    extract: Callable[[Any], Any] = _text) -> RiskRule:
    """A rule marking SQL that destroys data: ``DROP``, ``TRUNCATE``, ``DELETE``/``UPDATE``
    without ``WHERE``, ``ALTER … DROP``. ``extract(proposal)`` picks the SQL text out of a
    larger proposal; anything that is not a string carries no SQL risk. Needs the
    ``validators`` extra (sqlglot)."""
    return _SqlRisk(dialect, extract)
