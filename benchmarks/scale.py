"""A million partitions on a standalone reflector, and the same under churn.

    python benchmarks/scale.py                          # N = 10,000, 100,000 and 1,000,000
    python benchmarks/scale.py --repeat 3               # each three times: medians and ranges
    python benchmarks/scale.py --partitions 100000 --churn 1.0
    python benchmarks/scale.py --partitions 100000 --verify 1 --verify 2 --verify adaptive
    nox -s bench -- scale

Each run: one ``million reflector`` process with a SQLite store, two ``million work``
processes of 50 bots each (100 workers), fanout 100 (``--fanout``), the demo plugin without
delay, taking their work from the lobby, and ``million run --no-work`` posting the run and
timing it from its start to its answer. The bots are at work before it is posted (untimed
runs of 2,000 partitions first, until each bot process has computed in one), as peers
are timed with their workers already up.
With ``--churn S`` a bot process is killed (SIGKILL) every S seconds and a fresh one
started, and the same run without kills is measured for comparison. With ``--verify``
(repeatable) each value is measured: ``adaptive`` runs twice on the same reflector and bot
processes, and the second run, with the trust the first established, is the one measured.
Prints partitions/s, results reported per partition, the peak memory of the reflector and
of the busiest bot process, and the store's size; with ``--repeat`` each measurement is
made that many times (a fresh reflector and bot processes each time) and their medians and
ranges follow, with each size's rate as a share of the rate at a million when a million
was measured too. Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MILLION = [sys.executable, "-m", "million"]
WARM_UP_RUNS = 10  # untimed runs at most, until every bot process has computed in one
MILLION_N = 1_000_000  # the size whose rate the others are compared with


def start_reflector(store: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [*MILLION, "reflector", "--port", "0", "--store", str(store)], stdout=subprocess.PIPE, text=True
    )
    line = process.stdout.readline() if process.stdout else ""
    return process, line.split("listening on ")[1].split()[0]


def start_workers(url: str) -> subprocess.Popen[str]:
    """A bot process that takes its work from the lobby."""
    return subprocess.Popen([*MILLION, "work", "--reflector", url, "--bots", "50"], stderr=subprocess.DEVNULL)


def warm_up(url: str, processes: int = 2) -> None:
    """Untimed runs of 2,000 partitions until each of the ``processes`` bot processes has
    computed in one: the lobby's bots are then at work, as peers' workers are up before
    they are timed. (A process that has not worked yet would make the timed run wait
    while it imports its plugin and starts its first crew.)"""
    command = [*MILLION, "run", "--reflector", url, "--plugin", "demo", "--partitions", "2000"]
    for _ in range(WARM_UP_RUNS):
        run = subprocess.run([*command, "--no-work", "--json"], stdout=subprocess.PIPE, text=True, check=True)
        if len(json.loads(run.stdout)["credit"]) >= processes:  # one identity per process
            return
    raise RuntimeError(f"{WARM_UP_RUNS} untimed runs, and not each of {processes} bot processes computed")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(
    partitions: int, churn: float | None, workdir: Path, fanout: int = 100, verify: str = "1"
) -> dict[str, Any]:
    store = Path(tempfile.mkdtemp(dir=workdir)) / f"scale-{partitions}-{churn}-{verify}.db"  # a fresh one
    reflector, url = start_reflector(store)
    workers = [start_workers(url) for _ in range(2)]
    command = [*MILLION, "run", "--reflector", url, "--plugin", "demo", "--partitions", str(partitions)]
    command += ["--fanout", str(fanout), "--no-work", "--json", "--verify", verify]
    try:
        if verify == "adaptive":  # a first run earns the bot processes their trust
            subprocess.run([*command, "--name", "trust"], stdout=subprocess.DEVNULL, check=True)
        else:
            warm_up(url)
        run = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        kills, rng = 0, random.Random(1)
        while run.poll() is None:
            if churn is None:
                run.wait()
                break
            time.sleep(churn)
            if run.poll() is None:
                victim = rng.randrange(len(workers))
                workers[victim].kill()
                workers[victim].wait()
                workers[victim] = start_workers(url)
                kills += 1
        result = json.loads(run.stdout.read() if run.stdout else "{}")
        rss = peak_rss_mib(reflector.pid)
        bots_rss = max(peak_rss_mib(process.pid) for process in workers)
    finally:
        for process in [*workers, reflector]:
            process.send_signal(signal.SIGINT)
        for process in [*workers, reflector]:
            process.wait(30)
    size = sum(path.stat().st_size for path in store.parent.glob(store.name + "*"))
    assert result["answer"] == partitions, result
    return {
        "partitions": partitions,
        "fanout": fanout,
        "churn_s": churn,
        "verify": verify,
        "results_per_partition": round(
            sum(counts["submitted"] for counts in result["credit"].values()) / partitions, 3
        ),
        "kills": kills,
        "elapsed_s": result["elapsed_s"],
        "partitions_per_s": result["partitions_per_s"],
        "reflector_peak_rss_mib": round(rss, 1),
        "bots_peak_rss_mib": round(bots_rss, 1),
        "store_mib": round(size / 2**20, 1),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians and ranges of the rows measured alike; each rate also as a share of the
    median rate at a million measured alike (same fanout, churn and verify), if any."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["fanout"], row["churn_s"], row["verify"], row["partitions"]), []).append(row)
    million = {
        key[:-1]: _spread(runs, "partitions_per_s")[0] for key, runs in groups.items() if key[-1] == MILLION_N
    }
    summaries = []
    for key, runs in groups.items():
        fanout, churn, verify, partitions = key
        elapsed, rate = _spread(runs, "elapsed_s"), _spread(runs, "partitions_per_s")
        share = round(rate[0] / million[key[:-1]], 3) if key[:-1] in million else None
        alike = {"partitions": partitions, "fanout": fanout, "churn_s": churn, "verify": verify}
        figures = {"elapsed_s": elapsed, "partitions_per_s": rate, "of_a_million": share}
        summaries.append(alike | {"runs": len(runs)} | figures)
        print(
            f"N={partitions:>9,}  F={fanout}  verify={verify:<8}  churn={churn}"
            f"  {len(runs)} run{'' if len(runs) == 1 else 's'}:"
            f"  {elapsed[0]:.2f} s ({elapsed[1]:.2f}-{elapsed[2]:.2f})"
            f"  {rate[0]:,.0f}/s ({rate[1]:,.0f}-{rate[2]:,.0f})"
            + ("" if share is None else f"  {share:.0%} of a million's rate")
        )
    return summaries


def _spread(runs: list[dict[str, Any]], field: str) -> tuple[float, float, float]:
    """The median, lowest and highest of ``field``."""
    values = [float(run[field]) for run in runs]
    return (statistics.median(values), min(values), max(values))


def _line(row: dict[str, Any]) -> str:
    return (
        f"N={row['partitions']:>9,}  F={row['fanout']}  verify={row['verify']:<8}  churn={row['churn_s']}"
        f"  results/partition={row['results_per_partition']:.2f}  kills={row['kills']:>3}"
        f"  {row['elapsed_s']:>7.1f} s  {row['partitions_per_s']:>8,.0f}/s"
        f"  reflector {row['reflector_peak_rss_mib']:.0f} MiB  store {row['store_mib']:.0f} MiB"
        f"  bot process {row['bots_peak_rss_mib']:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, action="append", help="repeatable (default: 1e4, 1e5, 1e6)")
    parser.add_argument("--churn", type=float, help="kill a bot process every CHURN seconds")
    parser.add_argument("--fanout", type=int, default=100)
    parser.add_argument("--verify", action="append", help="1, 2, ... or adaptive; repeatable (default: 1)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each this many times (default: 1)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    cases = [
        (partitions, churn, verify)
        for partitions in args.partitions or [10_000, 100_000, 1_000_000]
        for churn in ([None, args.churn] if args.churn else [None])
        for verify in args.verify or ["1"]
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # the cases take turns, so that they share the machine's noise
            for partitions, churn, verify in cases:
                rows.append(measure(partitions, churn, Path(tmp), args.fanout, verify))
                print(_line(rows[-1]), flush=True)
    print()
    summaries = summarize(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({"runs": rows, "summary": summaries}, indent=2))


if __name__ == "__main__":
    main()
