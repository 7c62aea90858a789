"""The ``million`` command: thin argparse front ends over the library, returning exit codes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from rich.console import Console

from million._version import __version__
from million.cli.display import ProgressDisplay
from million.compute import bots, runner
from million.compute.lobby import LOBBY, Lobby
from million.compute.pages import RUNS_PAGE
from million.compute.plugins import PluginError
from million.compute.progress import is_run_summary, progress_session
from million.compute.runner import RunConfig, RunError, RunState
from million.relay.config import ReflectorConfig
from million.relay.server import serve_reflector
from million.relay.store import StoreError, open_store
from million.replica.client import Client, ClientError, open_client, ssl_context
from million.replica.session import JoinError, join
from million.wire import tasks
from million.wire.protocol import ErrorCode
from million.wire.transport import ENGINES

T = TypeVar("T")
GC_THRESHOLD = 10_000  # allocations between collections of the youngest generation (default 700)

log = logging.getLogger("million")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _tune_gc()
    try:
        return args.command(args)
    except KeyboardInterrupt:
        return 130


def _tune_gc() -> None:
    """Collect garbage far less often than Python's default, leaving out what the
    imports made. Relaying and applying events allocate many short-lived objects: with
    the default threshold the collector ran about a thousand times in a 100,000-partition
    run, each time walking the long-lived replicas, for a fifth of a bot's CPU time."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="million", description="Run one computation over many partitions on workers that come and go."
    )
    parser.add_argument("--version", action="version", version=f"million {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    reflector = commands.add_parser("reflector", help="run a reflector that hosts sessions")
    reflector.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    reflector.add_argument("--port", type=int, default=8765, help="port to listen on (default: %(default)s)")
    reflector.add_argument(
        "--store", default="million.db", help="SQLite file for sessions, or :memory: (default: %(default)s)"
    )
    reflector.add_argument("--tick-ms", type=_positive, default=100, help="tick interval of idle sessions")
    reflector.add_argument(
        "--snapshot-every", type=_positive, default=1000, help="events between snapshot requests"
    )
    reflector.add_argument(
        "--max-frame", type=_positive, default=1 << 20, help="largest frame accepted, bytes (default: 1 MiB)"
    )
    reflector.add_argument(
        "--max-queue",
        type=_positive,
        default=64 << 20,
        help="bytes queued for one connection before it is dropped as too slow (default: 64 MiB)",
    )
    reflector.add_argument(
        "--max-sessions",
        type=_positive,
        default=100_000,
        help="sessions one connection may be in at once (default: %(default)s)",
    )
    reflector.add_argument(
        "--max-rate",
        type=_positive,
        default=200_000,
        help="messages per second one connection may send; beyond it, it is slowed (default: %(default)s)",
    )
    reflector.add_argument(
        "--max-summary",
        type=_positive,
        default=4096,
        help="bytes of one session summary (default: %(default)s)",
    )
    reflector.add_argument(
        "--transport",
        choices=ENGINES,
        default="sansio",
        help="websocket implementation serving clients (default: %(default)s)",
    )
    reflector.add_argument(
        "--token-file",
        type=Path,
        help="file holding the secret clients must present (default: $MILLION_TOKEN, if set)",
    )
    reflector.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback address without a token: anyone who can reach it may join",
    )
    reflector.add_argument(
        "--http",
        type=int,
        metavar="PORT",
        help="also serve the live web page of the runs and /metrics on PORT (0: any free port)",
    )
    reflector.add_argument("--certfile", type=Path, help="TLS certificate chain (PEM): serve wss://")
    reflector.add_argument("--keyfile", type=Path, help="TLS private key (PEM), if not in --certfile")
    reflector.set_defaults(command=_reflector)

    run = commands.add_parser("run", help="run a computation and print its answer")
    run.add_argument(
        "--plugin", required=True, help="the plugin (entry point in group 'million') to compute with"
    )
    run.add_argument("--input", type=_json_or_word, default=1, help="the run's input, as JSON (default: 1)")
    run.add_argument("--partitions", type=_positive, default=10_000, help="partitions (default: %(default)s)")
    run.add_argument(
        "--fanout", type=_fanout, default=100, help="partitions or children per session (default: 100)"
    )
    run.add_argument(
        "--option",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="a plugin option, VALUE parsed as JSON where it parses (repeatable)",
    )
    run.add_argument("--name", help="name of the run (default: a fresh one); the same name resumes it")
    run.add_argument("--store", help="store file of the embedded reflector (default: a temporary file)")
    run.add_argument("--reflector", help="URL of a running reflector (default: start one in this process)")
    run.add_argument(
        "--workers",
        type=_count,
        default=os.cpu_count() or 1,
        help="local worker processes; 0 to only post and watch (default: one per core)",
    )
    run.add_argument("--bots", type=_positive, default=16, help="bots per worker process (default: 16)")
    run.add_argument(
        "--no-work", dest="workers", action="store_const", const=0, help="only post the run and watch it"
    )
    run.add_argument(
        "--no-detach", dest="detach", action="store_false", help="coordinators stay in parent sessions"
    )
    run.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _client_arguments(run)
    run.set_defaults(command=_run)

    work = commands.add_parser("work", help="run bots that work a run until it is done")
    work.add_argument("--reflector", required=True, help="reflector URL, e.g. ws://127.0.0.1:8765")
    work.add_argument(
        "--run", help="work this run until it is done (default: the lobby's runs, until stopped)"
    )
    work.add_argument("--bots", type=_positive, default=16, help="bots per process (default: 16)")
    work.add_argument("--processes", type=_positive, default=1, help="worker processes (default: 1)")
    work.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    work.add_argument(
        "--no-detach", dest="detach", action="store_false", help="coordinators stay in parent sessions"
    )
    _client_arguments(work)
    work.set_defaults(command=_work)

    status = commands.add_parser("status", help="show a reflector's sessions")
    status.add_argument(
        "--reflector", default="ws://127.0.0.1:8765", help="reflector URL (default: %(default)s)"
    )
    _client_arguments(status)
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.set_defaults(command=_status)
    return parser


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", default=os.environ.get("MILLION_TOKEN"), help="reflector token (default: $MILLION_TOKEN)"
    )
    parser.add_argument(
        "--cafile",
        default=os.environ.get("MILLION_CAFILE"),
        help="certificates (PEM) to trust for wss:// besides the system's (default: $MILLION_CAFILE)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _fanout(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, not {text}")
    return value


