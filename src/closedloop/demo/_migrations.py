"""The migrations scenario's driver: schema migrations on a real PostgreSQL, as runs.

Each task is a :class:`~closedloop.Run` of guarded steps: ``inspect_table`` (a tool reading
``information_schema``), the migration step (a :class:`~closedloop.Loop`: the agent's SQL
validated by :class:`~closedloop.validate.SqlSyntax` and :class:`StaysInSchema`, gated by the
``destructive_sql`` risk rule, applied in one transaction by :class:`ApplyMigration`,
verified by :class:`SchemaMatches`, compensated by restoring the schema it found), then
``record_migration`` (a tool inserting into ``schema_migrations``, verified by reading it
back). Everything happens in a schema of its own (``cl_demo_mig_<random>``), dropped at the
end unless ``keep``: no other schema is read or written.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql as pgsql

from closedloop._errors import ConfigError
from closedloop._events import ErrorType, Outcome
from closedloop._verdict import Issue, Severity, Verdict
from closedloop.demo._migmodel import (
    BASE_DDL,
    BASE_ROWS,
    BASE_TABLES,
    MigrationLedger,
    MigrationModel,
    MigrationRates,
    MigrationStep,
    MigrationTask,
    generate_tasks,
)
from closedloop.loop import ApprovalPolicy, Loop
from closedloop.store import Store, open_store

TASK_TYPE = "pg.migrate"
AGENT_ID = "migration-agent"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA_PREFIX = "cl_demo_mig_"
AUTONOMY = ("autonomous", "approve", "suggest")

Progress = Callable[[int, int, str], object]
Schema = dict[tuple[str, str], str]
"""``(table, column) -> data_type`` of one schema, from information_schema.columns."""


class MigrationFailed(Exception):
    """The migration failed in PostgreSQL; its transaction was rolled back."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_schema(conn: psycopg.Connection[Any], schema: str) -> Schema:
    """Every column of every table of ``schema``, from ``information_schema.columns``."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s", (schema,)).fetchall()
    return {(str(t), str(c)): str(d) for t, c, d in rows}


def _diff(now: Schema, before: Schema) -> list[str]:
    out = [f"{t}.{c} was added" for t, c in sorted(now.keys() - before.keys())]
    out += [f"{t}.{c} is missing" for t, c in sorted(before.keys() - now.keys())]
    out += [f"{t}.{c} is {now[k]}, was {before[k]}" for k in sorted(now.keys() & before.keys())
            if now[k] != before[k] for t, c in (k,)]
    return out


_CREATE_KINDS = frozenset({"TABLE", "INDEX", "VIEW", "SEQUENCE"})


class StaysInSchema:
    """Validator: the SQL is a migration of the demo's schema, and nothing else.

    Critical (blocked, not re-asked): a table named in another schema (or database), and a
    statement that could leave the migration's transaction or its schema — transaction
    control, ``SET``, ``CREATE`` of anything but a table, index, view or sequence (a schema,
    a function), ``GRANT``. A statement the parser reads only as an opaque command (``DO``)
    is an error the agent gets back. Only ``CREATE``, ``ALTER``, ``DROP``, ``TRUNCATE``,
    ``INSERT``, ``UPDATE``, ``DELETE`` pass (the risk rule then judges what destroys data).
    """

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.name = "stays_in_schema"

    def __call__(self, proposal: object) -> Verdict:
        import sqlglot
        from sqlglot import exp
        from sqlglot.errors import SqlglotError

        if not isinstance(proposal, str):
            return Verdict.fail(Issue(message="a migration is SQL text", code="not_sql"),
                                check=self.name)
        try:
            statements = [s for s in sqlglot.parse(proposal, read="postgres") if s is not None]
        except (SqlglotError, RecursionError):
            return Verdict(check=self.name)  # SqlSyntax reports what does not parse
        allowed = (exp.Create, exp.Alter, exp.Drop, exp.TruncateTable, exp.Insert, exp.Update,
                   exp.Delete)
        issues = []
        for n, statement in enumerate(statements, 1):
            where = f"statement {n}"
            if isinstance(statement, exp.Command):
                issues.append(Issue(message=f"{where} is not SQL the parser can read as a "
                                            "migration", code="not_ddl", location=where))
                continue
            kind = str(statement.args.get("kind") or "").upper()
            if not isinstance(statement, allowed) or (
                    isinstance(statement, exp.Create) and kind not in _CREATE_KINDS):
                what = f"{type(statement).__name__.upper()} {kind}".strip()
                issues.append(Issue(message=f"{where} ({what}) is not allowed in a migration",
                                    code="not_allowed", location=where,
                                    severity=Severity.CRITICAL))
            for table in statement.find_all(exp.Table):
                if table.catalog or (table.db and table.db != self.schema):
                    named = ".".join(p for p in (table.catalog, table.db) if p)
                    issues.append(Issue(
                        message=f"{where} names {named!r}: this agent works in its own schema",
                        code="other_schema", location=where, severity=Severity.CRITICAL))
        return Verdict(issues=tuple(issues), check=self.name)


@dataclass(frozen=True, slots=True)
class Applied:
    """What :class:`ApplyMigration` did: the schema's changes, as ``_diff`` lines."""

    changes: tuple[str, ...]


