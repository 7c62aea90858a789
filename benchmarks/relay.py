"""Relay throughput of one reflector: events in (stamped) and out (delivered) per second.

One ``million reflector`` runs in its own OS process (a fresh one per scenario, on a
temporary SQLite store by default); two client OS processes each open one client and
join 50 memberships through it. Every participant publishes an event, waits until it
sees its own event applied by the model, and publishes the next, for ``--duration``
seconds after a warm-up.

- fanout: 10 sessions of 10 participants (5 per client process); delivered = stamped x 10.
- single: 100 sessions of one participant each; delivered = stamped.

Measured: events stamped/s and delivered/s (counted in the clients), publish-to-delivery
latency (p50, p99), CPU % and peak RSS of the reflector process, CPU % of the clients.
Each participant has one event in flight, so this is a closed loop: throughput is
100 / round-trip time, and the three processes take turns more than they saturate the
cores (on a 2-core machine they also compete for them). Profiled runs are slower.

    python benchmarks/relay.py                           # both scenarios, SQLite store, 10 s each
    python benchmarks/relay.py --scenario fanout --store memory --duration 5
    python benchmarks/relay.py --transport trio-websocket   # the reflector on trio-websocket
    python benchmarks/relay.py --profile                 # pyinstrument: reflector and one client
    nox -s bench -- --duration 20

Figures are printed and written to benchmarks/results/relay.json (profiles next to it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio

import million

RESULTS = Path(__file__).resolve().parent / "results"
CLIENT_PROCESSES = 2
PARTICIPANTS = 100
READY_TIMEOUT = 60.0  # connect and join 50 memberships
DRAIN_TIMEOUT = 10.0  # last events in flight after the window, and leaving
STOP_TIMEOUT = 30.0  # the reflector writing its store (and profile) on SIGINT
PROFILE_TOP = 30  # lines of each flat profile printed


@attrs.frozen
class Scenario:
    name: str
    sessions: int
    per_session: int  # participants per session
    goal_in: int  # events/s stamped the issue asks for (0: none)
    goal_out: int  # events/s delivered the issue asks for


SCENARIOS = {
    "fanout": Scenario("fanout", sessions=10, per_session=10, goal_in=0, goal_out=100_000),
    "single": Scenario("single", sessions=100, per_session=1, goal_in=30_000, goal_out=30_000),
}


# --- what the clients run ----------------------------------------------------------------


@attrs.define
class Relay(million.Model, name="bench-relay"):
    """Counts pings and tells the views whose ping was applied."""

    pings: int = 0

    def init(self, options: Any) -> None:
        self.subscribe("ping", self.ping)

    def ping(self, data: Any) -> None:
        self.pings += 1
        self.publish("pong", self.sender)


@attrs.define
class Meter:
    """One client process's counters, shared by its views; the window is in time.monotonic()."""

    start: float = 0.0
    end: float = 0.0
    in_flight: int = 0
    stamped: int = 0  # own events seen applied inside the window
    delivered: int = 0  # (participant, event) pairs seen inside the window
    latencies: list[float] = attrs.Factory(list)
    drained: trio.Event = attrs.Factory(trio.Event)  # set when nothing is in flight after the window


class Pinger(million.View):
    """Publishes a ping, waits for its own ping to come back applied, publishes the next."""

    def __init__(self, session: million.Session, meter: Meter) -> None:
        super().__init__(session)
        self.meter = meter
        self.sent = 0.0
        self.published = 0
        self.subscribe("pong", self.pong)

    def ping(self) -> None:
        self.sent = time.monotonic()
        if self.publish("ping", self.published):
            self.published += 1
            self.meter.in_flight += 1

    @property
    def applied(self) -> int:
        """Pings the session's model has applied (all participants', not only this one's)."""
        model = self.model
        assert isinstance(model, Relay)
        return model.pings

    def pong(self, sender: str) -> None:
        # Called synchronously by the client's reader, right after the model applied the event.
        meter = self.meter
        now = time.monotonic()
        inside = meter.start <= now < meter.end
        meter.delivered += inside
        if sender != self.view_id:
            return
        meter.in_flight -= 1
        if inside:
            meter.stamped += 1
            meter.latencies.append(now - self.sent)
        if now < meter.end:
            self.ping()
        elif meter.in_flight == 0:
            meter.drained.set()


