"""A hostile crowd beside a real run: the run stays right, the reflector small, honest clients connected.

    python benchmarks/hostile.py                                   # 100,000 partitions, 60 s of crowd
    python benchmarks/hostile.py --crowd-seconds 10 --partitions 10000
    python benchmarks/hostile.py --repeat 3 --token                # with a token: wrong-token hellos too
    python benchmarks/hostile.py --without counts --keep /tmp/soak # which attack breaks what; keep the logs
    nox -s bench -- hostile --crowd-seconds 30

Each soak: one ``million reflector`` process (SQLite store in a temporary directory,
default limits, ``--http 0`` unless ``--no-http``), two ``million work`` processes of
50 bots each taking their work from the lobby, and ``million run --no-work`` posting a
run (the demo plugin, fanout 100, input 1) and timing it to its answer. The run is
measured alone, then beside the crowd (``--repeat`` times each, alternating).

The crowd runs as trio tasks in this process, from another loopback address
(``--crowd-from``, 127.0.0.2, so that per-address limits and bans fall on it, not on the
honest clients), for ``--crowd-seconds``; the run starts ``--warmup`` seconds into it
(and may outlast it):

- ``--idle`` (500) TCP sockets that send nothing, reopened whenever the reflector closes them;
- ``--half-open`` (50) websocket handshakes never finished: the upgrade request without
  its blank line, then one more header every 2 s;
- ``--slowloris`` (20) readers that shake hands, say hello, join the run's root, its
  progress session and the crowd's noisy session, then never read (4 KiB receive buffer),
  and, with the web port, ``--live`` (20) page sockets (``/live``) that never read;
- ``--hostile`` (50) connections speaking the protocol in raw frames, each looping over
  (``--without ATTACK`` leaves one out):

  - ``counts``: progress ``leaf`` events counting 2**64-1 partitions, ``bots`` with huge counts;
  - ``huge-int``: integers beyond 64 bits as raw JSON text (publish data, refs, seqs);
  - ``forged``: snapshots and digests nobody asked for; summaries with seq 2**62 and
    4 KiB of data claiming absurd counts, and one byte more;
  - ``malformed``: frames that are not JSON, not messages, of wrong types or tags;
  - ``status-flood`` and ``ping-flood``: 5 status requests naming 1,000 summaries each,
    1,000 pings, per frame;
  - ``joins``: ``{}`` for a new session, other options for its own, the run's root and
    children, bad names, missing sessions;
  - ``memberships``: up to ``--memberships`` (1,000) each, new sessions and its own again;
  - ``noise``: 4 KiB events into the crowd's session (what fills the slowloris queues);
  - ``nested``: payloads 300 deep (publishes into its own and the run's sessions, join
    options, a summary, a snapshot state);
  - ``closing``: every 10 s, a frame over the size limit or a text frame that is not UTF-8;
  - beside the connection, every 2 s: ``bad-hello`` (wrong token, version 2, a join
    first, garbage, two hellos, a nested one) or ``origin``, a websocket opened with
    ``Origin: http://evil.example`` (403 expected) on the reflector's port and on ``/live``.

  The publishes go into the crowd's own sessions and into the run's root and progress
  session (joined without creating them). Every frame is followed by a ping (at most
  ``--window`` frames unanswered): the errors that arrive before its pong are that
  frame's. A connection the reflector closes is reopened. Per kind the report gives
  frames (or connections) sent, errors received by code, connections closed by the
  reflector and how (the rows ``connect`` and ``setup`` are the hostile connections
  themselves and their joins of the sessions they publish into).

Checks (exit status 1 if one fails): the run's answer is right (the partitions' count);
the reflector's peak RSS (VmHWM, and psutil sampled every 0.2 s) stays under 300 MiB;
no honest client was disconnected (the run and the bot processes log at ``--log-level
info``: every "connection to ... closed" / "lost" / "refused us" line counts) and none
failed (an exception in its log, a bot process gone before the end); the reflector is
alive. The reflector's own log (``closing connection ...: reason``, tracebacks) and its
counters (``million status``) are summarized. Writes benchmarks/results/hostile.json.

The crowd shares the machine's cores with the reflector and the honest processes: its
own CPU time is reported beside the run's times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import attrs
import msgspec
import orjson
import psutil
import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Origin
from websockets.uri import parse_uri

from million.compute.computation import Computation
from million.compute.progress import Progress, progress_session
from million.wire import codec
from million.wire.protocol import PROTOCOL_VERSION, Hello, Leave, Ping, StatusRequest
from relay import measured  # benchmarks/relay.py, beside this file

RESULTS = Path(__file__).resolve().parent / "results"
MILLION = [sys.executable, "-m", "million"]
RSS_LIMIT_MIB = 300
MiB = 1 << 20

RUN = "hostile-run"  # the honest run's name: its root session
PROGRESS = progress_session(RUN)
NOISE = "hostile-noise"  # the crowd's own busy session, which the slowloris readers join
BLOB = "hostile.blob"  # the model of the crowd's own sessions (the reflector never looks)
COMPUTATION = Computation.model_name
PROGRESS_MODEL = Progress.model_name
EVIL = "http://evil.example"

DEPTH = 300  # nesting of the nested payloads
HUGE = b"123456789012345678901234567890"  # an integer beyond 64 bits, as JSON text
U64 = 2**64 - 1
STATUS_NAMES = 1000  # summaries named by one status request
STATUS_PER_FRAME = 5
PINGS_PER_FRAME = 1000
MEMBERSHIP_BATCH = 100  # joins in one frame of the membership flood
NOISE_BYTES = 4096
SUMMARY_BYTES = 4096  # the reflector's default max_summary
CLOSE_EVERY = 10.0  # seconds between a hostile connection's oversized or non-UTF-8 frames
SIDE_EVERY = 2.0  # seconds between a hostile's bad hellos and foreign-origin probes
SETUP_EVERY = 1.0  # seconds between attempts to join the sessions a hostile publishes into
SCOUT_EVERY = 2.0  # seconds between decodings of a status reply for the run's session names
SLOW_RCVBUF = 4096  # receive buffer of the readers that never read
RECEIVE = 1 << 16
HANDSHAKE_WAIT = 15.0
RECONNECT = 0.2
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
TCP_ESTABLISHED = 1

#: What a hostile connection does (``--without`` leaves some out): on its connection, in
#: this order each round, then on connections of their own.
ATTACKS = (
    "counts",
    "huge-int",
    "forged",
    "malformed",
    "status-flood",
    "ping-flood",
    "joins",
    "memberships",
    "noise",
    "nested",
    "closing",
    "bad-hello",
    "origin",
)
SIDE_ATTACKS = {"bad-hello", "origin"}


# --- the honest side: reflector, bot processes, the run ----------------------------------


@attrs.define
class Reflector:
    popen: subprocess.Popen[bytes]
    url: str
    web: str | None  # the web port's address, http://host:port/
    log: Path


def start_reflector(workdir: Path, token_file: Path | None, http: bool) -> Reflector:
    """``million reflector`` with its defaults, a store in ``workdir``, on a free port."""
    log = workdir / "reflector.log"
    command = [*MILLION, "--log-level", "warning", "reflector", "--port", "0"]
    command += ["--store", str(workdir / "store.db")]
    command += ["--http", "0"] if http else []
    command += ["--token-file", str(token_file)] if token_file else []
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and popen.poll() is None:
        text = log.read_text(errors="replace")
        url = re.search(r"listening on (ws://\S+)", text)
        web = re.search(r"the runs are on (http://\S+)", text)
        if url and (web or not http):
            return Reflector(popen, url[1], web[1] if web else None, log)
        time.sleep(0.05)
    stop(popen)
    raise RuntimeError(f"the reflector did not start:\n{log.read_text(errors='replace')}")


def start_worker(url: str, index: int, workdir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A bot process taking its work from the lobby, logging its connections."""
    command = [*MILLION, "--log-level", "info", "work", "--reflector", url, "--bots", "50"]
    with (workdir / f"worker-{index}.log").open("wb") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)


