"""``closedloop autonomy``: the stored autonomy levels, their evidence, and the human's hand.

- ``status``: per task type (and action class) the level, the evidence since it was entered
  (counts, rates, Wilson 95 % lower bounds), what it would take to move up, recent history.
- ``set TASK LEVEL --by NAME --reason ...``: a person's decision, kept in the audit trail.
- ``feedback STEP_ID --agreed/--disagreed``: what a human actually did about a suggestion.
- ``recommend [--apply]``: the promotions the evidence earns; ``--apply`` makes them.

Stored text (task types, reasons, names) is printed as data, never as markup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from closedloop.cli import main
from closedloop.cli._common import (
    console,
    echo_json,
    iso,
    open_store_to_read,
    open_store_to_write,
    say,
    store_option,
    styled,
)

if TYPE_CHECKING:
    from closedloop.autonomy import Assessment, AutonomyLevels
    from closedloop.store import Store

_LEVELS = ("suggest", "approve", "autonomous")


def _levels(store: Store) -> AutonomyLevels:
    from closedloop.autonomy import AutonomyLevels

    return AutonomyLevels(store, sinks=[])


def _rate(p: dict[str, Any]) -> str:
    if not p["trials"]:
        return "—"
    return f"{p['rate']:.1%} ({p['successes']}/{p['trials']}; ≥{p['lower_bound']:.1%})"


@main.group()
def autonomy() -> None:
    """Stored autonomy levels per task type: status, set, feedback, recommend."""


@autonomy.command()
@store_option
@click.option("--task-type", help="Only this task type.")
@click.option("--history", "history_n", type=click.IntRange(0, 1000), default=5,
              show_default=True, help="How many recent level changes to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(store_url: str, task_type: str | None, history_n: int, as_json: bool) -> None:
    """Each task type's level, its evidence, what it takes to move up, and the history.

    \b
    Exit codes:
      0  shown (also when no level is stored: task types then run at the default)
      1  the store cannot be read
      2  usage error
    """
    store = open_store_to_read(store_url)
    try:
        levels = _levels(store)
        found = [levels.assess(key, record) for key, record in levels.keys(task_type)]
        history = levels.levels.history(task_type=task_type, limit=history_n)
    finally:
        store.close()
    if as_json:
        echo_json({"store": store.url, "keys": [a.to_dict() for a in found],
                   "history": [c.to_dict() for c in history]})
        return
    out = console()
    if not found:
        out.print(styled(f"No task type with steps or a stored level in {store.url}."))
    else:
        from rich.table import Table

        table = Table(title=styled(f"Autonomy levels ({store.url})"))
        for col in ("task type", "level", "evidence since", "agreement", "approval",
                    "verification", "next"):
            table.add_column(col)
        for a in found:
            ev = a.evidence.to_dict()
            level = a.level + (" (default)" if a.source == "default" else "")
            step = ("—" if a.target is None else
                    f"{a.target}: ready" if a.ready else f"{a.target}: not yet")
            table.add_row(styled(str(a.key)), styled(level), iso(a.evidence.since),
                          _rate(ev["agreement"]), _rate(ev["approval"]),
                          _rate(ev["verification"]), step)
        out.print(table)
        waiting = [a for a in found if a.target is not None and not a.ready]
        if waiting:
            out.print("To move up:")
            for a in waiting:
                out.print(styled(f"  {a.key} → {a.target}: {'; '.join(a.needs)}"))
    if history:
        out.print("History:")
        for c in history:
            out.print(styled(f"  {iso(c.at)}  {c.kind:8} {c.key}: {c.old or '(none)'} → "
                             f"{c.new}  by {c.by}: {c.reason}"))


@autonomy.command("set")
@click.argument("task_type")
@click.argument("level", type=click.Choice(_LEVELS))
@click.option("--by", "by", required=True, help="Who decides (kept in the audit trail).")
@click.option("--reason", required=True, help="Why (kept in the audit trail).")
@click.option("--class", "action_class", help="A class of actions inside the task type.")
@click.option("--agent", "agent_id", default="*", show_default=True,
              help="The agent it applies to (* for any).")
@click.option("--ceiling", type=click.Choice([*_LEVELS, "none"]),
              help="Never promote above this level (none: remove the ceiling).")
@store_option
def set_level(task_type: str, level: str, by: str, reason: str,  # noqa: PLR0917 - click passes every option
              action_class: str | None, agent_id: str, ceiling: str | None,
              store_url: str) -> None:
    """Store LEVEL for TASK_TYPE (suggest, approve or autonomous), with who and why.

    \b
    Exit codes:
      0  stored
      1  the store cannot be written
      2  usage error (unknown level, no --by or --reason, level above its ceiling)
    """
    from closedloop.store import open_store

    store = open_store(store_url)  # levels may be set before the first step is recorded
    try:
        levels = _levels(store)
        kwargs: dict[str, Any] = {}
        if ceiling is not None:
            kwargs["ceiling"] = None if ceiling == "none" else ceiling
        change = levels.set(task_type, level, by=by, reason=reason, agent_id=agent_id,
                            action_class=action_class, **kwargs)
    finally:
        store.close()
    say(f"{change.key}: {change.old or '(none)'} → {change.new} (by {change.by})")


@autonomy.command()
@click.argument("step_id")
@click.option("--agreed/--disagreed", required=True,
              help="Whether the human did what the suggestion said.")
@click.option("--by", "by", default=None, help="Who (default user@host).")
@click.option("--note", help="What they did instead, or why.")
@store_option
def feedback(step_id: str, agreed: bool, by: str | None, note: str | None,
             store_url: str) -> None:
    """Record what a human actually did about the suggestion of step STEP_ID.

    \b
    Exit codes:
      0  recorded (it counts towards the agreement rate of the step's task type)
      1  the store cannot be written
      2  usage error (not a step id)
    """
    store = open_store_to_write(store_url)
    try:
        fb = _levels(store).record_feedback(step_id, agreed, by=by, note=note)
    finally:
        store.close()
    say(f"recorded: step {fb.step_id} {'agreed' if fb.agreed else 'disagreed'} (by {fb.by})")


@autonomy.command()
@store_option
@click.option("--task-type", help="Only this task type.")
@click.option("--apply", "apply_", is_flag=True, help="Promote every key that is ready.")
@click.option("--by", "by", default=None, help="Who applies them (default user@host).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def recommend(store_url: str, task_type: str | None, apply_: bool, by: str | None,
              as_json: bool) -> None:
    """The promotions the evidence earns (with --apply: made, one level each).

    \b
    Exit codes:
      0  shown (or applied)
      1  the store cannot be read or written
      2  usage error
    """
    store = open_store_to_write(store_url) if apply_ else open_store_to_read(store_url)
    try:
        found: list[Assessment] = _levels(store).recommend(task_type, apply=apply_, by=by)
    finally:
        store.close()
    ready = [a for a in found if a.ready]
    if as_json:
        echo_json({"applied": apply_, "ready": [a.to_dict() for a in ready],
                   "not_ready": [a.to_dict() for a in found if not a.ready]})
        return
    if not ready:
        say("no promotion is earned yet (closedloop autonomy status says what it takes)")
        return
    for a in ready:
        ev = a.evidence.to_dict()
        what = ("applied" if apply_ else "recommended")
        say(f"{what}: {a.key} {a.level} → {a.target} (agreement {_rate(ev['agreement'])}, "
            f"approval {_rate(ev['approval'])}, verification {_rate(ev['verification'])})")
