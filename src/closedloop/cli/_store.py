"""``closedloop store import-deadletter``: write events the store once refused back into it."""

from __future__ import annotations

from pathlib import Path

import click

from closedloop.cli import main
from closedloop.cli._common import echo_json, say, store_option


@main.group()
def store() -> None:
    """The event store: maintenance commands."""


@store.command("import-deadletter")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def import_deadletter(file: Path, store_url: str, as_json: bool) -> None:
    """Write the events in dead-letter FILE into the store, each exactly once.

    Safe to run again, or on a file whose events partly reached the store: an event already
    stored (same timestamp and trace id) is skipped. Lines that are not a whole event (a
    write cut short by a full disk) are counted as malformed and skipped. Keys of --json:
    read, imported, already_stored, malformed.
    """
    from closedloop._errors import StoreError
    from closedloop.store import import_dead_letter, open_store

    if not file.is_file():  # before the store is opened (and perhaps created) for nothing
        raise StoreError(f"no dead-letter file at {file}")
    target = open_store(store_url)
    try:
        result = import_dead_letter(file, target)
    finally:
        target.close()
    if as_json:
        echo_json(result.to_dict())
        return
    say(f"imported {result.imported} events from {click.format_filename(file)} into "
        f"{target.url} ({result.already_stored} already stored, {result.malformed} "
        "malformed lines skipped)")
