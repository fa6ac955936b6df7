"""Writing a dead-letter file back into a store, idempotently.

A dead-letter file holds one event per line, as JSON (what the writer could not store). An
event's identity is its ``(ts, trace_id, step_id)``: every step has its own step id (steps
nested in one trace share the trace id), and before schema v3 its own random 128-bit trace
id, so importing the same file twice, or a file whose events partly reached the store
already, writes each event once. A line that is not a whole event (a write
cut short by the full disk) is counted as malformed and skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop._errors import StoreError
from closedloop._events import EVENT_FIELDS, V2_FIELDS, StepEvent
from closedloop._redact import redact_event
from closedloop.store._base import EventQuery

if TYPE_CHECKING:
    from closedloop.store import Store

_CHUNK = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """What an import did with each line of the file."""

    read: int
    imported: int
    already_stored: int
    malformed: int

    def to_dict(self) -> dict[str, int]:
        """A JSON-ready dict."""
        return {"read": self.read, "imported": self.imported,
                "already_stored": self.already_stored, "malformed": self.malformed}


def _event(line: str) -> StepEvent | None:
    try:
        data: Any = json.loads(line)
        if not isinstance(data, dict) or set(V2_FIELDS) - data.keys():
            return None  # a file written before schema v3 lacks the later fields: None
        event = StepEvent(**{f: data[f] for f in EVENT_FIELDS if f in data})
    except (ValueError, TypeError):
        return None
    if not isinstance(event.ts, (int, float)) or isinstance(event.ts, bool) \
            or not math.isfinite(event.ts) or not isinstance(event.trace_id, str):
        return None
    return event._replace(ts=float(event.ts))


def _read(path: Path) -> Iterator[StepEvent | None]:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    yield _event(line)
    except OSError as exc:
        raise StoreError(f"cannot read dead-letter file {path}: {exc.strerror or exc}") from None


def import_dead_letter(path: str | os.PathLike[str], store: Store) -> ImportResult:
    """Write the events of dead-letter file ``path`` into ``store``, each at most once."""
    source = Path(path)
    if not source.is_file():
        raise StoreError(f"no dead-letter file at {source}")
    events: dict[tuple[float, str, str | None], StepEvent] = {}
    read = malformed = 0
    for event in _read(source):
        read += 1
        if event is None:
            malformed += 1
        else:
            events.setdefault((event.ts, event.trace_id, event.step_id), event)
    stored: set[tuple[float, str, str | None]] = set()
    if events:
        lo = min(key[0] for key in events)
        hi = math.nextafter(max(key[0] for key in events), math.inf)
        stored = {(e.ts, e.trace_id, e.step_id)
                  for e in store.backend.iter_events(EventQuery(since=lo, until=hi))}
    # redacted as the writer would have: the file may predate redaction or be hand-made
    new = [redact_event(e) for key, e in events.items() if key not in stored]
    for start in range(0, len(new), _CHUNK):
        try:
            store.backend.write_batch(new[start:start + _CHUNK])
        except Exception as exc:  # noqa: BLE001 - reported as one line; the file is kept
            raise StoreError(f"cannot write to store {store.url}: {exc}; {start} of "
                             f"{len(new)} events imported, run the import again") from None
    return ImportResult(read=read, imported=len(new), already_stored=read - malformed - len(new),
                        malformed=malformed)