class ApplyMigration:
    """Executor: the SQL in one transaction, in the demo's schema only (``search_path``).

    A PostgreSQL error rolls the whole migration back and raises :class:`MigrationFailed`.
    After a commit it registers the step's compensation with the open run: restore the schema
    found before (drop what was added), checked by reading ``information_schema`` again.
    """

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.before: Schema | None = None
        """The schema as the last migration found it (before it ran)."""

    def __call__(self, sql: str) -> Applied:
        from closedloop.runs import current_run

        self.before = before = read_schema(self.conn, self.schema)
        try:
            with self.conn.transaction():
                self._scope()
                self.conn.execute(sql.encode())  # bytes: the SQL is never a format string
        except psycopg.Error as exc:
            raise MigrationFailed(f"the migration failed in PostgreSQL and was rolled back: "
                                  f"{type(exc).__name__}: {_one_line(exc)}") from None
        run = current_run()
        if run is not None:
            run.on_rollback(self.restore, before, check=self.restored, label="restore schema")
        return Applied(tuple(_diff(read_schema(self.conn, self.schema), before)))

    def changes_since_found(self) -> list[str]:
        """How the schema differs now from what the last migration found."""
        if self.before is None:
            raise RuntimeError("no migration ran")
        return _diff(read_schema(self.conn, self.schema), self.before)

    def _scope(self) -> None:
        self.conn.execute(pgsql.SQL("SET LOCAL search_path TO {}").format(
            pgsql.Identifier(self.schema)))

    def restore(self, before: Schema) -> None:
        """Drop the tables and columns added since ``before``, in one transaction."""
        now = read_schema(self.conn, self.schema)
        new_tables = {t for t, _ in now} - {t for t, _ in before}
        with self.conn.transaction():
            self._scope()
            for table in sorted(new_tables):
                self.conn.execute(pgsql.SQL("DROP TABLE {}").format(pgsql.Identifier(table)))
            for table, column in sorted(now.keys() - before.keys()):
                if table not in new_tables:
                    self.conn.execute(pgsql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
                        pgsql.Identifier(table), pgsql.Identifier(column)))

    def restored(self, before: Schema) -> Verdict:
        """The schema is again what it was before the migration."""
        diff = _diff(read_schema(self.conn, self.schema), before)
        return Verdict(issues=tuple(Issue(message=d, code="schema_not_restored") for d in diff),
                       check="schema_restored")


