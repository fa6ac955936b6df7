"""The screenshot of ``closedloop report --html`` in the docs (docs/report.png).

``python bench/report_page.py [--requests N] [--seed S] [--days D] [--out docs/report.png]``
runs ``closedloop demo`` (N requests, seed S) into a temporary store, then copies its steps
into a second store with their timestamps spread evenly over the last D days (the demo runs
in seconds, and a trend needs periods: everything else about each step is the demo's), writes
the page with ``closedloop report --html`` and takes a screenshot of it with Debian's Chromium,
headless (``apt-get install chromium``), 1280 pixels wide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import closedloop as cl

ROOT = Path(__file__).resolve().parents[1]


def closedloop(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "closedloop", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--height", type=int, default=2600)
    parser.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    parser.add_argument("--keep", help="also copy the page to this file")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        demo, spread = Path(tmp) / "demo.db", Path(tmp) / "spread.db"
        closedloop("demo", "--requests", str(args.requests), "--seed", str(args.seed),
                   "--store", f"sqlite:///{demo}")
        with cl.open_store(f"sqlite:///{demo}", read_only=True, create=False) as source:
            events = sorted(source.events(), key=lambda e: e.ts)
        end = (time.time() // 3600) * 3600
        step = args.days * 86_400 / len(events)
        with cl.open_store(f"sqlite:///{spread}") as target:
            for i, event in enumerate(events):
                target.record(event._replace(ts=end - args.days * 86_400 + i * step))
            assert target.flush()
        page = Path(tmp) / "report.html"
        closedloop("report", "--html", str(page), "--store", f"sqlite:///{spread}")
        if args.keep:
            shutil.copyfile(page, args.keep)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--screenshot={args.out}",
                        f"--window-size=1280,{args.height}", page.as_uri()],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:,.0f} KiB)")


if __name__ == "__main__":
    main()
