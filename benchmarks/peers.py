"""The benchmark scenarios on million and on its peers, side by side on this machine.

    python benchmarks/peers.py                      # S1, S2 and S3, million and Dask, three times each
    python benchmarks/peers.py --scenario s1 --repeat 1 --system dask --system threads
    nox -s bench -- peers                           # (see noxfile.py)

The scenarios are those of docs/benchmarks.md: S1, 10,000 partitions,
fanout 100, every prepare/compute/collect waits 75 ms, 100 workers (ideal 104 x 75 ms =
7.8 s); S2, the same without the delay; S3, 1,000,000 partitions (3 levels), no delay.
The computation is the demo plugin's: prepare repeats the input, compute returns it,
collect sums, each step first waiting ``delay_ms``; the answer is N.

million: S1 and S2 as runs.py's ``ready`` way (2 x 50 lobby bots already at work on a
standalone reflector, timed from posting the run to its answer), S3 as in
scale.py (a standalone reflector with its store, 2 x 50 lobby bots); its ``elapsed_s``.
dask: Dask's fastest formulation, a bag with one task per leaf session of 100 partitions
(its prepare, its computes in sequence, its collect), the interior collects as the bag's
tree reduction, on the threads scheduler with 100 threads, one process, no network.
threads (S1 only): a plain ThreadPoolExecutor(100), the no-network floor.
Each run is printed, then medians and ranges; all runs go to benchmarks/results/peers.json.
Needs ``pip install -e '.[peers]'`` for Dask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import runs  # benchmarks/ is on sys.path: it is this script's directory
import scale

WORKERS = 100
FANOUT = 100
SCENARIOS: dict[str, tuple[int, int]] = {  # name: (partitions, delay_ms)
    "s1": (10_000, 75),
    "s2": (10_000, 0),
    "s3": (1_000_000, 0),
}


def _wait(delay_ms: int) -> None:
    if delay_ms:
        time.sleep(delay_ms / 1000)


def prepare(input: Any, count: int, delay_ms: int) -> list[Any]:
    _wait(delay_ms)
    return [input] * count


def compute(input: Any, index: int, delay_ms: int) -> Any:
    _wait(delay_ms)
    return input


def collect(outputs: Iterable[Any], delay_ms: int) -> Any:
    _wait(delay_ms)
    return sum(outputs)


def leaf(input: Any, delay_ms: int) -> Any:
    """One leaf session: its prepare, its ``FANOUT`` computes in sequence, its collect."""
    inputs = prepare(input, FANOUT, delay_ms)
    return collect([compute(x, i, delay_ms) for i, x in enumerate(inputs)], delay_ms)


def levels(partitions: int) -> int:
    depth = 1
    while FANOUT**depth < partitions:
        depth += 1
    assert FANOUT**depth == partitions, "a full tree only"
    return depth


def run_dask(partitions: int, delay_ms: int) -> Any:
    import dask.bag as db

    def bag(items: list[Any]) -> db.Bag:
        return db.from_sequence(items, partition_size=1)

    with ThreadPoolExecutor(WORKERS) as pool:
        inputs: list[Any] = [1]
        for _ in range(levels(partitions) - 1):  # the interior prepares, level by level
            prepared = bag(inputs).map(prepare, FANOUT, delay_ms).flatten()
            inputs = prepared.compute(scheduler="threads", pool=pool)
        answer = bag(inputs).reduction(
            lambda part: leaf(next(iter(part)), delay_ms), partial(collect, delay_ms=delay_ms), FANOUT
        )
        return answer.compute(scheduler="threads", pool=pool)


def run_threads(partitions: int, delay_ms: int) -> Any:
    with ThreadPoolExecutor(WORKERS) as pool:
        inputs: list[Any] = [1]
        for _ in range(levels(partitions) - 1):
            inputs = [x for xs in pool.map(lambda x: prepare(x, FANOUT, delay_ms), inputs) for x in xs]
        outputs = list(pool.map(lambda x: leaf(x, delay_ms), inputs))
        while len(outputs) > 1:  # the interior collects, level by level
            groups = [outputs[i : i + FANOUT] for i in range(0, len(outputs), FANOUT)]
            outputs = list(pool.map(lambda group: collect(group, delay_ms), groups))
        return outputs[0]


def timed(function: Callable[[int, int], Any], partitions: int, delay_ms: int) -> dict[str, Any]:
    started = time.perf_counter()
    answer = function(partitions, delay_ms)
    return {"answer": answer, "elapsed_s": round(time.perf_counter() - started, 3)}


def run_million(name: str) -> dict[str, Any]:
    if name == "s3":
        with tempfile.TemporaryDirectory() as tmp:
            return {"answer": SCENARIOS[name][0], **scale.measure(SCENARIOS[name][0], None, Path(tmp))}
    with runs.ready_workers() as url:  # a pool of workers already up, as Dask's is
        return runs.run_ready(url, runs.SCENARIOS[name])


def run(name: str, system: str) -> dict[str, Any]:
    partitions, delay_ms = SCENARIOS[name]
    if system == "million":
        result = run_million(name)
    else:
        result = timed(run_dask if system == "dask" else run_threads, partitions, delay_ms)
    assert result["answer"] == partitions, result
    return {"scenario": name, "system": system, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--system",
        action="append",
        choices=["million", "dask", "threads"],
        help="repeatable (default: million and dask); threads runs S1 only",
    )
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    systems = args.system or ["million", "dask"]
    if "dask" in systems:
        try:
            import dask.bag  # noqa: F401
        except ImportError:
            print("peers.py: dask is not installed: pip install -e '.[peers]'", file=sys.stderr)
            sys.exit(2)
        run_dask(FANOUT, 0)  # untimed: Dask's first compute imports distributed (million imports unclocked)
    rows = []
    for name in names:
        for _ in range(args.repeat):  # the systems take turns, so they share the machine's noise
            for system in systems:
                if system == "threads" and name != "s1":
                    continue
                row = run(name, system)
                rows.append(row)
                print(f"{name}  {system:<8} {row['elapsed_s']:8.2f} s", flush=True)
    print(f"\n{'scenario':<9}{'system':<9}{'median':>9}  {'range':<17}runs")
    for name in names:
        for system in systems:
            seconds = [row["elapsed_s"] for row in rows if (row["scenario"], row["system"]) == (name, system)]
            if seconds:
                spread = f"{min(seconds):.2f}-{max(seconds):.2f} s"
                print(f"{name:<9}{system:<9}{statistics.median(seconds):7.2f} s  {spread:<17}{len(seconds)}")
    runs.RESULTS.mkdir(exist_ok=True)
    (runs.RESULTS / "peers.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
