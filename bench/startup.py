"""Start-up benchmark: whole processes, as a user's shell runs them.

Each command is a fresh interpreter: ``python -c pass`` (the floor any Python tool pays),
``python -c "import closedloop"``, ``python -c "from closedloop import Loop"`` (the loop
itself, with its store), ``closedloop --version`` and ``closedloop --help`` through the
installed console script. Runs are interleaved (one of each command per round) so that a
change of machine load hits every command alike; the report gives, per command, the median
wall time, the median CPU time (user + system, which load on other cores barely changes) and
both minus the ``python -c pass`` floor. ``--json`` prints the same for scripts.

    python bench/startup.py                # 40 rounds
    python bench/startup.py --rounds 100 --json
    PYTHONPATH=src python bench/startup.py --baseline-src ../main/src   # before/after

Run it against the tree you want to measure (``PYTHONPATH=src`` for a checkout).
``--baseline-src DIR`` also runs every closedloop command with ``PYTHONPATH=DIR`` (another
checkout's ``src``), in the same rounds, so a before/after comparison sees the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS_MS = {"import closedloop": 40.0, "closedloop --version": 100.0,
              "closedloop --help": 100.0}
"""Issue 9's targets, whole process (wall time on an idle machine)."""


def _script() -> list[str]:
    # the console script installed next to this interpreter, not a shim that re-resolves it
    here = Path(sys.executable).parent / "closedloop"
    found = str(here) if here.exists() else shutil.which("closedloop")
    if found is None:
        raise SystemExit("the closedloop console script is not installed: pip install -e .")
    return [found]


Command = tuple[list[str], dict[str, str]]


def commands(baseline_src: str | None = None) -> dict[str, Command]:
    """Name → (argv, environment) of every measured command."""
    py = [sys.executable]
    argvs = {
        "import closedloop": [*py, "-c", "import closedloop"],
        "from closedloop import Loop": [*py, "-c", "from closedloop import Loop"],
        "closedloop --version": [*_script(), "--version"],
        "closedloop --help": [*_script(), "--help"],
    }
    env = os.environ.copy()
    out: dict[str, Command] = {"python -c pass": ([*py, "-c", "pass"], env)}
    for name, argv in argvs.items():
        if baseline_src is not None:
            out[f"{name} (baseline)"] = (argv, {**env, "PYTHONPATH": baseline_src})
        out[name] = (argv, env)
    return out


def _run_once(command: Command) -> tuple[float, float]:
    """(wall ms, CPU ms) of one run of ``command``; fails loudly if the command fails."""
    argv, env = command
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall * 1000, cpu * 1000


def measure(rounds: int, warmup: int = 3, baseline_src: str | None = None
            ) -> dict[str, dict[str, float]]:
    """Per command: median wall and CPU ms over ``rounds`` interleaved runs, and minus the floor."""
    cmds = commands(baseline_src)
    for _ in range(warmup):
        for command in cmds.values():
            _run_once(command)
    wall: dict[str, list[float]] = {name: [] for name in cmds}
    cpu: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(rounds):
        for name, command in cmds.items():
            w, c = _run_once(command)
            wall[name].append(w)
            cpu[name].append(c)
    floor_wall = statistics.median(wall["python -c pass"])
    floor_cpu = statistics.median(cpu["python -c pass"])
    out: dict[str, dict[str, float]] = {}
    for name in cmds:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        out[name] = {"wall_ms": round(w, 1), "cpu_ms": round(c, 1),
                     "wall_over_floor_ms": round(w - floor_wall, 1),
                     "cpu_over_floor_ms": round(c - floor_cpu, 1),
                     "x_floor": round(w / floor_wall, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also run the closedloop commands with PYTHONPATH=DIR")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = measure(args.rounds, baseline_src=args.baseline_src)
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "rounds": args.rounds,
                          "load_average_1min": load, "targets_ms": TARGETS_MS,
                          "commands": result}, indent=2))
        return
    print(f"python {sys.version.split()[0]}, median of {args.rounds} interleaved runs, "
          f"1-min load average {load[0]} → {load[1]}")
    print(f"{'command':<40} {'wall ms':>8} {'cpu ms':>8} {'wall-floor':>11} {'cpu-floor':>10}"
          f" {'x floor':>8}")
    for name, r in result.items():
        print(f"{name:<40} {r['wall_ms']:>8.1f} {r['cpu_ms']:>8.1f} "
              f"{r['wall_over_floor_ms']:>11.1f} {r['cpu_over_floor_ms']:>10.1f} "
              f"{r['x_floor']:>8.2f}")


if __name__ == "__main__":
    main()
