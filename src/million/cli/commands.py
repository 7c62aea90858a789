"""The commands of ``million``: each turns its flags into a config, hands it to the
library and returns an exit code. Flags are in ``parser``, what is printed in ``display``."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from rich.console import Console

from million._version import __version__
from million.cli.clock import PreciseClock
from million.cli.display import (
    ProgressDisplay,
    credit_lines,
    progress_line,
    result_lines,
    resume_args,
    status_lines,
)
from million.cli.parser import LIMITS, build_parser
from million.compute import bots, runner
from million.compute.pages import RUNS_PAGE
from million.compute.plugins import PluginError
from million.compute.runner import RunConfig, RunError, RunState
from million.compute.status import ledger_identities, status_with_runs
from million.compute.worker import RunFailed
from million.relay.config import ConfigError, Identity, ReflectorConfig, read_identities
from million.relay.server import open_reflector
from million.relay.store import StoreError
from million.replica.client import Client, ClientError, open_client, ssl_context
from million.replica.session import JoinError
from million.wire import tasks

__all__ = ["Failure", "main", "serve", "until_stopped"]

T = TypeVar("T")
log = logging.getLogger("million")
GC_THRESHOLD = 10_000  # allocations between collections of the youngest generation (Python's: 700)
STATUS_TIMEOUT = 5  # seconds ``million status`` waits for the reflector's answer
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Failure(Exception):
    """Ends a command with this one-line message and ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _tune_gc()
    try:
        return COMMANDS[args.command](args)
    except Failure as exc:
        print(f"million {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _tune_gc() -> None:
    """Collect garbage far less often than Python's default, leaving out what the
    imports made. Relaying and applying events allocates many short-lived objects: at
    the default threshold the collector runs so often, each time walking the long-lived
    replicas, that it takes a sizeable share of a bot's CPU time."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


# --- million reflector ------------------------------------------------------------------------


def reflector(args: argparse.Namespace) -> int:
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
        token=None if args.tokens else _reflector_token(args),
        view_token=_read_token(args.view_token_file) if args.view_token_file else None,
        identities=_read_identities(args.tokens) if args.tokens else (),
        allow_origins=tuple(args.allow_origin),
        insecure=args.insecure,
        fsync=args.fsync,
        ssl_context=_server_tls(args),
        transport=args.transport,
        http_port=args.http,
        **{field: getattr(args, field) for _, field, _ in LIMITS},
    )
    _open_files(config.max_connections + config.max_handshakes)
    try:
        trio.run(serve, config)
    except (ConfigError, StoreError) as exc:
        raise Failure(str(exc), 2) from None
    except OSError as exc:
        raise Failure(f"cannot listen: {exc}", 1) from None
    return 0


def _open_files(wanted: int) -> None:
    """Let this process open as many files as its limits ask for (each connection is one),
    up to what the system allows it; say so if that is fewer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + 100  # the store, the listeners, the web port
    if soft < target:
        allowed = target if hard == resource.RLIM_INFINITY else min(target, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
        if allowed < target:
            log.warning("this process may open %d files: fewer connections than --max-connections", allowed)


async def serve(config: ReflectorConfig) -> None:
    """Serve ``config`` until SIGINT or SIGTERM, saying so on the way in and out."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with open_reflector(config, pages=[RUNS_PAGE]) as served:
            print(
                f"million reflector {__version__} listening on {served.url} (store {served.store.path})",
                flush=True,
            )
            if served.web_url is not None:
                print(f"million reflector: the runs are on {served.web_url}", flush=True)
            signum = await anext(signals)
            print(f"million reflector: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
    stats = served.statistics()
    print(
        f"million reflector stopped: {stats.events} events relayed, {stats.divergences} divergences",
        file=sys.stderr,
    )


def _reflector_token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return os.environ.get("MILLION_TOKEN") or None
    return _read_token(args.token_file)


def _read_identities(path: Path) -> tuple[Identity, ...]:
    try:
        return read_identities(path.read_text(), str(path))
    except OSError as exc:
        raise Failure(f"cannot read the tokens file: {exc}", 2) from None
    except ConfigError as exc:
        raise Failure(str(exc), 2) from None


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise Failure(f"cannot read the token file: {exc}", 2) from None
    if not token:
        raise Failure(f"the token file {path} is empty", 2)
    return token


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.certfile is None:
        if args.keyfile is not None:
            raise Failure("--keyfile needs --certfile", 2)
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise Failure(f"cannot load the TLS certificate {args.certfile}: {exc}", 2) from None
    return context


# --- million run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    _client_tls(args)  # only to refuse an unusable --cafile before anything starts
    config = RunConfig(
        plugin=args.plugin,
        input=args.input,
        partitions=args.partitions,
        fanout=args.fanout,
        options=dict(args.option),
        name=args.name,
        store=args.store,
        reflector=args.reflector,
        processes=args.processes,
        bots=args.bots,
        detach=args.detach,
        token=args.token,
        cafile=args.cafile,
        verify=args.verify,
        max_copies=args.max_copies,
        max_rejections=args.max_rejections,
        max_failures=args.max_failures,
    )
    console = Console(stderr=True)
    display = ProgressDisplay(console) if console.is_terminal and not args.json else None
    states: list[RunState] = []
    wanted = args.progress if args.json else display is None  # JSON lines if asked; text lines in a log
    lines = _ProgressLines(json=args.json) if wanted else None

    def watch(state: RunState) -> None:
        states[:] = [state]
        if display is not None:
            display.update(state)
        if lines is not None:
            lines.update(state)

    def notify(message: str) -> None:
        console.print(f"million run: {message}", highlight=False, markup=False, soft_wrap=True)

    try:
        with display or contextlib.nullcontext():
            result = trio.run(
                until_stopped, runner.run(config, watch=watch, notify=notify), clock=PreciseClock()
            )
    except (PluginError, StoreError) as exc:
        raise Failure(str(exc), 2) from None
    except (RunError, ClientError) as exc:
        raise Failure(str(exc), 1) from None
    if result is None:
        return _interrupted(config, states[0] if states else None)
    print(json.dumps(attrs.asdict(result)) if args.json else "\n".join(result_lines(result)))
    return 0


@attrs.define
class _ProgressLines:
    """Progress as lines: JSON objects on stdout every second (``--json --progress``), or
    a sentence on stderr every ``every`` s when there is no terminal for the live display."""

    json: bool
    last: float = attrs.field(factory=time.monotonic)

    @property
    def every(self) -> float:
        return 1.0 if self.json else 10.0

    def update(self, state: RunState) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        figures = state.figures()
        if self.json:
            print(json.dumps({"progress": figures}), flush=True)
        else:
            print(f"million run: {progress_line(figures)}", file=sys.stderr, flush=True)


def _interrupted(config: RunConfig, state: RunState | None) -> int:
    done = f"{state.done:,} of {state.partitions:,} partitions done" if state else "nothing done yet"
    print(f"million run: interrupted, {done}", file=sys.stderr)
    if state is not None and state.store is not None:
        print(f"resume with: million run {resume_args(config, state)}", file=sys.stderr)
    return 130


# --- million work -----------------------------------------------------------------------------


def work(args: argparse.Namespace) -> int:
    if args.processes > 1:
        command = bots.worker_command(
            args.reflector,
            args.run,
            args.bots,
            detach=args.detach,
            exit_with_parent=False,
            log_level=args.log_level,
        )
        env = bots.worker_env(args.token, args.cafile)
        trio.run(until_stopped, bots.run_worker_processes([command] * args.processes, env=env))
        return 0
    settings: dict[str, Any] = {"detach": args.detach, "token": args.token, "ssl_context": _client_tls(args)}
    if not args.exit_with_parent:  # a ``million run``'s own workers leave the telling to it
        settings["notify"] = _say_work
    if args.run is None:
        job = bots.run_lobby_bots(args.reflector, args.bots, **settings)
    else:
        job = bots.run_bots(args.reflector, args.run, args.bots, **settings)
    parent = os.getppid() if args.exit_with_parent else None
    try:
        answer = trio.run(partial(until_stopped, job, parent=parent), clock=PreciseClock())  # hooks run here
    except PluginError as exc:
        raise Failure(str(exc), 3) from None
    except ClientError as exc:
        raise Failure(str(exc), 1) from None
    except JoinError as exc:
        raise Failure(f"cannot join run {args.run}: {exc}", 1) from None
    except RunFailed as exc:
        if args.exit_with_parent:  # the ``million run`` that started this process says why
            return 0
        raise Failure(f"{str(exc).splitlines()[0]} (million run and million status say more)", 1) from None
    if answer is None:
        print("million work: stopped", file=sys.stderr)
    return 0


def _say_work(message: str) -> None:
    print(f"million work: {message}", file=sys.stderr, flush=True)


# --- million status ---------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    info = _read_reflector(args, "status", status_with_runs)
    print(json.dumps(info, indent=2) if args.json else "\n".join(status_lines(info)))
    return 0


# --- million credit ---------------------------------------------------------------------------


def credit(args: argparse.Namespace) -> int:
    identities = _read_reflector(args, "credit", ledger_identities)
    if identities is None:
        raise Failure("a view token may not read the ledger: give a token that may join (--token)", 1)
    print(json.dumps(identities, indent=2) if args.json else "\n".join(credit_lines(identities)))
    return 0


def _read_reflector(args: argparse.Namespace, label: str, read: Callable[[Client], Awaitable[T]]) -> T:
    """What ``read`` finds on ``--reflector``, within ``STATUS_TIMEOUT`` s; ``Failure`` if
    it cannot be reached or does not answer."""
    context = _client_tls(args)

    async def fetch() -> T:
        async with open_client(
            args.reflector, token=args.token, label=label, first_timeout=2, ssl_context=context
        ) as client:
            with trio.fail_after(STATUS_TIMEOUT):
                return await read(client)

    try:
        return trio.run(fetch)
    except (ClientError, JoinError, trio.TooSlowError) as exc:
        raise Failure(str(exc) or f"the reflector did not answer within {STATUS_TIMEOUT} s", 1) from None


# --- shared -----------------------------------------------------------------------------------


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context that trusts ``--cafile`` too."""
    try:
        return ssl_context(args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise Failure(f"cannot load --cafile {args.cafile}: {exc}", 2) from None


async def until_stopped(job: Awaitable[T], *, parent: int | None = None) -> T | None:
    """Await ``job``; None if SIGINT or SIGTERM comes first, or (given ``parent``) once
    that process is no longer this one's parent: nothing else tells the worker of a
    killed ``million run`` that it is on its own, and it would reconnect forever."""
    result: list[T] = []
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with tasks.open_nursery() as nursery:

            async def go() -> None:
                result.append(await job)
                nursery.cancel_scope.cancel()

            nursery.start_soon(go)
            if parent is not None:
                nursery.start_soon(_cancel_when_orphaned, parent, nursery.cancel_scope)
            await anext(signals)
            nursery.cancel_scope.cancel()
    return result[0] if result else None


async def _cancel_when_orphaned(parent: int, scope: trio.CancelScope) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110
        await trio.sleep(1)  # nothing tells a process that its parent died: look
    scope.cancel()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "reflector": reflector,
    "run": run,
    "work": work,
    "status": status,
    "credit": credit,
}
