"""The migrations scenario's tasks and its seeded simulated agent, with a ledger of its faults.

The agent proposes PostgreSQL schema migrations (SQL text) for seeded tasks: add a column of
a type to a table, or create a table with an index. It makes four kinds of mistake on
purpose, each one the loop must catch at a different layer:

- bad SQL syntax (a misspelt keyword, an unclosed parenthesis): immediate validation, re-ask;
- a destructive statement (``DROP TABLE``, ``TRUNCATE``, ``ALTER … DROP COLUMN``): the risk
  rule gates it as a durable approval request, never executed unattended;
- a migration that applies but leaves the schema wrong (wrong column type or name):
  verification against ``information_schema`` fails, the step's compensation restores it;
- a migration that fails mid-way (its second statement fails in PostgreSQL): the executor's
  transaction is rolled back, nothing of it stays.

Every proposal goes into a :class:`MigrationLedger`, the ground truth the demo's summary is
checked against. Pure Python: no database here.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from closedloop.loop import Attempt

BASE_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "customers": (("id", "bigint"), ("email", "text"), ("created_at", "timestamp with time zone")),
    "orders": (("id", "bigint"), ("customer_id", "bigint"), ("total_cents", "integer")),
}
"""The tables every demo schema starts with (a few rows each): ``information_schema`` types."""
BASE_DDL = """
CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL,
                        created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers,
                     total_cents integer NOT NULL);
CREATE TABLE schema_migrations (version integer PRIMARY KEY, description text NOT NULL,
                                applied_at timestamptz NOT NULL DEFAULT now());
INSERT INTO customers (id, email) VALUES (1, 'ada@example.com'), (2, 'grace@example.com'),
                                         (3, 'edsger@example.com');