async def run_honest(
    url: str, args: argparse.Namespace, workdir: Path, env: dict[str, str]
) -> dict[str, Any]:
    """``million run --no-work`` to its answer (or ``--run-timeout``)."""
    command = [*MILLION, "--log-level", "info", "run", "--reflector", url, "--no-work", "--plugin", "demo"]
    command += ["--partitions", str(args.partitions), "--fanout", str(args.fanout), "--name", RUN, "--json"]
    out = workdir / "run.json"
    with out.open("wb") as stdout, (workdir / "run.log").open("wb") as stderr:
        process = await trio.lowlevel.open_process(command, stdout=stdout, stderr=stderr, env=env)
    started = trio.current_time()
    try:
        with trio.move_on_after(args.run_timeout) as waiting:
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    timed_out = waiting.cancelled_caught
    wall = trio.current_time() - started
    try:
        result = json.loads(out.read_text())
    except ValueError:
        result = {}
    return {
        "returncode": process.returncode,
        "timed_out": timed_out,
        "answer": result.get("answer"),
        "elapsed_s": result.get("elapsed_s"),
        "wall_s": round(wall, 3),
    }


def stop(popen: subprocess.Popen[bytes]) -> int | None:
    """SIGINT, then SIGKILL after ``STOP_TIMEOUT``; the exit status (None if it was killed)."""
    if popen.poll() is not None:
        return popen.returncode
    popen.send_signal(signal.SIGINT)
    try:
        return popen.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
        return None


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0
    return int(found[1]) / 1024 if found else 0.0


@attrs.define
class RssSampler:
    """The reflector's RSS every 0.2 s: its peak and one sample per second."""

    process: psutil.Process
    peak_mib: float = 0.0
    timeline: list[tuple[float, float]] = attrs.Factory(list)  # (seconds, MiB)

    async def run(self) -> None:
        start, second = trio.current_time(), -1
        while True:
            try:
                rss = self.process.memory_info().rss / MiB
            except psutil.Error:
                return
            self.peak_mib = max(self.peak_mib, rss)
            elapsed = trio.current_time() - start
            if int(elapsed) > second:
                second = int(elapsed)
                self.timeline.append((round(elapsed, 1), round(rss, 1)))
            await trio.sleep(0.2)


def reflector_statistics(url: str, env: dict[str, str]) -> dict[str, Any] | None:
    """The reflector's counters, from ``million status``."""
    command = [*MILLION, "status", "--reflector", url, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True, env=env)
        statistics: dict[str, Any] = json.loads(done.stdout)["statistics"]
        return statistics
    except (subprocess.SubprocessError, ValueError, KeyError) as exc:
        print(f"million status failed: {exc}", file=sys.stderr)
        return None


DISCONNECT = re.compile(r"connection to \S+ (closed|lost)|refused us")


def honest_findings(workdir: Path) -> dict[str, Any]:
    """Disconnects and problems in the honest processes' logs."""
    found: dict[str, Any] = {}
    for log in sorted([workdir / "run.log", *workdir.glob("worker-*.log")]):
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        found[log.stem] = {
            "disconnects": [line for line in lines if DISCONNECT.search(line)][:10],
            "disconnect_count": sum(1 for line in lines if DISCONNECT.search(line)),
            "reflector_errors": sum("reflector error" in line for line in lines),
            "problems": [line for line in lines if re.search(r"ERROR|Traceback", line)][:5],
            "exceptions": [line for line in lines if re.match(r"[A-Za-z_.]*(Error|Exception)\b", line)][:5],
        }
    return found


def reflector_findings(log: Path) -> dict[str, Any]:
    """What the reflector said: connections it closed, by reason; other warnings and errors."""
    closing: Counter[str] = Counter()
    other: Counter[str] = Counter()
    tracebacks = 0
    for line in log.read_text(errors="replace").splitlines():
        if found := re.search(r"closing connection \S+: (.*)", line):
            closing[normalize(found[1])] += 1
        elif re.search(r"WARNING|ERROR|CRITICAL", line):
            other[normalize(line.split(": ", 1)[-1])] += 1
        tracebacks += bool(re.match(r"(  \+ Exception Group )?Traceback", line))
    return {
        "closed_by_reason": dict(closing.most_common(20)),
        "warnings_and_errors": dict(other.most_common(20)),
        "tracebacks": tracebacks,
    }


def normalize(text: str, limit: int = 90) -> str:
    """A message with its numbers and hex ids replaced, to count alike ones together."""
    return re.sub(r"\b[0-9a-f]{8}\b|\d+", "N", text)[:limit]


# --- a raw websocket -----------------------------------------------------------------------


@attrs.frozen
class Target:
    host: str
    port: int
    web_port: int | None
    token: str | None
    source: str  # the crowd's local address


