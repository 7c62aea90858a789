"""What presence and time cost the reflector: many memberships, many occupied sessions.

    python benchmarks/presence.py                       # both scenarios
    python benchmarks/presence.py --scenario crowd --members 100000
    nox -s bench -- presence

One ``million reflector`` process (SQLite store in a temporary directory) and raw
protocol clients in this process, which join and then only read (they never answer a
snapshot request, so nothing hides the cost of a long tail):

- crowd: ``--members`` memberships of ONE session, over ``--connections`` connections.
- sessions: ``--sessions`` occupied sessions of one member each, over the connections.

For each: the reflector's CPU while the memberships are made (per membership), while
nothing happens but ticks (CPU % over ``--idle`` seconds), and while one connection
drops and its memberships exit (per exit). Ticks and presence should cost the same per
change whatever the size: the figures per membership and per exit stay flat. Figures
are printed and written to benchmarks/results/presence.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from million.wire import codec, transport
from million.wire.protocol import PROTOCOL_VERSION, Hello, Join, Ping, Status, StatusRequest

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 500  # joins per frame


def start_reflector(store: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "million", "reflector", "--port", "0", "--store", str(store)]
    command += ["--max-sessions", "1000000", "--max-members", "1000000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    return process, line.split("listening on ")[1].split()[0]


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class Reader:
    """A raw connection that reads everything the reflector sends and counts it."""

    def __init__(self, channel: transport.Channel, scope: trio.CancelScope) -> None:
        self.channel = channel
        self.scope = scope  # cancelled: the connection is closed
        self.pong = trio.Event()
        self.info: dict[str, Any] = {}
        self.answered = trio.Event()

    async def read(self) -> None:
        while True:
            data = await self.channel.receive()
            if b'"pong"' in data:
                self.pong.set()
            if b'"status-info"' in data:
                for message in codec.decode_reflector(data):
                    if isinstance(message, Status):
                        self.info = message.info
                        self.answered.set()

    async def ping(self) -> None:
        """A round trip: everything sent before it has been handled."""
        self.pong = trio.Event()
        await self.channel.send(codec.encode(Ping(1)))
        await self.pong.wait()

    async def present(self) -> int:
        """Memberships of the reflector's occupied sessions, as ``status`` counts them."""
        self.answered = trio.Event()
        await self.channel.send(codec.encode(StatusRequest(1)))
        await self.answered.wait()
        listed = sum(session["participants"] for session in self.info["sessions"])
        return max(listed, self.info["statistics"]["sessions"])  # status lists 1,000 sessions at most


async def join_all(readers: list[Reader], names: list[list[str]]) -> None:
    """Each reader joins its names, BATCH per frame, then waits for its pong."""
    for reader, mine in zip(readers, names, strict=True):
        for start in range(0, len(mine), BATCH):
            joins = [
                codec.encode(Join(i, name, "bench-presence"))
                for i, name in enumerate(mine[start : start + BATCH])
            ]
            await reader.channel.send(codec.frame(joins))
        await reader.ping()


async def scenario(url: str, process: psutil.Process, names: list[list[str]], idle: float) -> dict[str, Any]:
    memberships = sum(map(len, names))
    async with trio.open_nursery() as nursery:
        readers = [await nursery.start(_connection, url) for _ in names]
        before = cpu(process)
        started = time.monotonic()
        await join_all(readers, names)
        joined = cpu(process) - before, time.monotonic() - started
        before = cpu(process)
        await trio.sleep(idle)
        idle_cpu = (cpu(process) - before) / idle
        leaver, stayer = readers[0], readers[-1]
        before = cpu(process)
        leaver.scope.cancel()
        while await stayer.present() > memberships - len(names[0]):  # noqa: ASYNC110 (another process: poll)
            await trio.sleep(0.05)
        exits = cpu(process) - before, len(names[0])
        nursery.cancel_scope.cancel()
    return {
        "memberships": memberships,
        "connections": len(names),
        "join_s": round(joined[1], 2),
        "join_cpu_us_per_membership": round(joined[0] / memberships * 1e6, 1),
        "idle_cpu_percent": round(idle_cpu * 100, 1),
        "exit_cpu_us_per_membership": round(exits[0] / exits[1] * 1e6, 1),
    }


async def _connection(url: str, task_status: trio.TaskStatus[Reader]) -> None:
    with trio.CancelScope() as scope:
        async with transport.connect(url) as channel:
            await channel.send(codec.encode(Hello(PROTOCOL_VERSION, None, "bench-presence")))
            await channel.receive()  # welcome
            reader = Reader(channel, scope)
            task_status.started(reader)
            await reader.read()


def crowd(members: int, connections: int) -> list[list[str]]:
    per = members // connections
    return [["crowd"] * per for _ in range(connections)]


def many(sessions: int, connections: int) -> list[list[str]]:
    per = sessions // connections
    return [[f"s-{c}-{i}" for i in range(per)] for c in range(connections)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["crowd", "sessions", "both"], default="both")
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    plans = {
        "crowd": crowd(args.members, args.connections),
        "sessions": many(args.sessions, args.connections),
    }
    chosen = list(plans) if args.scenario == "both" else [args.scenario]
    report: dict[str, Any] = {}
    for name in chosen:
        with tempfile.TemporaryDirectory() as directory:
            reflector, url = start_reflector(Path(directory) / "store.db")
            try:
                process = psutil.Process(reflector.pid)
                report[name] = trio.run(scenario, url, process, plans[name], args.idle)
                report[name]["reflector_peak_rss_mib"] = round(process.memory_info().rss / 2**20, 1)
            finally:
                reflector.send_signal(2)
                reflector.wait(60)
        print(name, json.dumps(report[name]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "presence.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
