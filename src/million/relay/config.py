"""The reflector's settings and its counters. Every default is written here, once."""

from __future__ import annotations

import ipaddress
import ssl

import attrs

from million.wire.protocol import DEFAULT_MAX_FRAME

TRANSPORTS = ("sansio", "trio-websocket")


class ConfigError(ValueError):
    """Settings the reflector refuses to run with; the message says why and what to do."""


@attrs.frozen
class ReflectorConfig:
    """How a reflector listens, stores and limits. ``million reflector`` flags map onto it."""

    host: str = "127.0.0.1"
    port: int = 8765
    store: str = ":memory:"  # SQLite file, or ":memory:"
    tick_ms: int = 100  # time-only ticks of an occupied, silent session
    snapshot_every: int = 1000  # events between snapshot requests
    max_frame: int = DEFAULT_MAX_FRAME  # bytes of one frame received
    max_sessions_per_connection: int = 100_000
    max_queue_bytes: int = 64 << 20  # queued for one connection before it is dropped as too slow
    max_messages_per_s: int = 200_000  # per connection; beyond it, its reading pauses
    max_summary: int = 4096  # bytes of one session summary
    summaries: int = 100_000  # session summaries kept, the most recent
    idle_sessions: int = 1000  # sessions kept in memory after their last participant left
    leave_snapshot_after: int = 64  # events since the last snapshot that make the last leaver snapshot
    token: str | None = None
    insecure: bool = False  # listen beyond loopback without a token
    ssl_context: ssl.SSLContext | None = None
    transport: str = "sansio"  # or "trio-websocket": see million.wire.transport
    http_port: int | None = None  # the web page and metrics (million.relay.web); None: not served

    def check(self) -> None:
        """Refuse settings that would expose every session to anyone who can connect."""
        if self.token is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without a token: anyone who can reach it could"
                " join every session. Give a token (--token-file, or $MILLION_TOKEN), or allow it"
                " explicitly (insecure=True, --insecure)."
            )
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {self.transport!r}; one of {', '.join(TRANSPORTS)}")


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