@attrs.frozen
class ClientSpec:
    index: int
    url: str
    sessions: list[str]  # one entry per membership
    timeout: float
    profile: str | None = None  # where to save a pyinstrument session of this process


def client_process(spec: ClientSpec, pipe: Connection) -> None:
    """Entry point of a client OS process: talks to the parent through ``pipe``."""
    try:
        report = trio.run(run_client, spec, pipe) if spec.profile is None else _profiled(spec, pipe)
        pipe.send(("result", report))
    except KeyboardInterrupt:
        pass  # Ctrl-C reached the whole process group: the parent reports it
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


def _profiled(spec: ClientSpec, pipe: Connection) -> dict[str, Any]:
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="disabled")
    with profiler:
        report = trio.run(run_client, spec, pipe)
    assert profiler.last_session is not None and spec.profile is not None
    profiler.last_session.save(spec.profile)
    return report


async def run_client(spec: ClientSpec, pipe: Connection) -> dict[str, Any]:
    meter = Meter()
    with trio.fail_after(spec.timeout):
        async with (
            million.open_client(spec.url, label=f"bench-{spec.index}") as client,
            contextlib.AsyncExitStack() as stack,
        ):
            views = [await _join(stack, client, name, meter) for name in spec.sessions]
            pipe.send(("ready", None))
            meter.start, meter.end = await _receive(pipe)
            for view in views:
                view.ping()
            await trio.sleep(max(0.0, meter.end - time.monotonic()))
            await _drain(meter)
            pipe.send(("drained", None))
            await _receive(pipe)  # every process has drained: all events are out
            await client.ping()  # and, after this round trip, in
            return _report(client, views, meter)


async def _join(stack: contextlib.AsyncExitStack, client: million.Client, name: str, meter: Meter) -> Pinger:
    session = await stack.enter_async_context(
        million.join(client, name, Relay, lambda session: Pinger(session, meter))
    )
    assert isinstance(session.view, Pinger)
    return session.view


async def _receive(pipe: Connection) -> Any:
    return await trio.to_thread.run_sync(pipe.recv, abandon_on_cancel=True)


async def _drain(meter: Meter) -> None:
    if meter.in_flight > 0:
        with trio.move_on_after(DRAIN_TIMEOUT):
            await meter.drained.wait()


def _report(client: million.Client, views: list[Pinger], meter: Meter) -> dict[str, Any]:
    published: dict[str, int] = {}
    for view in views:
        published[view.session.name] = published.get(view.session.name, 0) + view.published
    stats = client.statistics()
    return {
        "stamped": meter.stamped,
        "delivered": meter.delivered,
        "latencies": meter.latencies,
        "in_flight": meter.in_flight,
        "published": published,
        "applied": {view.session.name: view.applied for view in views},
        "connections": stats.connections,
        "errors": [f"{e.code}: {e.message}" for e in client.errors],
        "resyncs": sum(view.session.resyncs for view in views),
    }


# --- the reflector process ---------------------------------------------------------------


@attrs.define
class ReflectorProcess:
    popen: subprocess.Popen[bytes]
    process: psutil.Process
    url: str
    log: Path


@contextlib.contextmanager
def reflector_process(
    store: str, transport: str, log: Path, profile: Path | None
) -> Iterator[ReflectorProcess]:
    """Run ``million reflector`` on a free loopback port; SIGINT it on the way out, always."""
    command = [sys.executable, "-m", "million", "--log-level", "warning", "reflector"]
    command += ["--host", "127.0.0.1", "--port", "0", "--store", store, "--transport", transport]
    if profile is not None:
        command[1:1] = ["-m", "pyinstrument", "-o", str(profile), "-r", "pyisession"]
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = _wait_listening(popen, log)
        yield ReflectorProcess(popen, psutil.Process(popen.pid), url, log)
    finally:
        _stop(popen)