class SchemaMatches:
    """Verifier: every column the task asked for exists, with its type (information_schema)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.name = "information_schema"

    def __call__(self, step: MigrationStep, result: Applied) -> Verdict:
        try:
            now = read_schema(self.conn, self.schema)
        except psycopg.OperationalError as exc:
            return Verdict.cannot_tell(f"cannot read information_schema: {exc}", check=self.name)
        issues = []
        for (table, column), want in sorted(step.task.expected_columns().items()):
            got = now.get((table, column))
            if got is None:
                issues.append(Issue(message=f"column {table}.{column} does not exist",
                                    code="missing_column", location=f"{table}.{column}"))
            elif got != want:
                issues.append(Issue(message=f"column {table}.{column} is {got}, expected {want}",
                                    code="wrong_type", location=f"{table}.{column}"))
        return Verdict(issues=tuple(issues), check=self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
    """A destructive migration waiting, as a durable approval request, for a person."""

    task: int
    approval_id: str
    risk: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationSummary:
    """What one migrations run did, next to the simulated agent's ground truth."""

    tasks: int
    seed: int
    autonomy: str
    schema: str
    kept: bool
    succeeded: int
    reasked_fixed: int
    failed_validation: int
    blocked: int
    awaiting_approval: list[Pending]
    suggested: int
    compensated: int
    """Verification failed and the compensation restored the schema (checked)."""
    compensation_failed: int
    rolled_back: int
    """Failed in PostgreSQL; the schema read back unchanged."""
    rollback_leaked: int
    """Failed in PostgreSQL, yet the schema changed: must stay 0."""
    errors: int
    first_error: str | None
    migrations_recorded: int
    base_intact: bool
    """The base tables still have every column and row they started with."""
    input_tokens: int
    output_tokens: int
    store_url: str
    events_written: int
    events_lost: int
    runs: int
    duration_s: float
    max_attempts: int
    outcomes: dict[int, str] = field(default_factory=dict)
    """Each task's ending, as :func:`~closedloop.demo._migmodel.expected_result` names them."""
    ledger: MigrationLedger = field(repr=False, default_factory=MigrationLedger)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "scenario": "migrations", "tasks": self.tasks, "seed": self.seed,
            "autonomy": self.autonomy, "schema": self.schema, "kept": self.kept,
            "succeeded": self.succeeded, "reasked_fixed": self.reasked_fixed,
            "failed_validation": self.failed_validation, "blocked": self.blocked,
            "awaiting_approval": [{"task": p.task, "approval_id": p.approval_id,
                                   "risk": p.risk} for p in self.awaiting_approval],
            "suggested": self.suggested, "compensated": self.compensated,
            "compensation_failed": self.compensation_failed,
            "rolled_back": self.rolled_back, "rollback_leaked": self.rollback_leaked,
            "errors": self.errors, "first_error": self.first_error,
            "migrations_recorded": self.migrations_recorded, "base_intact": self.base_intact,
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "injected": self.ledger.counts(),
            "expected": self.ledger.expected_outcomes(self.max_attempts, self.autonomy),
            "store": {"url": self.store_url, "events_written": self.events_written,
                      "events_lost": self.events_lost, "runs": self.runs},
            "duration_s": round(self.duration_s, 3),
        }


def run_migrations_demo(
    tasks: int = 40,
    seed: int = 7,
    store: Store | str | None = None,
    progress: Progress | None = None,
    *,
    pg_url: str = DEFAULT_PG_URL,
    rates: MigrationRates | None = None,
    max_attempts: int = 3,
    autonomy: str = "autonomous",
    keep: bool = False,
) -> MigrationSummary:
    """Run ``tasks`` seeded migration tasks against the PostgreSQL at ``pg_url``.

    Creates a schema of its own (``cl_demo_mig_<random>``) with two small tables, runs every
    task as a :class:`~closedloop.Run` of guarded steps recorded in ``store`` (a Store, left
    open; a URL, opened and closed; None, the process default), and drops the schema at the
    end unless ``keep``. Bad arguments, or a database it cannot reach, raise
    :class:`~closedloop.ConfigError`.
    """
    if isinstance(tasks, bool) or not isinstance(tasks, int) or not 1 <= tasks <= 10_000:
        raise ConfigError(f"the number of tasks must be an integer in [1, 10000], got {tasks!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the seed must be an integer, got {seed!r}")
    if autonomy not in AUTONOMY:
        raise ConfigError(f"autonomy must be one of {', '.join(AUTONOMY)}, got {autonomy!r}")
    try:
        conn = psycopg.connect(pg_url, autocommit=True, connect_timeout=10)
    except (psycopg.Error, ValueError) as exc:
        from closedloop._redact import redact_text, shown_url

        raise ConfigError(f"cannot connect to PostgreSQL at {shown_url(pg_url)}: "
                          f"{type(exc).__name__}: {redact_text(_one_line(exc))}") from None
    schema = SCHEMA_PREFIX + secrets.token_hex(4)
    owned = isinstance(store, str)
    try:
        if isinstance(store, str):
            target = open_store(store)
        elif store is None:
            from closedloop.store import default_store

            target = default_store()
        else:
            target = store
    except BaseException:
        conn.close()
        raise
    started = time.perf_counter()
    before_stats = target.stats()
    created = False
    try:
        try:
            with conn.transaction():
                conn.execute(pgsql.SQL("CREATE SCHEMA {}").format(pgsql.Identifier(schema)))
                created = True
                conn.execute(pgsql.SQL("SET LOCAL search_path TO {}").format(
                    pgsql.Identifier(schema)))
                conn.execute(BASE_DDL.encode())
            summary = _drive(conn, schema, target, progress, tasks=tasks, seed=seed,
                             rates=rates, max_attempts=max_attempts, autonomy=autonomy)
        except psycopg.Error as exc:  # the demo's own statements: setup, reads, the record
            from closedloop._redact import redact_text

            raise ConfigError(f"PostgreSQL refused the demo (schema {schema}): "
                              f"{type(exc).__name__}: {redact_text(_one_line(exc))}") from None
    finally:
        try:
            if created and not keep and not conn.closed:
                conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    pgsql.Identifier(schema)))
        finally:
            conn.close()
            target.flush()
            final = target.close() if owned else target.stats()
    return _replace(summary, kept=keep, store_url=target.url,
                    events_written=final.written - before_stats.written,
                    events_lost=final.not_written - before_stats.not_written,
                    duration_s=time.perf_counter() - started)


