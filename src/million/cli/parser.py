"""The flags of ``million`` and their types.

Defaults come from the config classes (``ReflectorConfig``, ``RunConfig``), where they
are written once; help texts show them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from million._version import __version__
from million.compute.runner import ADAPTIVE, RunConfig
from million.compute.tree import MAX_FAILURES
from million.relay.config import ReflectorConfig
from million.wire.transport import ENGINES

__all__ = ["LIMITS", "STORE", "build_parser"]

REFLECTOR = ReflectorConfig()
RUN = RunConfig(plugin="")
STORE = "million.db"  # the command keeps its sessions in a file; the library's default is in memory
PROCESSES = 1  # of ``million work``

#: Flags of the reflector's limits: (flag, ReflectorConfig field, what it bounds). See docs/security.md.
LIMITS = [
    ("--max-depth", "max_depth", "levels of nesting in join options and summaries"),
    ("--max-members", "max_members", "memberships of one session"),
    ("--max-open-sessions", "max_open_sessions", "sessions in memory: occupied or left lately"),
    (
        "--max-tail",
        "max_tail",
        "events a session keeps after its latest snapshot; beyond, it takes no publish or join",
    ),
    ("--max-tail-bytes", "max_tail_bytes", "bytes of those events"),
    ("--max-connections", "max_connections", "open client connections"),
    ("--max-connections-per-ip", "max_connections_per_ip", "open connections from one address"),
    ("--max-handshakes", "max_handshakes", "connections in their handshake at once"),
    (
        "--handshake-timeout",
        "handshake_timeout",
        "seconds for the websocket handshake, then again for the hello",
    ),
    ("--max-auth-failures", "max_auth_failures", "wrong tokens from one address per minute"),
    ("--max-queue-total", "max_queue_total", "bytes queued for all connections together"),
    ("--max-live", "max_live", "web page sockets open at once"),
    ("--live-lifetime", "live_lifetime", "seconds a web page socket lives"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="million", description="Run one computation over many partitions on workers that come and go."
    )
    parser.add_argument("--version", action="version", version=f"million {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _reflector(commands.add_parser("reflector", help="run a reflector that hosts sessions"))
    _run(commands.add_parser("run", help="run a computation and print its answer"))
    _work(commands.add_parser("work", help="run bots that work a run until it is done"))
    _observe(commands.add_parser("status", help="show a reflector's sessions, runs and credit"))
    _observe(commands.add_parser("credit", help="show the ledger: each identity's results, credit and trust"))
    return parser


def _reflector(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default=REFLECTOR.host, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=REFLECTOR.port, help="port to listen on (default: %(default)s)")
    add("--store", default=STORE, help="SQLite file for sessions, or :memory: (default: %(default)s)")
    add(
        "--tick-ms",
        type=_positive,
        default=REFLECTOR.tick_ms,
        help="tick interval of idle sessions (default: %(default)s)",
    )
    add(
        "--snapshot-every",
        type=_positive,
        default=REFLECTOR.snapshot_every,
        help="events between snapshot requests (default: %(default)s)",
    )
    add(
        "--max-frame",
        type=_positive,
        default=REFLECTOR.max_frame,
        help=f"largest frame accepted, bytes (default: {_bytes(REFLECTOR.max_frame)})",
    )
    add(
        "--max-queue",
        type=_positive,
        default=REFLECTOR.max_queue_bytes,
        help="bytes queued for one connection before it is dropped as too slow"
        f" (default: {_bytes(REFLECTOR.max_queue_bytes)})",
    )
    add(
        "--max-sessions",
        type=_positive,
        default=REFLECTOR.max_sessions_per_connection,
        help="sessions one connection may be in at once (default: %(default)s)",
    )
    add(
        "--max-rate",
        type=_positive,
        default=REFLECTOR.max_messages_per_s,
        help="cost units one connection may spend per second (a ping or a publish costs 1, a status"
        " more); beyond, it waits (default: %(default)s)",
    )
    add(
        "--max-summary",
        type=_positive,
        default=REFLECTOR.max_summary,
        help="bytes of one session summary (default: %(default)s)",
    )
    add(
        "--transport",
        choices=ENGINES,
        default=REFLECTOR.transport,
        help="websocket implementation serving clients (default: %(default)s)",
    )
    _security(parser)
    _limits(parser)


def _limits(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("limits", "each refusal is counted in /metrics (docs/security.md)")
    for flag, field, what in LIMITS:
        default = getattr(REFLECTOR, field)
        kind, metavar = (_positive, "N") if isinstance(default, int) else (_seconds, "SECONDS")
        help_text = f"{what} (default: %(default)s)"
        limits.add_argument(flag, dest=field, type=kind, default=default, metavar=metavar, help=help_text)


def _security(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--token-file",
        type=Path,
        help="file holding the secret clients must present (default: $MILLION_TOKEN, if set)",
    )
    add(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="identities, one a line: NAME ROLE TOKEN (ROLE admin: post and end runs; worker: join and"
        " compute; viewer: read only); each event is stamped with its publisher's identity",
    )
    add(
        "--view-token-file",
        type=Path,
        help="file holding a second secret that only reads: the web page and million status",
    )
    add(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a web origin whose pages may connect, e.g. https://example.org (repeatable;"
        " the reflector's own web port is allowed)",
    )
    add(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback address without a token: anyone who can reach it may join",
    )
    add(
        "--fsync",
        action="store_true",
        help="flush the store's journal to the disk before relaying: events survive a power cut,"
        " at the cost of a disk flush per batch",
    )
    add(
        "--http",
        type=int,
        metavar="PORT",
        default=REFLECTOR.http_port,
        help="also serve the live web page of the runs and /metrics on PORT (0: any free port)",
    )
    add("--certfile", type=Path, help="TLS certificate chain (PEM): serve wss://")
    add("--keyfile", type=Path, help="TLS private key (PEM), if not in --certfile")


def _run(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--plugin", required=True, help="the plugin (entry point in group 'million') to compute with")
    add(
        "--input",
        type=_json,
        default=RUN.input,
        help="the run's input as JSON, e.g. 3, '\"text\"' or [1, 2] (default: %(default)s)",
    )
    add("--partitions", type=_positive, default=RUN.partitions, help="partitions (default: %(default)s)")
    add(
        "--fanout",
        type=_fanout,
        default=RUN.fanout,
        help="partitions or children per session (default: %(default)s)",
    )
    add(
        "--option",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="a plugin option; VALUE is JSON where it parses as JSON (5, true, [1,2]), else text"
        " (repeatable)",
    )
    add("--name", default=RUN.name, help="name of the run (default: a fresh one); the same name resumes it")
    add("--store", default=RUN.store, help="store file of the embedded reflector (default: a temporary file)")
    add(
        "--reflector",
        default=RUN.reflector,
        help="URL of a running reflector (default: start one in this process)",
    )
    add(
        "--processes",
        type=_count,
        default=RUN.processes,
        help="local worker processes, each running --bots bots; 0 to only post and watch"
        " (default: one per core)",
    )
    add("--bots", type=_positive, default=RUN.bots, help="bots (workers) per process (default: %(default)s)")
    add("--no-work", dest="processes", action="store_const", const=0, help="only post the run and watch it")
    add(
        "--max-failures",
        type=_failures,
        default=RUN.max_failures,
        metavar="N",
        help="failed attempts at a partition, or at a session's prepare or collect step (its hook"
        " raised), before the run fails; another worker tries first (default: %(default)s)",
    )
    _no_detach(parser)
    _verification(parser)
    add("--json", action="store_true", help="print the result as one JSON object, with the run's credit")
    add(
        "--progress",
        action="store_true",
        help="with --json, also a JSON line of progress every second on stdout, before the result",
    )
    _client(parser)


def _verification(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verification", "of results from untrusted workers (docs/workers.md)")
    add = group.add_argument
    add(
        "--verify",
        type=_verify,
        default=RUN.verify,
        metavar=f"K|{ADAPTIVE}",
        help=f"distinct identities that must report the same value before it is taken; {ADAPTIVE}: two,"
        " or one the ledger trusts (default: %(default)s)",
    )
    add(
        "--max-copies",
        type=_positive,
        default=RUN.max_copies,
        metavar="N",
        help="identities a value may be asked of before the run fails for want of agreement (default: 2K+1)",
    )
    add(
        "--max-rejections",
        type=_count,
        default=RUN.max_rejections,
        metavar="N",
        help="rejected results beyond which an identity gets no more work in the run (default: %(default)s)",
    )


def _work(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--reflector", required=True, help="reflector URL, e.g. ws://127.0.0.1:8765")
    add("--run", help="work this run until it is done (default: the lobby's runs, until stopped)")
    add("--bots", type=_positive, default=RUN.bots, help="bots (workers) per process (default: %(default)s)")
    add("--processes", type=_positive, default=PROCESSES, help="worker processes (default: %(default)s)")
    add("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)  # see bots.worker_command
    _no_detach(parser)
    _client(parser)


def _observe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reflector",
        default=f"ws://{REFLECTOR.host}:{REFLECTOR.port}",
        help="reflector URL (default: %(default)s)",
    )
    _client(parser)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _no_detach(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-detach",
        dest="detach",
        action="store_false",
        default=RUN.detach,
        help="coordinators stay in the root while they work an interior child below it (they stay"
        " in other parents, and for leaves, anyway)",
    )


def _client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", default=os.environ.get("MILLION_TOKEN"), help="reflector token (default: $MILLION_TOKEN)"
    )
    parser.add_argument(
        "--cafile",
        default=os.environ.get("MILLION_CAFILE"),
        help="certificates (PEM) to trust for wss:// besides the system's (default: $MILLION_CAFILE)",
    )


def _bytes(count: int) -> str:
    return f"{count >> 20} MiB" if count and count % (1 << 20) == 0 else f"{count:,} bytes"


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


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


def _verify(text: str) -> int | str:
    if text == ADAPTIVE:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or {ADAPTIVE}, not {text}")
    return value


def _fanout(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, not {text}")
    return value


def _failures(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_FAILURES:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_FAILURES}, not {text}")
    return value


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        hint = (
            f"; for the text, quote it: --input '{json.dumps(text)}'" if text and text[0] not in "[{" else ""
        )
        raise argparse.ArgumentTypeError(f"not JSON ({exc}){hint}") from None


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