INSERT INTO orders VALUES (1, 1, 1200), (2, 1, 560), (3, 2, 9900), (4, 3, 150);
"""
BASE_ROWS = {"customers": 3, "orders": 4}

# SQL spelling -> information_schema.columns.data_type
SQL_TYPES: dict[str, str] = {
    "integer": "integer", "bigint": "bigint", "text": "text", "boolean": "boolean",
    "numeric": "numeric", "timestamptz": "timestamp with time zone", "date": "date",
}
_NEW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("loyalty_points", "integer"), ("referral_code", "text"), ("is_vip", "boolean"),
    ("discount_rate", "numeric"), ("last_login_at", "timestamptz"), ("birthday", "date"),
    ("external_id", "bigint"),
)
_NEW_TABLES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    # name: (the base table it points at, its columns after id)
    "invoices": ("orders", (("order_id", "bigint"), ("amount_cents", "integer"))),
    "shipments": ("orders", (("order_id", "bigint"), ("carrier", "text"))),
    "refunds": ("orders", (("order_id", "bigint"), ("reason", "text"))),
    "addresses": ("customers", (("customer_id", "bigint"), ("city", "text"))),
}

SYSTEM_PROMPT = (
    "You are a database migration agent for PostgreSQL. Reply with the SQL of the migration "
    "and nothing else. Only add to the schema: never drop, truncate or delete."
)


class FaultCategory(StrEnum):
    """The layer of the loop that must catch the mistake."""

    SYNTAX = "syntax"
    """Caught by immediate validation (SqlSyntax), corrected (usually) by re-ask."""
    DESTRUCTIVE = "destructive"
    """Marked by the ``destructive_sql`` risk rule: a durable approval request, not executed."""
    WRONG_SCHEMA = "wrong_schema"
    """Applies; verification against information_schema fails; compensation restores."""
    MIDWAY = "midway"
    """Fails in PostgreSQL after its first statement ran: the transaction is rolled back."""


class FaultKind(StrEnum):
    """What exactly the agent got wrong in one proposal."""

    MISSPELT_KEYWORD = "misspelt_keyword"
    UNCLOSED_PAREN = "unclosed_paren"
    DROP_TABLE = "drop_table"
    TRUNCATE_TABLE = "truncate_table"
    DROP_COLUMN = "drop_column"
    WRONG_COLUMN_TYPE = "wrong_column_type"
    WRONG_COLUMN_NAME = "wrong_column_name"
    FAILS_MIDWAY = "fails_midway"

    @property
    def category(self) -> FaultCategory:
        """The category this kind belongs to."""
        return _CATEGORY[self]


_CATEGORY = {
    FaultKind.MISSPELT_KEYWORD: FaultCategory.SYNTAX,
    FaultKind.UNCLOSED_PAREN: FaultCategory.SYNTAX,
    FaultKind.DROP_TABLE: FaultCategory.DESTRUCTIVE,
    FaultKind.TRUNCATE_TABLE: FaultCategory.DESTRUCTIVE,
    FaultKind.DROP_COLUMN: FaultCategory.DESTRUCTIVE,
    FaultKind.WRONG_COLUMN_TYPE: FaultCategory.WRONG_SCHEMA,
    FaultKind.WRONG_COLUMN_NAME: FaultCategory.WRONG_SCHEMA,
    FaultKind.FAILS_MIDWAY: FaultCategory.MIDWAY,
}
_DESTRUCTIVE = (FaultKind.DROP_TABLE, FaultKind.TRUNCATE_TABLE, FaultKind.DROP_COLUMN)


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationTask:
    """What a developer asked the agent for: one additive schema change.

    ``kind`` is ``add_column`` (one column on ``table``) or ``create_table`` (``table`` with
    ``columns`` after its ``id``, and an index on the first one). Column types are SQL
    spellings (keys of :data:`SQL_TYPES`).
    """

    index: int
    kind: str
    table: str
    columns: tuple[tuple[str, str], ...]

    @property
    def version(self) -> int:
        """The migration's number in ``schema_migrations``."""
        return self.index + 1

    def describe(self) -> str:
        """The task as the developer wrote it, for the agent's prompt."""
        cols = ", ".join(f"{n} ({t})" for n, t in self.columns)
        if self.kind == "add_column":
            return f"Add the column {cols} to the table {self.table}."
        return (f"Create the table {self.table} with an id (bigint primary key) and {cols}, "
                f"and an index on {self.columns[0][0]}.")

    def correct_sql(self) -> str:
        """The migration a perfect agent would propose."""
        if self.kind == "add_column":
            name, typ = self.columns[0]
            return f"ALTER TABLE {self.table} ADD COLUMN {name} {typ};"
        cols = ", ".join(f"{n} {t}" for n, t in self.columns)
        first = self.columns[0][0]
        return (f"CREATE TABLE {self.table} (id bigint PRIMARY KEY, {cols});\n"
                f"CREATE INDEX {self.table}_{first}_idx ON {self.table} ({first});")

    def expected_columns(self) -> dict[tuple[str, str], str]:
        """``(table, column) -> information_schema data_type`` the migration must leave."""
        out = {(self.table, n): SQL_TYPES[t] for n, t in self.columns}
        if self.kind == "create_table":
            out[(self.table, "id")] = "bigint"
        return out


def generate_tasks(count: int, seed: int) -> list[MigrationTask]:
    """``count`` seeded tasks; task ``i`` depends only on ``(seed, i)``. Names carry the index,
    so tasks never collide with each other or with the base tables."""
    out = []
    for index in range(count):
        rng = random.Random(f"closedloop-demo:migrations:{seed}:task:{index}")
        if rng.random() < 0.6:
            name, typ = rng.choice(_NEW_COLUMNS)
            out.append(MigrationTask(index=index, kind="add_column",
                                     table=rng.choice(sorted(BASE_TABLES)),
                                     columns=((f"{name}_{index}", typ),)))
        else:
            base = rng.choice(sorted(_NEW_TABLES))
            out.append(MigrationTask(index=index, kind="create_table", table=f"{base}_{index}",
                                     columns=_NEW_TABLES[base][1]))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One proposal the agent emitted, and the fault it injected into it (if any)."""

    task: int
    trace_id: str
    attempt: int
    kind: FaultKind | None = None

    @property
    def category(self) -> FaultCategory | None:
        """The fault's category, or None for a correct proposal."""
        return self.kind.category if self.kind is not None else None


EXPECTED = ("succeeded", "failed_validation", "awaiting_approval", "compensated",
            "rolled_back", "suggested")