class Closed(Exception):
    """The connection ended; ``code`` and ``reason`` of the reflector's close frame, if any."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class Refused(Exception):
    """The reflector answered the opening handshake or the hello with a refusal."""


async def open_tcp(target: Target, port: int | None = None, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.bind((target.source, 0))
        with trio.fail_after(HANDSHAKE_WAIT):
            await sock.connect((target.host, port or target.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def upgrade_request(host: str, port: int, path: str = "/", origin: str | None = None) -> ClientProtocol:
    ws = ClientProtocol(
        parse_uri(f"ws://{host}:{port}{path}"), origin=Origin(origin) if origin else None, max_size=None
    )
    ws.send_request(ws.connect())
    return ws


class RawSocket:
    """A client websocket that sends whatever it is given: websockets' sans-IO protocol
    over a trio stream. One task sends, another receives; what the protocol answers by
    itself (a close) goes out with the next send."""

    def __init__(self, stream: trio.SocketStream, ws: ClientProtocol) -> None:
        self.stream = stream
        self.ws = ws
        self.messages: deque[bytes] = deque()
        self.parts: list[bytes] = []
        self.eof = False

    @classmethod
    async def open(
        cls,
        target: Target,
        *,
        port: int | None = None,
        path: str = "/",
        origin: str | None = None,
        rcvbuf: int | None = None,
    ) -> RawSocket:
        stream = await open_tcp(target, port, rcvbuf)
        try:
            ws = upgrade_request(target.host, port or target.port, path, origin)
            await stream.send_all(b"".join(ws.data_to_send()))
            with trio.fail_after(HANDSHAKE_WAIT):
                while True:
                    data = await stream.receive_some(RECEIVE)
                    if not data:
                        raise Closed(1006, "closed during the opening handshake")
                    ws.receive_data(data)
                    events = ws.events_received()
                    if ws.handshake_exc is not None:
                        response = getattr(ws.handshake_exc, "response", None)
                        raise Refused(f"HTTP {getattr(response, 'status_code', '?')}")
                    if events:
                        break
            raw = cls(stream, ws)
            raw.take(events[1:])
            return raw
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def __aenter__(self) -> RawSocket:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, data: bytes, *, text: bool = False) -> None:
        if self.ws.state is not State.OPEN:
            raise self.closed()
        if text:
            self.ws.send_text(data)
        else:
            self.ws.send_binary(data)
        try:
            await self.stream.send_all(b"".join(self.ws.data_to_send()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self.closed() from None

    async def receive(self) -> bytes:
        while not self.messages:
            if self.eof or self.ws.close_rcvd is not None:
                raise self.closed()
            try:
                data = await self.stream.receive_some(RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data:
                self.ws.receive_data(data)
            else:
                self.eof = True
                self.ws.receive_eof()
            self.take(self.ws.events_received())
        return self.messages.popleft()

    def take(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                self.parts.append(bytes(event.data))
                if event.fin:
                    self.messages.append(b"".join(self.parts))
                    self.parts = []

    def closed(self) -> Closed:
        close = self.ws.close_rcvd
        return Closed(close.code, close.reason) if close else Closed(1006, "no close frame")

    def tcp_open(self) -> bool:
        return tcp_state(self.stream) in (None, TCP_ESTABLISHED)


async def until_closed(ws: RawSocket) -> None:
    """Wait, without reading, until the kernel says the reflector closed the connection."""
    while ws.tcp_open():  # noqa: ASYNC110  (nothing but polling tells it)
        await trio.sleep(1)


def tcp_state(stream: trio.SocketStream) -> int | None:
    """The kernel's TCP state of the socket (1: established), where Linux tells it."""
    try:
        return stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Read until the peer closes; the first bytes it sent, if any."""
    got = b""
    try:
        while data := await stream.receive_some(RECEIVE):
            got = (got + data)[:200]
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return got


def first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode(errors="replace")[:60] if data else "closed, nothing sent"


# --- frames --------------------------------------------------------------------------------


def dump(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def raw(value: bytes) -> orjson.Fragment:
    """JSON text spliced into a message as it is: huge integers, deep nesting."""
    return orjson.Fragment(value)


def frame(*messages: bytes) -> bytes:
    return b"[" + b",".join(messages) + b"]"


def publish(session: str, view: str, topic: str, data: bytes) -> bytes:
    return dump(type="publish", session=session, view=view, topic=topic, data=raw(data))


def join(ref: int, session: str, model: str, options: bytes = b"null", create: bool = True) -> bytes:
    return dump(type="join", ref=ref, session=session, model=model, options=raw(options), create=create)


def summary(session: str, view: str, seq: bytes, data: bytes) -> bytes:
    return dump(type="summary", session=session, view=view, seq=raw(seq), data=raw(data))


def snapshot(session: str, seq: int, state: bytes, digest: str) -> bytes:
    return dump(type="snapshot", session=session, seq=seq, state=raw(state), digest=digest)


def digest(session: str, seq: bytes, value: str) -> bytes:
    return dump(type="digest", session=session, seq=raw(seq), digest=value)


def nested(depth: int) -> bytes:
    """JSON ``depth`` levels deep: objects, then arrays."""
    half = depth // 2
    return b'{"a":' * half + b"[" * (depth - half) + b"1" + b"]" * (depth - half) + b"}" * half


def absurd_summary(size: int) -> bytes:
    """A run summary of exactly ``size`` bytes claiming absurd counts."""
    big = 2**63 - 1
    fields = {"run": RUN, "state": "done", "partitions": big, "completed": big, "rate": big, "workers": big}
    body = dump(**fields, answer="forged", pad="")
    return dump(**fields, answer="forged", pad="x" * (size - len(body)))


def status_names() -> list[str]:
    """1,000 session names for a status request: the run's, then its likely grandchildren."""
    names = [RUN, PROGRESS, *(f"{RUN}-{i}" for i in range(100))]
    names += [f"{RUN}-{i}-{j}" for i in range(100) for j in range(100)]
    return names[:STATUS_NAMES]


STATUS_FRAME = frame(*[codec.encode(StatusRequest(0, status_names()))] * STATUS_PER_FRAME)
PING_FRAME = frame(*[codec.encode(Ping(0))] * PINGS_PER_FRAME)
MALFORMED = [
    b"{not json",
    b'"a string"',
    b"[1,2,3]",
    b"[]",
    b'{"type":"publish"}',
    b'{"type":"publish","session":5,"view":"v1","topic":"x"}',
    b'{"type":"join","ref":1,"session":"x","model":"m","create":"yes"}',
    b'{"type":"event","session":"x","seq":1,"time":0,"view":"v1","topic":"t"}',
    b'{"type":"hello","version":1}',
    b'{"type":null}',
    b'{"ref":1}',
    b"[" + b",".join([b"null"] * 10_000) + b"]",
    b'{"type":"ping","ref":1.5}',
    b"\xff\xfe\x00garbage",
]

SMALL = 8192  # bytes under which a message from the reflector is decoded whole
FIRST_TYPE = re.compile(rb'\{"type":"([a-z-]+)"')
LAST_TYPE = re.compile(rb'"type":"([a-z-]+)"\}$')
FIELD = re.compile(rb'"(ref|session|view|code)":(\d+|"[^"]*")')
RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])


def messages_of(data: bytes) -> list[bytes]:
    """The messages of a frame, as encoded, without decoding them."""
    if data[:1] != b"[":
        return [data]
    try:
        return [bytes(item) for item in RAW_LIST.decode(data)]
    except msgspec.DecodeError:
        return [data]


def reply_of(message: bytes) -> dict[str, Any] | None:
    """What the reflector said, as a dict with at least ``type``; None for events and ticks.

    Small messages are decoded; of a large one (a sync, a status) only ``type``, ``ref``,
    ``session`` and ``view`` are read from its first bytes. A message's ``type`` is its
    first member or its last.
    """
    kind = FIRST_TYPE.match(message) or LAST_TYPE.search(message, max(0, len(message) - 40))
    if kind and kind[1] in (b"event", b"tick"):
        return None
    if len(message) <= SMALL:
        try:
            value = orjson.loads(message)
        except orjson.JSONDecodeError:
            return None
        return value if type(value) is dict else None
    reply: dict[str, Any] = {"type": kind[1].decode() if kind else None}
    for found in FIELD.finditer(message[:400]):
        key, value = found[1].decode(), found[2].decode()
        reply.setdefault(key, value.strip('"') if value.startswith('"') else int(value))
    return reply


# --- the crowd -----------------------------------------------------------------------------


@attrs.define
class Tally:
    """What one kind of attack did and what came back."""

    sent: int = 0  # frames, or connections opened
    errors: Counter[str] = attrs.Factory(Counter)  # error messages received, by code
    closed: int = 0  # connections the reflector closed
    closes: Counter[str] = attrs.Factory(Counter)  # how: close code and reason
    notes: Counter[str] = attrs.Factory(Counter)  # anything else worth counting
    lifetimes: list[float] = attrs.Factory(list)  # seconds connections lived until the reflector closed them

    def summary(self) -> dict[str, Any]:
        lives = sorted(self.lifetimes)
        return {
            "sent": self.sent,
            "errors": dict(self.errors.most_common()),
            "closed_by_reflector": self.closed,
            "closes": dict(self.closes.most_common(10)),
            "notes": dict(self.notes.most_common(12)),
            "lifetime_s": {
                "median": round(statistics.median(lives), 2),
                "max": round(lives[-1], 2),
            }
            if lives
            else None,
        }


