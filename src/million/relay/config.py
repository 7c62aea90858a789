"""The reflector's settings and its counters. Every default is written here, once."""

from __future__ import annotations

import ipaddress
import re
import ssl

import attrs

from million.wire.protocol import DEFAULT_MAX_FRAME

TRANSPORTS = ("sansio", "trio-websocket")
MIN_TOKEN = 16  # characters: a shorter token could be guessed online
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # of an identity


ROLES = ("admin", "worker", "viewer")  # post and end runs; join and compute; read only


class ConfigError(ValueError):
    """Settings the reflector refuses to run with; the message says why and what to do."""


@attrs.frozen
class Identity:
    """Someone the reflector knows by a token of their own (``--tokens FILE``)."""

    name: str
    role: str  # one of ROLES
    token: str

    @property
    def stamp(self) -> str:
        """What the reflector stamps on the events it publishes: ``ROLE:NAME``."""
        return f"{self.role}:{self.name}"


def read_identities(text: str, source: str = "the tokens file") -> tuple[Identity, ...]:
    """Identities from lines ``NAME ROLE TOKEN`` (blank lines and ``#`` comments skipped);
    ``ConfigError`` names the first bad line."""
    identities = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3 or fields[1] not in ROLES or not NAME.fullmatch(fields[0]):
            raise ConfigError(
                f"{source}, line {number}: expected NAME ROLE TOKEN, NAME of letters, digits and _.-,"
                f" ROLE one of {', '.join(ROLES)}"
            )
        identities.append(Identity(*fields))
    return tuple(identities)


@attrs.frozen
class ReflectorConfig:
    """How a reflector listens, stores and limits. ``million reflector`` flags map onto it."""

    host: str = "127.0.0.1"
    port: int = 8765
    store: str = ":memory:"  # SQLite file, or ":memory:"
    tick_ms: int = 100  # time-only ticks of an occupied, silent session
    snapshot_every: int = 1000  # events between snapshot requests
    max_frame: int = DEFAULT_MAX_FRAME  # bytes of one frame received
    max_depth: int = 64  # nesting of join options, summaries and snapshot states
    max_sessions_per_connection: int = 100_000  # memberships one connection may hold
    max_members: int = 100_000  # memberships of one session
    max_open_sessions: int = 100_000  # sessions in memory: occupied, or left lately
    max_tail: int = 1_000_000  # events a session keeps after its latest agreed snapshot
    max_tail_bytes: int = 32 << 20  # bytes of those events
    max_connections: int = 10_000  # open client connections
    max_connections_per_ip: int = 1_000
    max_handshakes: int = 1_000  # connections that have not completed the handshake and hello
    handshake_timeout: float = 10.0  # seconds for the websocket handshake, then again for the hello
    max_auth_failures: int = 20  # wrong tokens per IP per minute; beyond, its hellos are refused
    max_queue_bytes: int = 64 << 20  # queued for one connection before it is dropped as too slow
    max_queue_total: int = 256 << 20  # queued for all connections; beyond, the largest queue is dropped
    max_messages_per_s: int = 200_000  # cost units per connection per second (a ping: 1)
    max_summary: int = 16384  # bytes of one session summary
    summaries: int = 100_000  # session summaries kept, the most recent
    idle_sessions: int = 1000  # sessions kept in memory after their last participant left
    leave_snapshot_after: int = 64  # events since the last snapshot that make a leave ask one (snapshots.py)
    max_live: int = 16  # web page sockets (/live) open at once
    live_lifetime: float = 3600.0  # seconds a web page socket lives
    token: str | None = None  # what clients must present to join and publish
    identities: tuple[Identity, ...] = ()  # tokens of their own: each connection is stamped with its name
    view_token: str | None = None  # what the page and ``million status`` may present instead: read-only
    allow_origins: tuple[str, ...] = ()  # web origins whose pages may connect, besides the web port's own
    insecure: bool = False  # listen beyond loopback without a token
    fsync: bool = False  # flush the store's journal to the disk before relaying
    ssl_context: ssl.SSLContext | None = None
    transport: str = "sansio"  # or "trio-websocket": see million.wire.transport
    http_port: int | None = None  # the web page and metrics (million.relay.web); None: not served

    def check(self) -> None:
        """Refuse settings that would expose every session to anyone who can connect."""
        if not self.secured and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without a token: anyone who can reach it could"
                " join every session. Give a token (--token-file, or $MILLION_TOKEN), or allow it"
                " explicitly (insecure=True, --insecure)."
            )
        named = [(f"the token of {i.name}", i.token) for i in self.identities]
        for name, token in [("the token", self.token), ("the view token", self.view_token), *named]:
            if token is not None and len(token) < MIN_TOKEN:
                raise ConfigError(f"{name} must have at least {MIN_TOKEN} characters, not {len(token)}")
        self._check_identities()
        if self.view_token is not None and self.view_token == self.token:
            raise ConfigError("the view token must differ from the token")
        if self.view_token is not None and self.token is None:
            raise ConfigError("a view token needs a token: without one, everyone may write")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.transport!r}; one of {', '.join(TRANSPORTS)}")

    @property
    def secured(self) -> bool:
        """Whether a client needs a token."""
        return self.token is not None or bool(self.identities)

    def web_tokens(self) -> list[str]:
        """Every token that may read the web port's data."""
        tokens = [self.token, self.view_token, *(identity.token for identity in self.identities)]
        return [token for token in tokens if token is not None]

    def _check_identities(self) -> None:
        names = [identity.name for identity in self.identities]
        tokens = [identity.token for identity in self.identities]
        if len(set(names)) < len(names) or len(set(tokens)) < len(tokens):
            raise ConfigError("every identity needs a name and a token of its own")
        if self.identities and (self.token is not None or self.view_token is not None):
            raise ConfigError("give either identities (--tokens) or a shared token, not both")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class ReflectorStatistics:
    connections: int
    sessions: int  # with someone present
    idle: int  # in memory with nobody present
    events: int
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    divergences: int
    errors: int
    throttled: int  # pauses of a connection that sent over max_messages_per_s
    refused: dict[str, int]  # refusals by limit (the ``limit`` field of docs/security.md)
    queued_bytes: int = 0  # encoded bytes waiting to be sent, all connections together