def _wait_listening(popen: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on (ws://127\.0\.0\.1:(\d+))", log.read_text(errors="replace"))
        if found:
            socket.create_connection(("127.0.0.1", int(found[2])), timeout=5).close()
            return found[1]
        if popen.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the reflector did not start:\n{log.read_text(errors='replace')}")


def _stop(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGINT)
    try:
        popen.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        print("the reflector ignored SIGINT; killing it", file=sys.stderr)
        popen.kill()
        popen.wait()


def peak_rss(process: psutil.Process) -> int:
    """Peak resident set size in bytes (VmHWM on Linux, else the current RSS)."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{process.pid}/status").read_text())
    except OSError:
        found = None
    return int(found[1]) * 1024 if found else process.memory_info().rss


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(t.user + t.system for t in (p.cpu_times() for p in processes))


# --- a scenario --------------------------------------------------------------------------


@attrs.define
class ClientProcess:
    process: multiprocessing.process.BaseProcess
    pipe: Connection

    def expect(self, kind: str, timeout: float) -> Any:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"client process {self.process.pid}: no {kind!r} within {timeout} s")
        got, value = self.pipe.recv()
        if got == "error":
            raise RuntimeError(f"client process {self.process.pid} failed:\n{value}")
        if got != kind:
            raise RuntimeError(f"client process {self.process.pid}: expected {kind!r}, got {got!r}")
        return value


@contextlib.contextmanager
def client_processes(specs: list[ClientSpec]) -> Iterator[list[ClientProcess]]:
    context = multiprocessing.get_context("spawn")
    clients: list[ClientProcess] = []
    try:
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=client_process, args=(spec, child), name=f"client-{spec.index}")
            process.start()
            clients.append(ClientProcess(process, parent))
        yield clients
    except BaseException:
        for client in clients:
            client.process.kill()
        raise
    finally:
        for client in clients:
            client.process.join(DRAIN_TIMEOUT)
            if client.process.is_alive():
                client.process.kill()
                client.process.join()


def client_specs(
    scenario: Scenario, url: str, args: argparse.Namespace, profile: Path | None
) -> list[ClientSpec]:
    """Participant i joins session i // per_session from client process i % CLIENT_PROCESSES."""
    timeout = READY_TIMEOUT + args.warmup + args.duration + 3 * DRAIN_TIMEOUT
    return [
        ClientSpec(
            index,
            url,
            [
                f"{scenario.name}-{i // scenario.per_session}"
                for i in range(PARTICIPANTS)
                if i % CLIENT_PROCESSES == index
            ],
            timeout,
            str(profile) if profile is not None and index == 0 else None,
        )
        for index in range(CLIENT_PROCESSES)
    ]


def run_scenario(scenario: Scenario, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    store = ":memory:" if args.store == "memory" else str(workdir / f"{scenario.name}.db")
    profiles = _profile_paths(scenario) if args.profile else {}
    log = workdir / f"{scenario.name}-reflector.log"
    with reflector_process(store, args.transport, log, profiles.get("reflector")) as reflector:
        specs = client_specs(scenario, reflector.url, args, profiles.get("client"))
        with client_processes(specs) as clients:
            figures = _measure(reflector, clients, args)
            reports = [client.expect("result", READY_TIMEOUT) for client in clients]
    figures["reflector_log"] = _log_findings(log)
    summary = summarize(scenario, figures, reports, args)
    if profiles:
        summary["profiles"] = render_profiles(profiles)
    return summary


def _profile_paths(scenario: Scenario) -> dict[str, Path]:
    return {
        who: RESULTS / f"relay-profile-{scenario.name}-{who}.pyisession" for who in ("reflector", "client")
    }


def _measure(
    reflector: ReflectorProcess, clients: list[ClientProcess], args: argparse.Namespace
) -> dict[str, Any]:
    """Start the clients together; sample CPU over the window; let them drain and report."""
    for client in clients:
        client.expect("ready", READY_TIMEOUT)
    start = time.monotonic() + args.warmup
    end = start + args.duration
    for client in clients:
        client.pipe.send((start, end))
    client_cpu = [psutil.Process(client.process.pid) for client in clients]
    time.sleep(max(0.0, start - time.monotonic()))
    before = (time.monotonic(), cpu_seconds([reflector.process]), cpu_seconds(client_cpu))
    time.sleep(max(0.0, end - time.monotonic()))
    after = (time.monotonic(), cpu_seconds([reflector.process]), cpu_seconds(client_cpu))
    for client in clients:
        client.expect("drained", args.warmup + args.duration + DRAIN_TIMEOUT)
    for client in clients:
        client.pipe.send("report")
    wall = after[0] - before[0]
    return {
        "reflector_statistics": reflector_statistics(reflector.url),
        "reflector_cpu_percent": 100 * (after[1] - before[1]) / wall,
        "clients_cpu_percent": 100 * (after[2] - before[2]) / wall,
        "reflector_peak_rss_mib": peak_rss(reflector.process) / (1 << 20),
    }


def reflector_statistics(url: str) -> dict[str, int] | None:
    """The reflector's own counters (whole run), from ``million status``."""
    command = [sys.executable, "-m", "million", "status", "--reflector", url, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        return json.loads(done.stdout)["statistics"]
    except (subprocess.SubprocessError, ValueError, KeyError) as exc:
        print(f"million status failed: {exc}", file=sys.stderr)
        return None


def _log_findings(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace")
    relayed = re.search(r"stopped: (\d+) events relayed, (\d+) divergences", text)
    problems = [line for line in text.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
    return {
        "events_relayed_total": int(relayed[1]) if relayed else None,
        "divergences": int(relayed[2]) if relayed else None,
        "problem_lines": len(problems),
        "first_problems": problems[:5],
    }


def summarize(
    scenario: Scenario, figures: dict[str, Any], reports: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    latencies = sorted(x for report in reports for x in report["latencies"])
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    stamped = sum(report["stamped"] for report in reports) / args.duration
    delivered = sum(report["delivered"] for report in reports) / args.duration
    return {
        "scenario": scenario.name,
        "sessions": scenario.sessions,
        "participants_per_session": scenario.per_session,
        "participants": PARTICIPANTS,
        "client_processes": CLIENT_PROCESSES,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "store": args.store,
        "transport": args.transport,
        "profiled": args.profile,
        "events_in_per_s": round(stamped),
        "events_out_per_s": round(delivered),
        "latency_p50_ms": round(cuts[49] * 1000, 3),
        "latency_p99_ms": round(cuts[98] * 1000, 3),
        "reflector_cpu_percent": round(figures["reflector_cpu_percent"], 1),
        "reflector_peak_rss_mib": round(figures["reflector_peak_rss_mib"], 1),
        "clients_cpu_percent": round(figures["clients_cpu_percent"], 1),
        "goal_met": stamped >= scenario.goal_in and delivered >= scenario.goal_out,
        "reflector_statistics": figures["reflector_statistics"],
        "checks": _checks(reports),
        "reflector_log": figures["reflector_log"],
    }


def _checks(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Nothing lost: every replica applied every ping published to its session."""
    published: dict[str, int] = {}
    for report in reports:
        for name, count in report["published"].items():
            published[name] = published.get(name, 0) + count
    missing = sum(
        published[name] - applied for report in reports for name, applied in report["applied"].items()
    )
    return {
        "events_published": sum(published.values()),
        "replica_events_missing": missing,
        "still_in_flight": sum(report["in_flight"] for report in reports),
        "reconnects": sum(report["connections"] - 1 for report in reports),
        "resyncs": sum(report["resyncs"] for report in reports),
        "client_errors": [error for report in reports for error in report["errors"]][:5],
    }


# --- profiles ----------------------------------------------------------------------------


def render_profiles(profiles: dict[str, Path]) -> dict[str, Any]:
    """Write a flat (self time by function) and a call-tree rendering of each saved session."""
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    rendered: dict[str, Any] = {}
    for who, path in profiles.items():
        if not path.exists():
            print(f"no {who} profile was written ({path})", file=sys.stderr)
            continue
        session = Session.load(str(path))
        tree = path.with_name(f"{path.stem}-tree.txt")
        tree.write_text(ConsoleRenderer(time="percent_of_total", color=False, unicode=True).render(session))
        flat = path.with_name(f"{path.stem}-flat.txt")
        shares = flat_profile(session)
        flat.write_text("".join(f"{share:6.1%}  {where}\n" for where, share in shares))
        rendered[who] = {"flat": str(flat), "tree": str(tree), "top": shares[:PROFILE_TOP]}
    return rendered


def flat_profile(session: Any) -> list[tuple[str, float]]:
    """Share of the sampled (main thread) wall time spent in each function itself, largest first.

    pyinstrument's own flat renderer also counts its synthetic ``[self]`` frames, twice.
    """
    root = session.root_frame()
    totals: dict[str, float] = {}
    stack = [root]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if not frame.is_synthetic:
            name = f"{frame.class_name}.{frame.function}" if frame.class_name else frame.function
            where = f"{name}  {frame.file_path_short}:{frame.line_no}"
            totals[where] = totals.get(where, 0.0) + frame.total_self_time
    return sorted(((where, t / root.time) for where, t in totals.items()), key=lambda item: -item[1])


def print_profile_tops(summary: dict[str, Any]) -> None:
    for who, profile in summary.get("profiles", {}).items():
        print(f"\n{summary['scenario']}, {who}: self time by function, top {PROFILE_TOP} ({profile['flat']})")
        for where, share in profile["top"]:
            print(f"{share:6.1%}  {where}")


# --- the command -------------------------------------------------------------------------

ROWS = [
    ("client processes", "client_processes", "{}"),
    ("sessions x participants", None, ""),
    ("duration (s)", "duration_s", "{:g}"),
    ("events in/s (stamped)", "events_in_per_s", "{:,}"),
    ("events out/s (delivered)", "events_out_per_s", "{:,}"),
    ("latency p50 (ms)", "latency_p50_ms", "{:.2f}"),
    ("latency p99 (ms)", "latency_p99_ms", "{:.2f}"),
    ("reflector CPU %", "reflector_cpu_percent", "{:.0f}"),
    ("reflector peak RSS (MiB)", "reflector_peak_rss_mib", "{:.1f}"),
    ("clients CPU % (sum)", "clients_cpu_percent", "{:.0f}"),
    ("goal met", "goal_met", "{}"),
]


def print_table(summaries: list[dict[str, Any]]) -> None:
    width = 26
    print(f"\n{'':{width}}" + "".join(f"{s['scenario']:>14}" for s in summaries))
    for label, key, fmt in ROWS:
        cells = [
            f"{s['sessions']} x {s['participants_per_session']}" if key is None else fmt.format(s[key])
            for s in summaries
        ]
        print(f"{label:{width}}" + "".join(f"{cell:>14}" for cell in cells))
    for s in summaries:
        stats = s["reflector_statistics"] or {}
        if stats.get("frames_in") and stats.get("frames_out"):
            print(
                f"{s['scenario']}: reflector relayed {stats['events']:,} events in {stats['frames_in']:,}"
                f" frames in ({stats['events'] / stats['frames_in']:.1f} events per frame) and"
                f" {stats['frames_out']:,} frames out ({stats['bytes_out'] / stats['frames_out']:,.0f}"
                " bytes per frame)"
            )
    for s in summaries:
        checks, log = s["checks"], s["reflector_log"]
        print(
            f"{s['scenario']}: {checks['events_published']:,} events published,"
            f" {checks['replica_events_missing']} missing from replicas,"
            f" {checks['still_in_flight']} in flight,"
            f" {checks['reconnects']} reconnects, {log['problem_lines']} warnings in the reflector log"
        )


def measured() -> dict[str, Any]:
    """Which million was measured: its version, where it was imported from, its git state."""
    where = Path(million.__file__).resolve().parent
    git = ["git", "-C", str(where)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return {"version": million.__version__, "path": str(where), "commit": None}
    return {
        "version": million.__version__,
        "path": str(where),
        "commit": commit.stdout.strip(),
        "modified": status.stdout.split("\n")[:-1] if status.stdout else [],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite", help="reflector store")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument(
        "--transport",
        choices=["sansio", "trio-websocket"],
        default="sansio",
        help="reflector websocket engine",
    )
    parser.add_argument(
        "--profile", action="store_true", help="run the reflector and client 0 under pyinstrument"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "relay.json", help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    summaries = []
    with tempfile.TemporaryDirectory(prefix="million-bench-") as workdir:
        for name in names:
            print(f"running {name} ({args.warmup:g} s warm-up, {args.duration:g} s measured) ...", flush=True)
            try:
                summaries.append(run_scenario(SCENARIOS[name], args, Path(workdir)))
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
    print_table(summaries)
    for summary in summaries:
        print_profile_tops(summary)
    result = {
        "benchmark": "relay",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "million": measured(),
        "scenarios": {summary["scenario"]: summary for summary in summaries},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