class Crowd:
    """Idle sockets, half-open handshakes, slowloris readers and hostile connections."""

    def __init__(self, target: Target, args: argparse.Namespace) -> None:
        self.target = target
        self.args = args
        self.tallies: dict[str, Tally] = {}
        self.run_sessions: list[str] = []  # the run's sessions below its root, from a status reply
        self.scouted = -math.inf
        self.bugs: Counter[str] = Counter()

    def tally(self, kind: str) -> Tally:
        tally = self.tallies.get(kind)
        if tally is None:
            tally = self.tallies[kind] = Tally()
        return tally

    def bug(self, exc: BaseException) -> None:
        """An exception in the crowd's own code: reported once per kind, counted, survived."""
        name = f"{type(exc).__name__}: {exc}"[:120]
        if not self.bugs[name]:
            print(f"crowd: unexpected {name}", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
        self.bugs[name] += 1

    async def run(self, until: float) -> None:
        """Until ``until`` (trio's clock)."""
        args = self.args
        with trio.move_on_at(until):
            await self._run(args)

    async def _run(self, args: argparse.Namespace) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(args.idle):
                nursery.start_soon(self.guarded, self.idle)
            for _ in range(args.half_open):
                nursery.start_soon(self.guarded, self.half_open)
            for _ in range(args.slowloris):
                nursery.start_soon(self.guarded, self.slowloris)
            if self.target.web_port is not None:
                for _ in range(args.live):
                    nursery.start_soon(self.guarded, self.live_reader)
            for index in range(args.hostile):
                nursery.start_soon(self.guarded, Hostile(self, index).run)

    async def guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await task()
            except Exception as exc:
                self.bug(exc)
                await trio.sleep(1)

    def connect_failed(self, tally: Tally, exc: BaseException) -> None:
        if isinstance(exc, trio.TooSlowError):
            tally.notes["no answer to connect or handshake"] += 1
        elif isinstance(exc, OSError):
            tally.notes[f"connect failed: {exc.strerror or exc}"] += 1
        else:
            tally.notes[f"refused: {exc}"[:90]] += 1

    # --- sockets that say nothing or too little ------------------------------------------

    async def idle(self) -> None:
        """A TCP connection that never sends a byte, until the reflector closes it."""
        tally = self.tally("idle")
        try:
            stream = await open_tcp(self.target)
        except (OSError, trio.TooSlowError) as exc:
            self.connect_failed(tally, exc)
            await trio.sleep(1)
            return
        tally.sent += 1
        opened = trio.current_time()
        async with stream:
            answer = await read_until_closed(stream)
        tally.closed += 1
        tally.lifetimes.append(trio.current_time() - opened)
        tally.notes[first_line(answer)] += 1
        await trio.sleep(RECONNECT)

    async def half_open(self) -> None:
        """An upgrade request that never ends: one more header every 2 s."""
        tally = self.tally("half-open")
        request = b"".join(upgrade_request(self.target.host, self.target.port).data_to_send())
        try:
            stream = await open_tcp(self.target)
        except (OSError, trio.TooSlowError) as exc:
            self.connect_failed(tally, exc)
            await trio.sleep(1)
            return
        tally.sent += 1
        opened = trio.current_time()

        async def trickle() -> None:
            try:
                await stream.send_all(request[:-2])  # without the blank line that ends it
                for n in itertools.count():
                    await trio.sleep(2)
                    await stream.send_all(b"X-Slow-%d: 1\r\n" % n)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            answer = await read_until_closed(stream)
            nursery.cancel_scope.cancel()
        tally.closed += 1
        tally.lifetimes.append(trio.current_time() - opened)
        tally.notes[first_line(answer)] += 1
        await trio.sleep(RECONNECT)

    async def slowloris(self) -> None:
        """Handshake, hello, join busy sessions, then never read: a send queue that grows."""
        tally = self.tally("slowloris")
        try:
            ws = await RawSocket.open(self.target, rcvbuf=SLOW_RCVBUF)
        except (OSError, trio.TooSlowError, Closed, Refused) as exc:
            self.connect_failed(tally, exc)
            await trio.sleep(1)
            return
        tally.sent += 1
        opened = trio.current_time()
        async with ws:
            try:
                await greet(ws, self.target.token, "slowloris")
                joined = await self.join_all(
                    ws, [(RUN, COMPUTATION), (PROGRESS, PROGRESS_MODEL), (NOISE, BLOB)]
                )
                tally.notes[f"joined {joined} of 3 sessions, then stopped reading"] += 1
                for n in itertools.count():  # from here on, never read
                    await trio.sleep(1)
                    if not ws.tcp_open():
                        break
                    if n % 5 == 4:  # a reset shows on the next send
                        with trio.move_on_after(5):
                            await ws.send(codec.encode(Ping(0)))
            except (Closed, Refused, trio.TooSlowError) as exc:
                tally.closes[normalize(str(exc))] += 1
        tally.closed += 1
        tally.lifetimes.append(trio.current_time() - opened)
        await trio.sleep(RECONNECT)

    async def join_all(self, ws: RawSocket, sessions: list[tuple[str, str]]) -> int:
        """Join ``sessions`` (the run's without creating them), reading until they are in;
        one that does not exist yet is tried again every second, for 10 s."""
        refs = itertools.count(1)
        joined: set[str] = set()
        with trio.move_on_after(10):
            while len(joined) < len(sessions):
                pending: dict[int, str] = {}
                for session, model in sessions:
                    if session not in joined:
                        pending[ref := next(refs)] = session
                        await ws.send(frame(join(ref, session, model, create=session == NOISE)))
                with trio.move_on_after(1):
                    while pending:
                        for message in messages_of(await ws.receive()):
                            reply = reply_of(message) or {}
                            if reply.get("type") == "sync" and reply.get("ref") in pending:
                                joined.add(pending.pop(reply["ref"]))
                            elif reply.get("type") == "error" and type(reply.get("ref")) is int:
                                pending.pop(reply["ref"], None)  # not-found: tried again
                if len(joined) < len(sessions):
                    await trio.sleep(1)
        return len(joined)

    async def live_reader(self) -> None:
        """A web page socket (``/live``) that never reads what the page pushes."""
        tally = self.tally("live-slowloris")
        path = "/live" + (f"?token={self.target.token}" if self.target.token else "")
        try:
            ws = await RawSocket.open(self.target, port=self.target.web_port, path=path, rcvbuf=SLOW_RCVBUF)
        except (OSError, trio.TooSlowError, Closed, Refused) as exc:
            self.connect_failed(tally, exc)
            await trio.sleep(1)
            return
        tally.sent += 1
        opened = trio.current_time()
        async with ws:
            await until_closed(ws)
        tally.closed += 1
        tally.lifetimes.append(trio.current_time() - opened)
        await trio.sleep(RECONNECT)

    # --- the run's session names ---------------------------------------------------------

    def scout(self, message: bytes) -> None:
        """Now and then, the names of the run's occupied sessions from a status reply."""
        now = trio.current_time()
        if now - self.scouted < SCOUT_EVERY:
            return
        self.scouted = now
        try:
            sessions = orjson.loads(message)["info"]["sessions"]
            names = [s["name"] for s in sessions if s["name"].startswith(RUN + "-")]
        except (ValueError, KeyError, TypeError):
            return
        if names:
            self.run_sessions = names[-500:]


async def greet(ws: RawSocket, token: str | None, label: str) -> bytes:
    """Hello, and the welcome; ``Refused`` with the error code otherwise."""
    await ws.send(codec.encode(Hello(PROTOCOL_VERSION, token, label)))
    with trio.fail_after(HANDSHAKE_WAIT):
        reply = await ws.receive()
    message = reply_of(messages_of(reply)[0]) or {}
    if message.get("type") != "welcome":
        raise Refused(message.get("code") or f"no welcome: {reply[:60]!r}")
    return reply


BAD_HELLOS: list[tuple[str, bytes]] = [
    ("wrong token", codec.encode(Hello(PROTOCOL_VERSION, "not-the-token-" + "x" * 32, "hostile"))),
    ("version 2", codec.encode(Hello(2, None, "hostile"))),
    ("a join first", join(1, "hostile-first", BLOB)),
    ("garbage", b"\x00\xffnot json"),
    ("two hellos", frame(codec.encode(Hello(PROTOCOL_VERSION)), codec.encode(Hello(PROTOCOL_VERSION)))),
    ("nested hello", b'{"type":"hello","version":1,"client":' + nested(DEPTH) + b"}"),
]


class Hostile:
    """One hostile connection, reopened whenever the reflector closes it, with its side
    connections: bad hellos and foreign origins."""

    def __init__(self, crowd: Crowd, index: int) -> None:
        self.crowd = crowd
        self.index = index
        self.own = f"hostile-{index}"
        self.rng = random.Random(index)
        self.refs = itertools.count(1)
        self.n = 0  # names made so far
        self.frames = 0  # sent so far
        self.window = crowd.args.window
        self.max_frame = 1 << 20
        self.reset()

    def reset(self) -> None:
        """A new connection holds nothing."""
        self.inflight: deque[tuple[int, str]] = deque()  # (ping ref, kind of the frame before it)
        self.acked = trio.Event()
        self.last_kind = "connect"
        self.views: dict[str, str] = {}  # session -> a view held, for the sessions published into
        self.joins: dict[int, tuple[str, str]] = {}  # join ref -> (purpose, session)
        self.held: deque[tuple[str, str]] = deque()  # memberships of the membership flood
        self.to_leave: list[tuple[str, str]] = []  # memberships to end in the next round
        self.setup_at = -math.inf
        self.close_at = trio.current_time() + self.rng.uniform(0.5, 1.5) * CLOSE_EVERY
        self.close: Closed | None = None

    def name(self, tag: str) -> str:
        self.n += 1
        return f"{self.own}-{tag}{self.n}"

    def tally(self, kind: str) -> Tally:
        return self.crowd.tally(kind)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.crowd.guarded, self.side)
            while True:
                await self.connection()
                await trio.sleep(RECONNECT)

    async def connection(self) -> None:
        tally = self.tally("connect")
        try:
            ws = await RawSocket.open(self.crowd.target)
        except (OSError, trio.TooSlowError, Closed, Refused) as exc:
            self.crowd.connect_failed(tally, exc)
            await trio.sleep(1)
            return
        async with ws:
            try:
                welcome = await greet(ws, self.crowd.target.token, f"hostile-{self.index}")
            except (Closed, Refused, trio.TooSlowError) as exc:
                tally.notes[f"hello: {normalize(str(exc))}"] += 1
                await trio.sleep(1)
                return
            tally.sent += 1
            found = re.search(rb'"max_frame":(\d+)', welcome)
            self.max_frame = int(found[1]) if found else 1 << 20
            self.reset()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.reader, ws, nursery.cancel_scope)
                try:
                    await self.sender(ws)
                except Closed as closed:
                    self.close = self.close or closed
                    await trio.sleep(2)  # for the reader to see the close frame and its reason
                nursery.cancel_scope.cancel()
        kind = self.inflight[0][1] if self.inflight else self.last_kind
        ending = self.close or Closed(1006, "no close frame")
        self.tally(kind).closed += 1
        self.tally(kind).closes[f"{ending.code} {normalize(ending.reason)}"] += 1

    # --- reading -------------------------------------------------------------------------

    async def reader(self, ws: RawSocket, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await ws.receive()
                for message in messages_of(data):
                    self.handle(message)
        except Closed as closed:
            self.close = closed
        scope.cancel()

    def handle(self, message: bytes) -> None:
        reply = reply_of(message)
        if reply is None:
            return
        kind, ref = reply.get("type"), reply.get("ref")
        if kind == "error":
            cause = self.inflight[0][1] if self.inflight else self.last_kind
            self.tally(cause).errors[str(reply.get("code"))] += 1
        elif kind == "pong" and type(ref) is int and ref > 0:  # (ref 0: the ping flood's)
            while self.inflight and self.inflight[0][0] <= ref:
                self.inflight.popleft()
            self.acked.set()
        elif kind == "sync" and type(ref) is int:
            purpose, session = self.joins.pop(ref, ("", ""))
            view = str(reply.get("view"))
            if purpose == "hold":
                self.views[session] = view
            elif purpose == "flood":
                self.held.append((session, view))
            else:
                self.to_leave.append((str(reply.get("session")), view))
        elif kind == "pong":
            self.tally("ping-flood").notes["pongs"] += 1
        elif kind == "status-info":
            self.tally("status-flood").notes["status replies"] += 1
            self.tally("status-flood").notes["KiB of status replies"] += len(message) // 1024
            self.crowd.scout(message)
        elif kind in ("snapshot-request", "digest-request"):
            self.tally("forged").notes[f"{kind}s received, never answered"] += 1

    # --- sending -------------------------------------------------------------------------

    async def send(self, ws: RawSocket, kind: str, data: bytes, *, text: bool = False) -> None:
        """Send a frame, then a ping whose pong closes its errors; at most ``window`` unanswered."""
        while len(self.inflight) >= self.window:
            self.acked = trio.Event()
            await self.acked.wait()
        self.last_kind = kind
        self.tally(kind).sent += 1
        self.frames += 1
        await ws.send(data, text=text)
        ref = next(self.refs)
        self.inflight.append((ref, kind))
        await ws.send(codec.encode(Ping(ref)))

    def join_ref(self, purpose: str, session: str) -> int:
        ref = next(self.refs)
        if len(self.joins) > 100_000:  # refused joins leave their ref behind
            self.joins.clear()
        self.joins[ref] = (purpose, session)
        return ref

    def targets(self) -> list[tuple[str, str]]:
        """(session, view) of the sessions published into: its own and the run's."""
        return [(s, self.views[s]) for s in (self.own, RUN, PROGRESS) if s in self.views]

    async def sender(self, ws: RawSocket) -> None:
        attacks = {  # what may cost the connection comes last in the round
            "counts": self.counts,
            "huge-int": self.huge_integers,
            "forged": self.forged,
            "malformed": self.malformed,
            "status-flood": self.status_flood,
            "ping-flood": self.ping_flood,
            "joins": self.bad_joins,
            "memberships": self.memberships,
            "noise": self.noise,
            "nested": self.nested,
            "closing": self.closing,
        }
        assert set(attacks) | SIDE_ATTACKS == set(ATTACKS)
        chosen = [attack for name, attack in attacks.items() if name not in self.crowd.args.without]
        while True:
            before = self.frames
            await self.setup(ws)
            for attack in chosen:
                await attack(ws)
            if self.frames == before:  # nothing to do this round (``--without`` every attack)
                await trio.sleep(SETUP_EVERY)

    async def setup(self, ws: RawSocket) -> None:
        """Join the sessions published into (the run's without creating them), now and then."""
        now = trio.current_time()
        if now - self.setup_at < SETUP_EVERY:
            return
        self.setup_at = now
        wanted = [(self.own, BLOB, True), (NOISE, BLOB, True), (RUN, COMPUTATION, False)]
        wanted.append((PROGRESS, PROGRESS_MODEL, False))
        joins = [
            join(self.join_ref("hold", session), session, model, create=create)
            for session, model, create in wanted
            if session not in self.views
        ]
        if joins:
            await self.send(ws, "setup", frame(*joins))
            while self.inflight:  # the syncs are in before the first attack
                self.acked = trio.Event()
                await self.acked.wait()

    async def nested(self, ws: RawSocket) -> None:
        """Payloads 300 deep, in an order of its own each round: on a reflector that cannot
        take them, the first may cost the connection."""
        deep = nested(DEPTH)
        frames = [
            ("nested publish", publish(session, view, "hostile", deep)) for session, view in self.targets()
        ]
        if view := self.views.get(self.own):
            frames.append(("nested summary", summary(self.own, view, b"1", deep)))
        frames.append(("nested snapshot", snapshot(self.own, 1, deep, "nested")))
        name = self.name("n")
        frames.append(("nested join", join(self.join_ref("probe", name), name, BLOB, deep)))
        self.rng.shuffle(frames)
        for kind, message in frames:
            await self.send(ws, kind, frame(message))

    async def huge_integers(self, ws: RawSocket) -> None:
        data = b'{"n":' + HUGE + b',"m":-' + HUGE + b',"u":18446744073709551616}'
        for session, view in self.targets():
            await self.send(ws, "huge-int", frame(publish(session, view, "hostile", data)))
            await self.send(ws, "huge-int", frame(publish(session, view, "hostile", b"9" * 400)))
        name = self.name("h")
        bad_ref = b'{"type":"join","ref":' + HUGE + b',"session":"' + name.encode() + b'","model":"m"}'
        await self.send(ws, "huge-int", frame(bad_ref))
        await self.send(ws, "huge-int", frame(b'{"type":"ping","ref":' + HUGE + b"}"))
        if own_view := self.views.get(self.own):
            await self.send(ws, "huge-int", frame(summary(self.own, own_view, HUGE, b"1")))
        await self.send(ws, "huge-int", frame(digest(self.own, b"18446744073709551616", "huge")))

    async def counts(self, ws: RawSocket) -> None:
        """Progress events claiming 2**64-1 partitions done and bots at work."""
        if view := self.views.get(PROGRESS):
            name = f"{RUN}-{self.n % 100}-h{self.index}x{self.n}"
            self.n += 1
            leaf = publish(PROGRESS, view, "leaf", dump(name=name, count=U64))
            await self.send(ws, "counts", frame(leaf))
            await self.send(ws, "counts", frame(publish(PROGRESS, view, "bots", str(U64).encode())))
            await self.send(ws, "counts", frame(publish(PROGRESS, view, "bots", HUGE)))

    async def status_flood(self, ws: RawSocket) -> None:
        await self.send(ws, "status-flood", STATUS_FRAME)

    async def ping_flood(self, ws: RawSocket) -> None:
        await self.send(ws, "ping-flood", PING_FRAME)

    async def bad_joins(self, ws: RawSocket) -> None:
        """``{}`` for a new session, other options for its own and the run's, bad names,
        missing sessions; and leaving what the probes joined."""
        joins = []
        name = self.name("j")
        joins.append(join(self.join_ref("probe", name), name, BLOB, b"{}"))
        joins.append(join(next(self.refs), self.own, BLOB, dump(other=self.n)))
        if RUN in self.views:  # the root exists: {} cannot create it
            joins.append(join(next(self.refs), RUN, COMPUTATION, b"{}"))
        if self.crowd.run_sessions:  # children that exist: {} cannot create them
            child = self.rng.choice(self.crowd.run_sessions)
            joins.append(join(next(self.refs), child, COMPUTATION, b"{}"))
            joins.append(join(next(self.refs), child, COMPUTATION, dump(plugin="evil", partitions=U64)))
            child = self.rng.choice(self.crowd.run_sessions)
            joins.append(join(self.join_ref("probe", child), child, COMPUTATION, create=False))
        for bad in ("", "x" * 201, "no spaces here", "ünïcode"):
            joins.append(join(next(self.refs), bad, BLOB))
        joins.append(join(next(self.refs), self.name("missing"), BLOB, create=False))
        for session, view in self.to_leave:
            joins.append(codec.encode(Leave(session, view)))
        self.to_leave = []
        await self.send(ws, "joins", frame(*joins))

    async def memberships(self, ws: RawSocket) -> None:
        """Up to ``--memberships``: new sessions, and its own session over and over."""
        cap = self.crowd.args.memberships
        if len(self.held) + MEMBERSHIP_BATCH > cap:
            batch = [self.held.popleft() for _ in range(min(MEMBERSHIP_BATCH, len(self.held)))]
            if batch:
                await self.send(ws, "memberships", frame(*[codec.encode(Leave(s, v)) for s, v in batch]))
        if len(self.held) + MEMBERSHIP_BATCH <= cap:
            joins = []
            for k in range(MEMBERSHIP_BATCH):
                session = self.name("m") if k % 2 else self.own
                joins.append(join(self.join_ref("flood", session), session, BLOB))
            await self.send(ws, "memberships", frame(*joins))

    async def forged(self, ws: RawSocket) -> None:
        """Snapshots and digests nobody asked for; summaries from the far future."""
        seq = self.rng.randrange(1, 1 << 20)
        state = dump(blob="s" * 65536)
        await self.send(ws, "forged", frame(snapshot(self.own, seq, state, "forged")))
        await self.send(ws, "forged", frame(snapshot(RUN, seq, dump(done=True, output=0), "forged")))
        digests = [digest(session, str(seq).encode(), "forged") for session in (self.own, RUN, PROGRESS)]
        await self.send(ws, "forged", frame(*digests))
        far = str(2**62).encode()
        for session, view in self.targets():
            await self.send(ws, "forged", frame(summary(session, view, far, absurd_summary(SUMMARY_BYTES))))
        if own_view := self.views.get(self.own):
            too_big = absurd_summary(SUMMARY_BYTES + 1)
            await self.send(ws, "forged", frame(summary(self.own, own_view, far, too_big)))

    async def malformed(self, ws: RawSocket) -> None:
        for data in MALFORMED:
            await self.send(ws, "malformed", data)
        await self.send(ws, "malformed", codec.encode(Ping(0)), text=True)  # a text frame: allowed

    async def noise(self, ws: RawSocket) -> None:
        if view := self.views.get(NOISE):
            await self.send(ws, "noise", frame(publish(NOISE, view, "noise", dump(blob="n" * NOISE_BYTES))))

    async def closing(self, ws: RawSocket) -> None:
        """Every 10 s: a frame one byte over the limit, or a text frame that is not UTF-8."""
        if trio.current_time() < self.close_at:
            return
        self.close_at = trio.current_time() + CLOSE_EVERY
        if self.rng.random() < 0.5:
            pad = self.max_frame + 1 - len(b'[{"type":"ping","ref":0,"pad":""}]')
            await self.send(ws, "oversize", b'[{"type":"ping","ref":0,"pad":"' + b"x" * pad + b'"}]')
        else:
            await self.send(ws, "bad-utf8", b'{"type":"ping","ref":0,"x":"\xff\xfe"}', text=True)

    # --- side connections ----------------------------------------------------------------

    async def side(self) -> None:
        """Every 2 s, a bad hello or a foreign origin, on fresh connections."""
        without = self.crowd.args.without
        for n in itertools.count():
            await trio.sleep(SIDE_EVERY * self.rng.uniform(0.5, 1.5))
            if n % 2 == 0 and "bad-hello" not in without:
                await self.bad_hello(BAD_HELLOS[(n // 2 + self.index) % len(BAD_HELLOS)])
            elif n % 2 == 1 and "origin" not in without:
                web = self.crowd.target.web_port is not None and (n // 2) % 2 == 1
                await self.foreign_origin(web)

    async def bad_hello(self, variant: tuple[str, bytes]) -> None:
        what, data = variant
        tally = self.tally("bad-hello")
        try:
            ws = await RawSocket.open(self.crowd.target)
        except (OSError, trio.TooSlowError, Closed, Refused) as exc:
            self.crowd.connect_failed(tally, exc)
            return
        tally.sent += 1
        async with ws:
            try:
                await ws.send(data)
                with trio.fail_after(HANDSHAKE_WAIT):
                    while True:
                        for message in messages_of(await ws.receive()):
                            reply = reply_of(message) or {}
                            if reply.get("type") == "error":
                                tally.errors[str(reply.get("code"))] += 1
                                tally.notes[f"{what}: {reply.get('code')}"] += 1
                            elif reply.get("type") == "welcome":
                                tally.notes[f"{what}: welcome"] += 1
                                return
            except Closed as closed:
                tally.closed += 1
                tally.closes[f"{closed.code} {normalize(closed.reason)}"] += 1
            except trio.TooSlowError:
                tally.notes[f"{what}: no answer"] += 1

    async def foreign_origin(self, web: bool) -> None:
        """A websocket opened from another site's page: the reflector's port, or ``/live``."""
        target = self.crowd.target
        tally = self.tally("origin")
        where = "web /live" if web else "reflector port"
        tally.sent += 1
        try:
            ws = await RawSocket.open(
                target, port=target.web_port if web else None, path="/live" if web else "/", origin=EVIL
            )
        except Refused as refused:
            tally.notes[f"{where}: {refused}"] += 1
            return
        except (OSError, trio.TooSlowError, Closed) as exc:
            tally.notes[f"{where}: {normalize(str(exc))}"] += 1
            return
        async with ws:
            tally.notes[f"{where}: accepted (HTTP 101)"] += 1
            if not web:
                try:
                    await greet(ws, target.token, "evil-origin")
                    tally.notes[f"{where}: welcomed"] += 1
                except (Closed, Refused, trio.TooSlowError) as exc:
                    tally.notes[f"{where}: hello {normalize(str(exc))}"] += 1


# --- one soak --------------------------------------------------------------------------------


def soak(args: argparse.Namespace, workdir: Path, crowd: bool, token: str | None) -> dict[str, Any]:
    """A fresh reflector and bot processes, the run, with or without the crowd."""
    workdir.mkdir()
    env = dict(os.environ)
    token_file = None
    if token is not None:
        env["MILLION_TOKEN"] = token
        token_file = workdir / "token"
        token_file.write_text(token)
    reflector = start_reflector(workdir, token_file, http=not args.no_http)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers = [start_worker(reflector.url, index, workdir, env) for index in range(2)]
        driven = trio.run(drive, reflector, args, workdir, env, crowd, token)
        workers_alive = [worker.poll() is None for worker in workers]
        driven["reflector_statistics"] = reflector_statistics(reflector.url, env)
        driven["reflector_alive"] = reflector.popen.poll() is None
        driven["reflector_peak_rss_mib"] = round(
            max(peak_rss_mib(reflector.popen.pid), driven.pop("sampled_peak_mib")), 1
        )
    finally:
        worker_exits = [stop(worker) for worker in workers]
        reflector_exit = stop(reflector.popen)
    store = sum(path.stat().st_size for path in workdir.glob("store.db*"))
    honest = honest_findings(workdir)
    return {
        "crowd": crowd,
        **driven,
        "workers_alive_at_end": workers_alive,
        "exit_codes": {"workers": worker_exits, "reflector": reflector_exit},
        "store_mib": round(store / MiB, 1),
        "honest_disconnects": sum(found["disconnect_count"] for found in honest.values()),
        "honest_exceptions": [
            f"{who}: {line}" for who, found in honest.items() for line in found["exceptions"]
        ],
        "honest": honest,
        "reflector_log": reflector_findings(reflector.log),
    }


async def drive(
    reflector: Reflector,
    args: argparse.Namespace,
    workdir: Path,
    env: dict[str, str],
    with_crowd: bool,
    token: str | None,
) -> dict[str, Any]:
    """The run, with the crowd from ``warmup`` seconds before it to ``crowd_seconds`` after
    the crowd started (the run may outlast it); the reflector's RSS sampled throughout."""
    sampler = RssSampler(psutil.Process(reflector.popen.pid))
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    crowd = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        started = trio.current_time()
        if with_crowd:
            parts = urlsplit(reflector.url)
            web = urlsplit(reflector.web).port if reflector.web else None
            target = Target(parts.hostname or "127.0.0.1", parts.port or 0, web, token, args.crowd_from)
            crowd = Crowd(target, args)
            nursery.start_soon(crowd.run, started + args.crowd_seconds)
        await trio.sleep(args.warmup)  # the bot processes join the lobby; the crowd gathers
        run_started = trio.current_time() - started
        run = await run_honest(reflector.url, args, workdir, env)
        run_ended = trio.current_time() - started
        if crowd is not None:
            await trio.sleep_until(started + args.crowd_seconds)
        nursery.cancel_scope.cancel()
    result: dict[str, Any] = {
        "run": run,
        "answer_right": run["answer"] == args.partitions and run["returncode"] == 0,
        "sampled_peak_mib": sampler.peak_mib,
        "rss_timeline_mib": sampler.timeline,
        "run_started_s": round(run_started, 2),
        "run_ended_s": round(run_ended, 2),
    }
    if crowd is not None:
        result["crowd_seconds"] = args.crowd_seconds
        result["run_outlasted_crowd"] = run_ended > args.crowd_seconds
        result["crowd_cpu_s"] = round(sum(me.cpu_times()[:2]) - cpu_before, 1)
        result["crowd_bugs"] = dict(crowd.bugs)
        result["attacks"] = {kind: tally.summary() for kind, tally in sorted(crowd.tallies.items())}
    return result


# --- the report ------------------------------------------------------------------------------


def print_soak(row: dict[str, Any]) -> None:
    run = row["run"]
    label = "with the crowd" if row["crowd"] else "alone"
    elapsed = f"{run['elapsed_s']:.2f} s" if run["elapsed_s"] is not None else "no answer"
    if run["timed_out"]:
        elapsed = "timed out"
    right = "right" if row["answer_right"] else "WRONG"
    line = (
        f"{label:>15}: run {elapsed} (answer {run['answer']!r}, {right})"
        f"  reflector peak {row['reflector_peak_rss_mib']:.0f} MiB"
        f"  honest disconnects {row['honest_disconnects']}  store {row['store_mib']:.0f} MiB"
    )
    replies = sum(found["reflector_errors"] for found in row["honest"].values())
    if replies:
        print(f"{'':>17}honest clients received {replies} error replies (see their logs)")
    for exception in row["honest_exceptions"]:
        print(f"{'':>17}{exception}")
    if row["crowd"]:
        line += f"  crowd CPU {row['crowd_cpu_s']:.0f} s"
        if row["run_outlasted_crowd"]:
            line += "  (the run outlasted the crowd)"
    print(line, flush=True)


def print_attacks(row: dict[str, Any]) -> None:
    print(f"\n{'kind':<15}{'sent':>9}{'closed':>8}  errors received by code / what else came back")
    for kind, tally in row["attacks"].items():
        errors = ", ".join(f"{code} {count:,}" for code, count in tally["errors"].items())
        notes = "; ".join(f"{note} x{count:,}" for note, count in list(tally["notes"].items())[:3])
        lives = tally["lifetime_s"]
        life = f"lived median {lives['median']:.1f} s, max {lives['max']:.1f} s" if lives else ""
        detail = " | ".join(part for part in (errors, life, notes) if part)
        print(f"{kind:<15}{tally['sent']:>9,}{tally['closed_by_reflector']:>8,}  {detail}"[:220])
        closes = ", ".join(f"{reason} x{count}" for reason, count in list(tally["closes"].items())[:3])
        if closes:
            print(f"{'':<32}closed: {closes}"[:220])
    log = row["reflector_log"]
    if log["closed_by_reason"]:
        reasons = ", ".join(f"{reason} x{n:,}" for reason, n in list(log["closed_by_reason"].items())[:5])
        print(f"reflector closed: {reasons}")
    if log["warnings_and_errors"] or log["tracebacks"]:
        other = ", ".join(f"{line} x{n:,}" for line, n in list(log["warnings_and_errors"].items())[:5])
        print(f"reflector log: {log['tracebacks']} tracebacks; {other}")
    stats = row["reflector_statistics"] or {}
    if stats:
        keys = ("errors", "throttled", "refused", "events", "frames_in", "bytes_in", "bytes_out")
        print("reflector counters: " + ", ".join(f"{key} {stats[key]}" for key in keys if key in stats))


def checks(rows: list[dict[str, Any]]) -> list[str]:
    """What failed, in words."""
    failed = []
    for index, row in enumerate(rows):
        label = f"soak {index + 1} ({'with the crowd' if row['crowd'] else 'alone'})"
        if not row["answer_right"]:
            run = row["run"]
            failed.append(f"{label}: wrong answer {run['answer']!r} (exit {run['returncode']})")
        if row["reflector_peak_rss_mib"] >= RSS_LIMIT_MIB:
            failed.append(f"{label}: reflector peak RSS {row['reflector_peak_rss_mib']:.0f} MiB")
        if row["honest_disconnects"]:
            failed.append(f"{label}: {row['honest_disconnects']} honest disconnects")
        if not row["reflector_alive"]:
            failed.append(f"{label}: the reflector died")
        if not all(row["workers_alive_at_end"]):
            failed.append(f"{label}: a bot process ended before the soak did")
        if row["honest_exceptions"]:
            failed.append(f"{label}: honest processes failed ({row['honest_exceptions'][0]})")
    return failed


def median_of(rows: list[dict[str, Any]], crowd: bool) -> float | None:
    times = [row["run"]["elapsed_s"] for row in rows if row["crowd"] == crowd and row["answer_right"]]
    return statistics.median(times) if times else None


def closing_note(rows: list[dict[str, Any]], args: argparse.Namespace, failed: list[str]) -> str:
    alone, crowded = median_of(rows, False), median_of(rows, True)
    peak = {
        crowd: max(row["reflector_peak_rss_mib"] for row in rows if row["crowd"] is crowd)
        for crowd in (False, True)
    }
    times = (
        f"{alone:.2f} s alone, {crowded:.2f} s beside the crowd ({crowded / alone:.1f}x)"
        if alone and crowded
        else f"alone {alone}, beside the crowd {crowded} (a run without the right answer is left out)"
    )
    disconnects = sum(row["honest_disconnects"] for row in rows)
    verdict = "PASSED" if not failed else "FAILED: " + "; ".join(failed)
    return (
        f"{args.partitions:,} partitions, fanout {args.fanout}, median of {args.repeat}: {times}."
        f" Reflector peak RSS {peak[False]:.0f} MiB alone, {peak[True]:.0f} MiB with the crowd"
        f" (limit {RSS_LIMIT_MIB}). Honest disconnects: {disconnects}. {verdict}"
    )


def usable_source(address: str) -> str:
    """``address`` if this machine can connect from it (any 127.x.y.z on Linux), else 127.0.0.1."""
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
        return address
    except OSError:
        print(f"cannot connect from {address}; the crowd comes from 127.0.0.1", file=sys.stderr)
        return "127.0.0.1"


def raise_file_limit() -> None:
    """A thousand sockets in the crowd, as many in the reflector (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--partitions", type=int, default=100_000, help="partitions of the run (default: %(default)s)")
    add("--fanout", type=int, default=100, help="(default: %(default)s)")
    add("--crowd-seconds", type=float, default=60.0, help="how long the crowd lasts (default: %(default)s)")
    add("--warmup", type=float, default=3.0, help="seconds between the crowd's start and the run's")
    add("--repeat", type=int, default=1, help="soaks alone and with the crowd, alternating (default: 1 each)")
    add("--hostile", type=int, default=50, help="hostile protocol connections (default: %(default)s)")
    add("--idle", type=int, default=500, help="idle TCP sockets (default: %(default)s)")
    add("--half-open", type=int, default=50, help="unfinished websocket handshakes (default: %(default)s)")
    add("--slowloris", type=int, default=20, help="connections that never read (default: %(default)s)")
    add("--live", type=int, default=20, help="web page sockets that never read (default: %(default)s)")
    add(
        "--memberships",
        type=int,
        default=1000,
        help="memberships per hostile connection (default: %(default)s)",
    )
    add(
        "--window",
        type=int,
        default=1,
        help="frames a hostile connection may have unanswered (default: %(default)s); beyond 1, errors"
        " and closes are put down to the oldest unanswered frame, not always their cause",
    )
    add(
        "--without",
        action="append",
        default=[],
        choices=ATTACKS,
        metavar="ATTACK",
        help=f"leave out an attack of the hostile connections (repeatable): {', '.join(ATTACKS)}",
    )
    add("--token", action="store_true", help="run the reflector with a token (and send wrong ones)")
    add("--no-http", action="store_true", help="no web port: no /live sockets")
    add("--crowd-from", default="127.0.0.2", help="the crowd's source address (default: %(default)s)")
    add("--run-timeout", type=float, default=600.0, help="seconds before a run counts as failed")
    add("--output", type=Path, default=RESULTS / "hostile.json", help="JSON results file")
    add("--keep", type=Path, help="keep the soaks' logs and stores in this directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.crowd_from = usable_source(args.crowd_from)
    raise_file_limit()
    token = secrets.token_urlsafe(32) if args.token else None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="million-hostile-") as tmp:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        for index in range(args.repeat):
            for crowd in (False, True):
                what = f"with a crowd for {args.crowd_seconds:g} s" if crowd else "alone"
                print(f"soak {index + 1}: {args.partitions:,} partitions {what} ...", flush=True)
                try:
                    row = soak(args, Path(tmp) / f"{index}-{'crowd' if crowd else 'alone'}", crowd, token)
                except KeyboardInterrupt:
                    print("interrupted", file=sys.stderr)
                    return 130
                rows.append(row)
                print_soak(row)
                if crowd:
                    print_attacks(row)
                    print()
    failed = checks(rows)
    note = closing_note(rows, args, failed)
    result = {
        "benchmark": "hostile",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
        "million": measured(),
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "soaks": rows,
        "failed": failed,
        "note": note,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(note)
    print(f"written to {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
