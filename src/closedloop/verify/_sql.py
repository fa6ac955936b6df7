"""SQL outcome verification: a query's rows against expected rows or a per-row predicate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from closedloop._checks import clip
from closedloop._verdict import Issue, Verdict

MAX_ROW_ISSUES = 20

Params = Sequence[Any] | Mapping[str, Any] | None


def _is_unreachable(exc: BaseException) -> bool:
    # DB-API 2.0: OperationalError is "not necessarily under the control of the programmer":
    # lost connection, database not found, server shutting down.
    return any(c.__name__ == "OperationalError" for c in type(exc).__mro__)


class SqlVerifier:
    """Runs ``query`` over a DB-API connection and compares the rows with the intent.

    ``connect`` is a DB-API connection, or a zero-argument callable returning a fresh one
    (closed after the check). ``params`` and ``rows`` may be fixed or functions of
    ``(intent, result)``. ``rows`` is compared as a multiset (order matters with
    ``ordered=True``); ``each_row(row) -> bool`` must hold for every row. Every missing,
    unexpected or failing row is reported. A connection that cannot be opened, or an
    ``OperationalError``, is *unknown*; any other database error is the verifier's own bug
    and propagates (the loop records ``verifier_error``).
    """

    def __init__(
        self,
        connect: Any,
        query: str,
        *,
        params: Params | Callable[[Any, Any], Params] = None,
        rows: Iterable[Sequence[Any]] | Callable[[Any, Any], Iterable[Sequence[Any]]]
        | None = None,
        each_row: Callable[[tuple[Any, ...]], bool] | None = None,
        ordered: bool = False,
        name: str = "sql",
    ) -> None:
        self.connect = connect
        self.query = query
        self.params = params
        self.rows = rows
        self.each_row = each_row
        self.ordered = ordered
        self.name = name

    def __call__(self, intent: Any, result: Any) -> Verdict:
        params = self.params(intent, result) if callable(self.params) else self.params
        expected = self.rows(intent, result) if callable(self.rows) else self.rows
        try:
            got = self._fetch(params)
        except Exception as exc:
            if _is_unreachable(exc) or isinstance(exc, _Unreachable):
                return Verdict.cannot_tell(f"cannot read the database: {type(exc).__name__}: "
                                           f"{clip(str(exc), 200)}", check=self.name)
            raise
        return self.compare(got, None if expected is None else [tuple(r) for r in expected])

    def _fetch(self, params: Params) -> list[tuple[Any, ...]]:
        owned = not hasattr(self.connect, "cursor")
        try:
            conn = self.connect() if owned else self.connect
        except Exception as exc:  # any failure to connect means "cannot tell"
            raise _Unreachable(str(exc)) from exc
        try:
            cur = conn.cursor()
            try:
                if params is None:
                    cur.execute(self.query)
                else:
                    cur.execute(self.query, params)
                return [tuple(r) for r in cur.fetchall()]
            finally:
                cur.close()
        finally:
            if owned:
                conn.close()

    def compare(self, got: list[tuple[Any, ...]],
                expected: list[tuple[Any, ...]] | None) -> Verdict:
        """Every difference between the rows read and the rows expected."""
        issues: list[Issue] = []
        if expected is not None:
            if self.ordered:
                for n, (have, want) in enumerate(zip(got, expected, strict=False)):
                    if have != want:
                        issues.append(Issue(code="sql_row", location=f"row {n}",
                                            message=f"is {clip(repr(have), 120)}, expected "
                                                    f"{clip(repr(want), 120)}"))
                if len(got) != len(expected):
                    issues.append(Issue(code="sql_row_count",
                                        message=f"{len(got)} rows, expected {len(expected)}"))
            else:
                have_c, want_c = Counter(got), Counter(expected)
                for row in (want_c - have_c).elements():
                    issues.append(Issue(code="sql_missing_row",
                                        message=f"missing row {clip(repr(row), 160)}"))
                for row in (have_c - want_c).elements():
                    issues.append(Issue(code="sql_unexpected_row",
                                        message=f"unexpected row {clip(repr(row), 160)}"))
        if self.each_row is not None:
            label = getattr(self.each_row, "__name__", "predicate")
            for n, row in enumerate(got):
                if not self.each_row(row):
                    issues.append(Issue(code="sql_row_predicate", location=f"row {n}",
                                        message=f"{clip(repr(row), 120)} fails {label}"))
        if len(issues) > MAX_ROW_ISSUES:
            more = len(issues) - MAX_ROW_ISSUES
            issues = [*issues[:MAX_ROW_ISSUES],
                      Issue(code="sql_more", message=f"and {more} more differences")]
        return Verdict(issues=tuple(issues), check=self.name)


class _Unreachable(Exception):
    """The connection could not be opened."""
