"""Whole runs with ``million run``: the block rollup (S1) and the overhead case (S2).

    python benchmarks/runs.py                    # S1 and S2, three times each
    python benchmarks/runs.py --scenario s2 --repeat 5
    nox -s bench -- runs                         # (see noxfile.py)

S1: 10,000 partitions, fanout 100, every prepare/compute/collect waits 75 ms, 100
workers (2 processes x 50 bots); the ideal is 104 x 75 ms = 7.8 s. S2: the same
without the delay. Each run is a fresh ``million run`` with its embedded reflector,
so the time includes starting the worker processes. Medians are printed and all
runs written to benchmarks/results/runs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SCENARIOS: dict[str, list[str]] = {
    "s1": ["--option", "delay_ms=75"],
    "s2": [],
}
COMMON = [
    "--plugin",
    "demo",
    "--partitions",
    "10000",
    "--fanout",
    "100",
    "--workers",
    "2",
    "--bots",
    "50",
    "--json",
]


def run_once(extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "million", "run", *COMMON, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    report: dict[str, Any] = {}
    for name in names:
        runs = [run_once(SCENARIOS[name]) for _ in range(args.repeat)]
        assert all(run["answer"] == 10000 for run in runs), runs
        seconds = [run["elapsed_s"] for run in runs]
        report[name] = {"median_s": statistics.median(seconds), "runs_s": seconds}
        print(f"{name}: median {statistics.median(seconds):.2f} s over {len(seconds)} runs ({seconds})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runs.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
