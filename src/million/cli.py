"""The ``million`` command: thin argparse front ends over the library, returning exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from million import __version__
from million.client import ClientError, open_client
from million.reflector import ReflectorConfig, serve_reflector
from million.store import open_store
from million.transport import ENGINES

log = logging.getLogger("million")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.command(args)
    except KeyboardInterrupt:
        return 130


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
        "--transport",
        choices=ENGINES,
        default="sansio",
        help="websocket implementation serving clients (default: %(default)s)",
    )
    reflector.add_argument(
        "--token",
        default=os.environ.get("MILLION_TOKEN"),
        help="shared secret clients must present (default: $MILLION_TOKEN)",
    )
    reflector.set_defaults(command=_reflector)

    status = commands.add_parser("status", help="show a reflector's sessions")
    status.add_argument(
        "--reflector", default="ws://127.0.0.1:8765", help="reflector URL (default: %(default)s)"
    )
    status.add_argument("--token", default=os.environ.get("MILLION_TOKEN"))
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.set_defaults(command=_status)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


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
        token=args.token,
        transport=args.transport,
    )
    try:
        store = open_store(config.store)
    except Exception as exc:
        print(f"million reflector: cannot open store {config.store}: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signal, config, store)
    except OSError as exc:
        print(f"million reflector: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


async def _serve_until_signal(config: ReflectorConfig, store) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            reflector = await nursery.start(serve_reflector, config, store)
            print(
                f"million reflector {__version__} listening on {reflector.url} (store {store.path})",
                flush=True,
            )
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


def _status(args: argparse.Namespace) -> int:
    async def fetch() -> object:
        async with open_client(args.reflector, token=args.token, label="status", first_timeout=2) as client:
            with trio.fail_after(5):
                return await client.status()

    try:
        info = trio.run(fetch)
    except (ClientError, trio.TooSlowError) as exc:
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
            f"  {session['name']:30} {session['model']:20} participants {session['participants']:4}"
            f"  seq {session['seq']:8}  divergences {session['divergences']}"
        )
    return 0