def _replace(s: MigrationSummary, **changes: Any) -> MigrationSummary:
    import dataclasses

    return dataclasses.replace(s, **changes)


def _drive(conn: psycopg.Connection[Any], schema: str, target: Store,
           progress: Progress | None, *, tasks: int, seed: int,
           rates: MigrationRates | None, max_attempts: int, autonomy: str) -> MigrationSummary:
    import closedloop as cl
    from closedloop.approvals import destructive_sql
    from closedloop.validate import SqlSyntax

    model = MigrationModel(seed, rates=rates)
    applier = ApplyMigration(conn, schema)
    loop = Loop(
        model, task_type=TASK_TYPE, agent_id=AGENT_ID,
        validators=[SqlSyntax("postgres", forbid_destructive=False, name="sql_syntax"),
                    StaysInSchema(schema)],
        risk_rules=[destructive_sql()],
        executor=applier, verifiers=[SchemaMatches(conn, schema)],
        autonomy=autonomy, max_attempts=max_attempts, store=target,
        approval=ApprovalPolicy(expires_in=3600.0),
    )

    def inspect_table(table: str) -> list[str]:
        """The columns of a table, from information_schema."""
        return sorted(c for t, c in read_schema(conn, schema) if t == table)

    def migration_recorded(call: dict[str, Any], result: int) -> str | None:
        with conn.transaction():
            row = conn.execute(pgsql.SQL("SELECT description FROM {}.schema_migrations "
                                         "WHERE version = %s").format(pgsql.Identifier(schema)),
                               (call["version"],)).fetchone()
        return None if row and row[0] == call["description"] else "the row is not there"

    def record_migration(version: int, description: str) -> int:
        """Record an applied migration in schema_migrations."""
        with conn.transaction():
            conn.execute(pgsql.SQL("INSERT INTO {}.schema_migrations (version, description) "
                                   "VALUES (%s, %s)").format(pgsql.Identifier(schema)),
                         (version, description))
        return version

    inspect = cl.tool(store=target, task_type="pg.inspect")(inspect_table)
    record = cl.tool(verifiers=[migration_recorded], store=target,
                     task_type="pg.record")(record_migration)

    counts = dict.fromkeys(("succeeded", "reasked_fixed", "failed_validation", "blocked",
                            "suggested", "compensated", "compensation_failed", "rolled_back",
                            "rollback_leaked", "recorded"), 0)
    pending: list[Pending] = []
    raised: list[str] = []
    outcomes: dict[int, str] = {}
    tokens = [0, 0]
    runs = 0
    for done, task in enumerate(generate_tasks(tasks, seed), 1):
        ending = _one(task, loop=loop, inspect=inspect, record=record, applier=applier,
                      target=target, counts=counts, pending=pending, raised=raised,
                      tokens=tokens)
        runs += 1
        outcomes[task.index] = ending
        if progress is not None:
            progress(done, tasks, ending)
    return MigrationSummary(
        tasks=tasks, seed=seed, autonomy=autonomy, schema=schema, kept=False,
        succeeded=counts["succeeded"], reasked_fixed=counts["reasked_fixed"],
        failed_validation=counts["failed_validation"], blocked=counts["blocked"],
        awaiting_approval=pending, suggested=counts["suggested"],
        compensated=counts["compensated"], compensation_failed=counts["compensation_failed"],
        rolled_back=counts["rolled_back"], rollback_leaked=counts["rollback_leaked"],
        errors=len(raised), first_error=raised[0] if raised else None,
        migrations_recorded=counts["recorded"], base_intact=_base_intact(conn, schema),
        input_tokens=tokens[0], output_tokens=tokens[1], store_url=target.url,
        events_written=0, events_lost=0, runs=runs, duration_s=0.0,
        max_attempts=max_attempts, outcomes=outcomes, ledger=model.ledger)