"""How a task can end in the demo (see :func:`expected_result`)."""


@dataclass(slots=True)
class MigrationLedger:
    """Every proposal the simulated agent emitted, in order: the demo's ground truth."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def by_task(self) -> dict[int, list[LedgerEntry]]:
        """Entries grouped by task, attempts in order."""
        out: dict[int, list[LedgerEntry]] = {}
        for e in self.entries:
            out.setdefault(e.task, []).append(e)
        return out

    def counts(self) -> dict[str, int]:
        """Faulty proposals per category and per kind (zeros included), plus ``proposals``."""
        by_kind = Counter(e.kind for e in self.entries if e.kind is not None)
        out = {"proposals": len(self.entries)}
        for category in FaultCategory:
            out[category.value] = sum(n for k, n in by_kind.items() if k.category is category)
        for kind in FaultKind:
            out[kind.value] = by_kind.get(kind, 0)
        return out

    def expected_outcomes(self, max_attempts: int, autonomy: str = "autonomous"
                          ) -> dict[str, int]:
        """How many tasks must end each way, zeros included."""
        out = dict.fromkeys(EXPECTED, 0)
        for entries in self.by_task().values():
            result = expected_result(entries, max_attempts, autonomy)
            if result is not None:
                out[result] += 1
        return out


def expected_result(entries: Sequence[LedgerEntry], max_attempts: int,
                    autonomy: str = "autonomous") -> str | None:
    """How one task must end, given its ledger entries, if every loop layer does its job.

    Autonomous: ``failed_validation`` (bad SQL on every allowed attempt), ``awaiting_approval``
    (destructive), ``compensated`` (wrong schema: verification failed, then restored),
    ``rolled_back`` (failed mid-way), ``succeeded``. At ``approve`` every well-formed migration
    awaits approval, at ``suggest`` it is suggested. None if unfinished.
    """
    last = entries[-1]
    if last.category is FaultCategory.SYNTAX:
        return "failed_validation" if last.attempt >= max_attempts else None
    if autonomy == "suggest":
        return "suggested"
    if autonomy == "approve" or last.category is FaultCategory.DESTRUCTIVE:
        return "awaiting_approval"
    if last.category is FaultCategory.WRONG_SCHEMA:
        return "compensated"
    if last.category is FaultCategory.MIDWAY:
        return "rolled_back"
    return "succeeded"


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationRates:
    """How often the simulated agent errs (probabilities per task, or per re-ask)."""

    syntax: float = 0.15
    fix_on_reask: float = 0.8
    destructive: float = 0.08
    wrong_schema: float = 0.12
    midway: float = 0.08

    def __post_init__(self) -> None:
        for name in ("syntax", "fix_on_reask", "destructive", "wrong_schema", "midway"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MigrationRates.{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationStep:
    """The migration step's input: the task and the table's columns as inspected first."""

    task: MigrationTask
    existing: tuple[str, ...] = ()


@dataclass(slots=True)
class _Episode:
    rng: random.Random
    fault: FaultKind | None
    syntax: bool


class MigrationModel:
    """A seeded stand-in for an LLM migration agent: ``model(step, attempt) -> str`` (SQL).

    Use it as a :class:`~closedloop.Loop` agent whose task input is a :class:`MigrationStep`.
    Its choices for task ``i`` depend only on ``(seed, i)`` and the feedback it gets; every
    proposal is appended to :attr:`ledger`, with plausible token usage recorded.
    """

    def __init__(self, seed: int, *, rates: MigrationRates | None = None,
                 ledger: MigrationLedger | None = None) -> None:
        self.seed = seed
        self.rates = rates or MigrationRates()
        self.ledger = ledger if ledger is not None else MigrationLedger()
        self._episodes: dict[str, _Episode] = {}

    def prompt(self, step: MigrationStep, feedback: str | None) -> str:
        """The prompt a real model would get."""
        parts = [SYSTEM_PROMPT, f"Task: {step.task.describe()}"]
        if step.existing:
            parts.append(f"Columns of {step.task.table} now: {', '.join(step.existing)}")
        if feedback:
            parts.append(feedback)
        return "\n\n".join(parts)

    def __call__(self, step: MigrationStep, attempt: Attempt) -> str:
        task = step.task
        episode = self._episodes.get(attempt.trace_id)
        if episode is None:
            episode = self._episodes[attempt.trace_id] = self._plan(task)
        if episode.syntax and attempt.feedback is not None:
            episode.syntax = episode.rng.random() >= self.rates.fix_on_reask
        kind: FaultKind | None
        if episode.syntax:
            text, kind = _misspell(task, episode.rng)
        else:
            self._episodes.pop(attempt.trace_id, None)  # a well-formed proposal ends it
            kind = episode.fault
            text = task.correct_sql() if kind is None else _fault(task, kind, episode.rng)
        self.ledger.entries.append(LedgerEntry(task=task.index, trace_id=attempt.trace_id,
                                               attempt=attempt.number, kind=kind))
        prompt = self.prompt(step, attempt.feedback)
        attempt.record_usage(input_tokens=max(1, len(prompt) // 4),
                             output_tokens=max(1, len(text) // 4))
        return text

    def _plan(self, task: MigrationTask) -> _Episode:
        rng = random.Random(f"closedloop-demo:migrations:{self.seed}:model:{task.index}")
        r, rates = rng.random(), self.rates
        fault: FaultKind | None = None
        if r < rates.destructive:
            fault = rng.choice(_DESTRUCTIVE)
        elif r < rates.destructive + rates.wrong_schema:
            fault = rng.choice((FaultKind.WRONG_COLUMN_TYPE, FaultKind.WRONG_COLUMN_NAME))
        elif r < rates.destructive + rates.wrong_schema + rates.midway:
            fault = FaultKind.FAILS_MIDWAY
        syntax = fault is None or fault.category is not FaultCategory.DESTRUCTIVE
        return _Episode(rng=rng, fault=fault, syntax=syntax and rng.random() < rates.syntax)


def _misspell(task: MigrationTask, rng: random.Random) -> tuple[str, FaultKind]:
    sql = task.correct_sql()
    if task.kind == "create_table" and rng.random() < 0.5:
        return sql.replace(");\n", ";\n", 1), FaultKind.UNCLOSED_PAREN
    if task.kind == "add_column":
        return sql.replace("ALTER TABLE", "ALTR TABLE", 1), FaultKind.MISSPELT_KEYWORD
    return sql.replace("CREATE TABLE", "CRATE TABLE", 1), FaultKind.MISSPELT_KEYWORD


def _fault(task: MigrationTask, kind: FaultKind, rng: random.Random) -> str:
    base = task.table if task.kind == "add_column" else _NEW_TABLES[
        task.table.rsplit("_", 1)[0]][0]
    if kind is FaultKind.DROP_TABLE:
        return f"DROP TABLE {base} CASCADE;\n{task.correct_sql()}"
    if kind is FaultKind.TRUNCATE_TABLE:
        return f"TRUNCATE {base} CASCADE;\n{task.correct_sql()}"
    if kind is FaultKind.DROP_COLUMN:
        column = rng.choice([c for c, _ in BASE_TABLES[base] if c != "id"])
        return f"ALTER TABLE {base} DROP COLUMN {column};\n{task.correct_sql()}"
    name, typ = task.columns[-1]
    if kind is FaultKind.WRONG_COLUMN_TYPE:
        wrong = rng.choice([t for t in SQL_TYPES if SQL_TYPES[t] != SQL_TYPES[typ]])
        return task.correct_sql().replace(f"{name} {typ}", f"{name} {wrong}", 1)
    if kind is FaultKind.WRONG_COLUMN_NAME:
        return task.correct_sql().replace(f"{name} {typ}", f"{name}s {typ}", 1)
    # FAILS_MIDWAY: the first statement applies, a later one fails in PostgreSQL
    if task.kind == "add_column":  # NOT NULL without a backfill: the table has rows
        return f"{task.correct_sql()}\nALTER TABLE {task.table} ALTER COLUMN {name} SET NOT NULL;"
    sql = task.correct_sql()
    first = task.columns[0][0]
    return sql.replace(f"({first});", f"({first}, {first}_typo);")
