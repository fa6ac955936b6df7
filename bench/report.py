"""The cost of ``closedloop report``'s failure-message groups over a window of events.

Run: ``python bench/report.py`` (options: ``--events``, ``--failed``, ``--rounds``).

``build_report`` is one pass over the events; grouping failure messages (every word holding a
digit replaced by ``<*>``) adds a regular expression per failed step. This times the pass over
the same synthetic events twice — once with each failed step's message, once with its message
removed — and reports both per event and the extra cost per failed step. The messages are shaped
like the demo's (instance ids, instance types, tag values, line numbers).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from closedloop import StepEvent
from closedloop.learn import build_report

TEMPLATES = (
    "instance_matches_request: [error] instance_type at instance.instance_type: "
    "i-{id} is a {a}.large, requested {b}.xlarge",
    "instance_matches_request: [error] tag_missing at instance.tags.env: i-{id} has no tag "
    "'env' (wanted 'staging')",
    "plan_schema: [error] json_invalid at plan: Invalid JSON: trailing comma at line 1 "
    "column {n}",
    "instance_matches_request: [error] tag_wrong at instance.tags.cost-center: i-{id} has tag "
    "cost-center='cc-{n}-x', wanted 'cc-{n}'",
)


def events(count: int, failed: float, *, messages: bool, seed: int = 7) -> list[StepEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        fails = rng.random() < failed
        message = None
        if fails and messages:
            message = rng.choice(TEMPLATES).format(
                id=f"{rng.getrandbits(68):017x}", a=rng.choice(("t3", "m5", "c5")),
                b=rng.choice(("t3", "m5", "c5")), n=rng.randrange(1000))
        out.append(StepEvent(
            float(i), f"{i:032x}", "agent", f"task{i % 5}", "autonomous",
            "failed" if fails else "succeeded", 1 + (i % 3 == 0), 420, 64, 12.5,
            True, not fails, "verification" if fails else None, message,
            1.0, 1.0, 1.0, 1.0, None))
    return out


def median_time(rounds: int, data: list[StepEvent]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        build_report(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--failed", type=float, default=0.3, help="share of failed steps")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with_messages = events(args.events, args.failed, messages=True)
    without = events(args.events, args.failed, messages=False)
    failed = sum(e.error_message is not None for e in with_messages)
    plain = median_time(args.rounds, without)
    grouped = median_time(args.rounds, with_messages)
    groups = len(build_report(with_messages, top_messages=10_000).overall.top_messages)
    print(f"{args.events:,} events, {failed:,} failed with a message, {groups} groups")
    print(f"report without messages: {plain * 1e6 / args.events:.2f} µs/event")
    print(f"report with messages:    {grouped * 1e6 / args.events:.2f} µs/event "
          f"(+{(grouped - plain) * 1e6 / failed:.2f} µs per failed step)")


if __name__ == "__main__":
    main()