def _one(task: MigrationTask, *, loop: Loop, inspect: Any, record: Any,
         applier: ApplyMigration, target: Store, counts: dict[str, int],
         pending: list[Pending], raised: list[str], tokens: list[int]) -> str:
    """One task as one run: inspect, migrate, record. Returns how it ended."""
    import closedloop as cl

    with cl.Run(f"migration {task.version}", store=target, max_steps=8,
                labels={"task": str(task.index)}) as run:
        existing = inspect(table=task.table)
        columns = tuple(existing) if isinstance(existing, list) else ()
        applier.before = None
        try:
            result = loop.run(MigrationStep(task=task, existing=columns))
        except MigrationFailed:  # recorded by the loop (executor error): check the rollback
            leaked = applier.changes_since_found()
            counts["rollback_leaked" if leaked else "rolled_back"] += 1
            return "rollback_leaked" if leaked else "rolled_back"
        except Exception as exc:  # noqa: BLE001 - recorded by the loop; the demo goes on
            raised.append(f"{type(exc).__name__}: {exc}")
            return "error"
        if result.event is not None:
            tokens[0] += result.event.input_tokens
            tokens[1] += result.event.output_tokens
        if result.attempts > 1 and result.outcome is not Outcome.FAILED:
            counts["reasked_fixed"] += 1
        outcome, error = result.outcome, result.error_type
        if outcome is Outcome.SUCCEEDED:
            done = record(version=task.version, description=task.describe())
            counts["recorded"] += isinstance(done, int) and not isinstance(done, cl.ToolFeedback)
            counts["succeeded"] += 1
            return "succeeded"
        if outcome is Outcome.AWAITING_APPROVAL:
            risk = ""
            if result.approval_id is not None:
                from closedloop import approvals

                request = approvals.get_request(result.approval_id, store=target)
                risk = str((request.risk or {}).get("summary", "")) if request else ""
                pending.append(Pending(task=task.index, approval_id=result.approval_id,
                                       risk=risk))
            return "awaiting_approval"
        if outcome is Outcome.SUGGESTED:
            counts["suggested"] += 1
            return "suggested"
        if error is ErrorType.VALIDATION:
            counts["failed_validation"] += 1
            return "failed_validation"
        if outcome is Outcome.BLOCKED:
            counts["blocked"] += 1
            return "blocked"
        if error in (ErrorType.VERIFICATION, ErrorType.VERIFICATION_UNKNOWN):
            restored = not applier.changes_since_found()
            ok = restored and run.compensated == 1
            counts["compensated" if ok else "compensation_failed"] += 1
            return "compensated" if ok else "compensation_failed"
        raised.append(result.error_message or outcome.value)
        return "error"


def _base_intact(conn: psycopg.Connection[Any], schema: str) -> bool:
    now = read_schema(conn, schema)
    for table, columns in BASE_TABLES.items():
        if any(now.get((table, c)) != t for c, t in columns):
            return False
        with conn.transaction():
            row = conn.execute(pgsql.SQL("SELECT count(*) FROM {}.{}").format(
                pgsql.Identifier(schema), pgsql.Identifier(table))).fetchone()
        if row is None or row[0] != BASE_ROWS[table]:
            return False
    return True