def _json_or_word(text: str) -> Any:
    """JSON where it parses; otherwise the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, _json_or_word(value)


def _run(args: argparse.Namespace) -> int:
    if _trust(args, "run") is False:
        return 2
    config = RunConfig(
        plugin=args.plugin,
        input=args.input,
        partitions=args.partitions,
        fanout=args.fanout,
        options=dict(args.option),
        name=args.name,
        store=args.store,
        reflector=args.reflector,
        workers=args.workers,
        bots=args.bots,
        detach=args.detach,
        token=args.token,
        cafile=args.cafile,
    )
    console = Console(stderr=True)
    seen: list[RunState] = []

    def watch(state: RunState) -> None:
        if not seen:
            seen.append(state)
        if display is not None:
            display.update(state)

    display = ProgressDisplay(console) if console.is_terminal and not args.json else None
    try:
        with display or contextlib.nullcontext():
            result = trio.run(_until_signal, runner.run(config, watch=watch))
    except (PluginError, RunError, ClientError, StoreError) as exc:
        print(f"million run: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, PluginError | StoreError) else 1
    if result is None:
        state = seen[0] if seen else None
        done = f"{state.done:,} of {state.partitions:,} partitions done" if state else "nothing done yet"
        print(f"million run: interrupted, {done}", file=sys.stderr)
        if state is not None and state.store is not None:
            print(f"resume with: million run {_resume_args(args, state)}", file=sys.stderr)
        return 130
    if args.store is None and result.store is not None:
        runner.remove_store(result.store)
        result = attrs.evolve(result, store=None)
    if args.json:
        print(json.dumps(attrs.asdict(result)))
    else:
        print(f"answer: {json.dumps(result.answer)}")
        print(
            f"{result.partitions:,} partitions (fanout {result.fanout}) in {result.elapsed_s:.2f} s:"
            f" {result.partitions_per_s:,.0f} partitions/s" + (" (resumed)" if result.resumed else "")
        )
    return 0


def _resume_args(args: argparse.Namespace, state: RunState) -> str:
    parts = [f"--plugin {args.plugin}", f"--name {state.name}", f"--store {state.store}"]
    parts += [
        f"--partitions {args.partitions}",
        f"--fanout {args.fanout}",
        f"--input {json.dumps(args.input)!r}",
    ]
    parts += [f"--option {key}={json.dumps(value)!r}" for key, value in args.option]
    return " ".join(parts)


def _work(args: argparse.Namespace) -> int:
    if args.processes > 1:
        command = [sys.executable, "-m", "million", "--log-level", args.log_level, "work", "--reflector"]
        command += [args.reflector, "--bots", str(args.bots)]
        command += ["--run", args.run] if args.run else []
        command += [] if args.detach else ["--no-detach"]
        commands = [command] * args.processes
        env = bots.worker_env(args.token, args.cafile)
        trio.run(_until_signal, bots.run_worker_processes_to_end(commands, env))
        return 0
    context = _trust(args, "work")
    if context is False:
        return 2
    settings = {"detach": args.detach, "token": args.token, "ssl_context": context}
    if args.run is None:
        job = bots.run_lobby_bots(args.reflector, args.bots, **settings)
    else:
        job = bots.run_bots(args.reflector, args.run, args.bots, **settings)
    if args.exit_with_parent:
        job = _while_parent_lives(job, os.getppid())
    try:
        answer = trio.run(_until_signal, job)
    except (PluginError, ClientError) as exc:
        print(f"million work: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, PluginError) else 1
    except JoinError as exc:
        print(f"million work: cannot join run {args.run}: {exc}", file=sys.stderr)
        return 1
    if answer is None:
        print("million work: stopped", file=sys.stderr)
    return 0


async def _while_parent_lives(job: Coroutine[Any, Any, T], parent: int) -> T | None:
    """Run ``job`` until it ends or the process that started this one is gone (a worker
    of a ``million run`` that was killed would otherwise reconnect forever)."""
    result: list[T] = []
    async with tasks.open_nursery() as nursery:

        async def go() -> None:
            result.append(await job)
            nursery.cancel_scope.cancel()

        nursery.start_soon(go)
        while os.getppid() == parent:  # noqa: ASYNC110
            await trio.sleep(1)  # nothing tells a process that its parent died: look
        nursery.cancel_scope.cancel()
    return result[0] if result else None


async def _until_signal(job: Coroutine[Any, Any, T]) -> T | None:
    """Run ``job``; on SIGINT or SIGTERM cancel it and return None."""
    result: list[T] = []

    async def go(cancel: trio.CancelScope) -> None:
        result.append(await job)
        cancel.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with tasks.open_nursery() as nursery:
            nursery.start_soon(go, nursery.cancel_scope)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    return result[0] if result else None


def _reflector(args: argparse.Namespace) -> int:
    config = ReflectorConfig(
        host=args.host,
        port=args.port,
        store=args.store,
        tick_ms=args.tick_ms,
        snapshot_every=args.snapshot_every,
        max_frame=args.max_frame,
        max_queue_bytes=args.max_queue,
        max_sessions_per_connection=args.max_sessions,
        max_messages_per_s=args.max_rate,
        max_summary=args.max_summary,
        http_port=args.http,
        insecure=args.insecure,
        transport=args.transport,
    )
    try:
        config = attrs.evolve(config, token=_reflector_token(args), ssl_context=_server_tls(args))
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"million reflector: {exc}", file=sys.stderr)
        return 2
    if config.token is None and not args.insecure and not _loopback(config.host):
        print(
            f"million reflector: refusing to listen on {config.host} without a token: anyone who can"
            " reach it could join every session. Give --token-file (or $MILLION_TOKEN), or --insecure.",
            file=sys.stderr,
        )
        return 2
    try:
        store = open_store(config.store)
    except StoreError as exc:
        print(f"million reflector: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signal, config, store)
    except OSError as exc:
        print(f"million reflector: cannot listen: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


async def _serve_until_signal(config: ReflectorConfig, store) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with tasks.open_nursery() as nursery:
            reflector = await nursery.start(partial(serve_reflector, config, store, pages=[RUNS_PAGE]))
            print(
                f"million reflector {__version__} listening on {reflector.url} (store {store.path})",
                flush=True,
            )
            if reflector.web_url is not None:
                print(f"million reflector: the runs are on {reflector.web_url}", flush=True)
            async for signum in signals:
                print(
                    f"million reflector: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True
                )
                nursery.cancel_scope.cancel()
                break
    stats = reflector.statistics()
    print(
        f"million reflector stopped: {stats.events} events relayed, {stats.divergences} divergences",
        file=sys.stderr,
    )


def _reflector_token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise OSError(f"cannot read the token file: {exc}") from None
        if not token:
            raise ValueError(f"the token file {args.token_file} is empty")
        return token
    return os.environ.get("MILLION_TOKEN") or None


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.certfile is None:
        if args.keyfile is not None:
            raise ValueError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate {args.certfile}: {exc}") from None
    return context


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trust(args: argparse.Namespace, command: str) -> ssl.SSLContext | bool | None:
    """The TLS context for ``--cafile``; False (and a message) if it cannot be loaded."""
    try:
        return ssl_context(args.cafile)
    except (OSError, ssl.SSLError) as exc:
        print(f"million {command}: cannot load --cafile {args.cafile}: {exc}", file=sys.stderr)
        return False


def _status(args: argparse.Namespace) -> int:
    context = _trust(args, "status")
    if context is False:
        return 2

    async def fetch() -> object:
        async with open_client(
            args.reflector, token=args.token, label="status", first_timeout=2, ssl_context=context
        ) as client:
            with trio.fail_after(5):
                runs = await _lobby_runs(client)
                info = await client.status([progress_session(name) for name in runs])
        summaries = info.pop("summaries")
        info["runs"] = []
        for name, run in runs.items():
            progress = summaries.get(progress_session(name))
            info["runs"].append({"name": name, **run, **(progress if is_run_summary(progress) else {})})
        return info

    try:
        info = trio.run(fetch)
    except (ClientError, JoinError, trio.TooSlowError) as exc:
        print(f"million status: {exc or 'the reflector did not answer within 5 s'}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    stats = info["statistics"]
    print(f"million {info['version']} up {info['uptime_s']:.0f} s, store {info['store']}")
    print(
        f"{stats['connections']} connections, {stats['sessions']} live sessions, {stats['events']} events,"
        f" {stats['divergences']} divergences"
    )
    for session in info["sessions"]:
        print(
            f"  {session['name']:30} {session['model']:22} participants {session['participants']:4}"
            f"  seq {session['seq']:8}  {session['events_per_s']:8,.0f} events/s"
            f"  {session['events_since_snapshot']:6} since snapshot  divergences {session['divergences']}"
        )
    if info["runs"]:
        print("runs in the lobby:")
    for run in info["runs"]:
        print(_run_line(run))
    return 0


def _run_line(run: dict[str, Any]) -> str:
    """One run of the lobby; its fields come from participants, so nothing is assumed."""

    def count(key: str) -> str:
        value = run.get(key, 0)
        return f"{value:,}" if type(value) is int else str(value)

    line = f"  {run['name']:20} {run.get('plugin')} {run.get('version')}  {run.get('state')!s:5}"
    line += f"  {count('completed')} of {count('partitions')} partitions"
    if run.get("state") == "done":
        return line + f"  answer {json.dumps(run.get('answer'))}"
    return line + f"  {count('rate')}/s  {count('workers')} workers"


async def _lobby_runs(client: Client) -> dict[str, dict[str, Any]]:
    """The runs the lobby lists, by name; none if nobody ever posted one."""
    try:
        async with join(client, LOBBY, Lobby, create=False) as lobby:
            return dict(lobby.model.runs)
    except JoinError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return {}
        raise
