"""Whole runs with ``million run``: the block rollup (S1) and the overhead case (S2).

    python benchmarks/runs.py                    # S1 and S2, three times each, both ways
    python benchmarks/runs.py --scenario s1 --way ready --repeat 5
    nox -s bench -- runs                         # (see noxfile.py)

S1: 10,000 partitions, fanout 100, every prepare/compute/collect waits 75 ms, 100
workers (2 processes x 50 bots); the ideal is 104 x 75 ms = 7.8 s. S2: the same
without the delay. Two ways: ``embedded``, a fresh ``million run`` with its embedded
reflector, whose time includes starting the worker processes; ``ready``, a standalone
reflector whose 2 x 50 lobby bots are already at work (untimed runs first, until each
process has computed in one), timed from posting the run to its answer, as peers are timed
with their pool of workers already up. Medians are printed and all runs written to
benchmarks/results/runs.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import scale  # benchmarks/ is on sys.path: it is this script's directory

RESULTS = Path(__file__).parent / "results"
MILLION = [sys.executable, "-m", "million"]
SCENARIOS: dict[str, list[str]] = {
    "s1": ["--option", "delay_ms=75"],
    "s2": [],
}
WAYS = ("embedded", "ready")
RUN = ["--plugin", "demo", "--partitions", "10000", "--fanout", "100", "--json"]
EMBEDDED = ["--processes", "2", "--bots", "50"]


def run_once(extra: list[str]) -> dict[str, Any]:
    """One run with its embedded reflector, starting its 2 x 50 workers."""
    return _run([*RUN, *EMBEDDED, *extra])


def _run(arguments: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [*MILLION, "run", *arguments], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(result.stdout)


@contextmanager
def ready_workers() -> Iterator[str]:
    """A standalone reflector and 2 x 50 lobby bots, at work once this yields its URL."""
    with tempfile.TemporaryDirectory() as tmp:
        reflector, url = scale.start_reflector(Path(tmp) / "runs.db")
        workers = [scale.start_workers(url) for _ in range(2)]
        try:
            scale.warm_up(url)
            yield url
        finally:
            for process in [*workers, reflector]:
                process.send_signal(signal.SIGINT)
            for process in [*workers, reflector]:
                process.wait(30)


def run_ready(url: str, extra: list[str]) -> dict[str, Any]:
    """One run posted to the lobby of ``ready_workers``, timed from its post to its answer."""
    return _run([*RUN, "--reflector", url, "--no-work", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--way", choices=[*WAYS, "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    report: dict[str, Any] = {}
    for way in WAYS if args.way == "both" else [args.way]:
        for name in names:
            if way == "ready":
                with ready_workers() as url:
                    runs = [run_ready(url, SCENARIOS[name]) for _ in range(args.repeat)]
            else:
                runs = [run_once(SCENARIOS[name]) for _ in range(args.repeat)]
            assert all(run["answer"] == 10000 for run in runs), runs
            seconds = [run["elapsed_s"] for run in runs]
            median = statistics.median(seconds)
            report[f"{name}-{way}"] = {"median_s": median, "runs_s": seconds}
            print(f"{name} {way}: median {median:.2f} s over {len(seconds)} runs ({seconds})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runs.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
