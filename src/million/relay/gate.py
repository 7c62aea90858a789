"""Who may connect and what they may do: part of the relay core (sans-IO).

``Gate`` counts connections in all and per IP address, the connections still in their
handshake, and the wrong tokens each address sent lately; it checks hellos (the token
first, so that nobody learns anything without it) and says whether a connection may
write or only read (the view token).
"""

from __future__ import annotations

import enum
import hmac
from collections import deque
from typing import Any

from million.relay.config import ReflectorConfig
from million.wire.protocol import PROTOCOL_VERSION, ErrorCode, Hello, ProtocolError

__all__ = ["Gate", "Role"]

AUTH_WINDOW = 60.0  # seconds over which wrong tokens are counted


class Role(enum.Enum):
    """What a connection may do."""

    MEMBER = "member"  # join, publish, leave, answer snapshots: everything
    VIEWER = "viewer"  # ping and status only (the view token)


class Gate:
    """Admission of connections and their hellos."""

    def __init__(self, config: ReflectorConfig) -> None:
        self.config = config
        self.connections = 0
        self.handshaking = 0
        self.per_ip: dict[str, int] = {}
        self._failures: dict[str, deque[float]] = {}  # ip -> when its wrong tokens came

    def open(self, ip: str) -> None:
        """A connection from ``ip`` starts its handshake; ``ProtocolError`` (``limit``) if
        that would exceed a limit. Each ``open`` that passes needs a ``close``."""
        config = self.config
        if self.connections >= config.max_connections:
            raise _limit(
                "connections", f"the reflector holds its maximum of {config.max_connections} connections"
            )
        if self.per_ip.get(ip, 0) >= config.max_connections_per_ip:
            raise _limit(
                "connections_per_ip", f"{ip} holds {config.max_connections_per_ip} connections already"
            )
        if self.handshaking >= config.max_handshakes:
            raise _limit("handshakes", f"{config.max_handshakes} connections are in their handshake already")
        self.connections += 1
        self.handshaking += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def admitted(self) -> None:
        """A connection finished its handshake and hello."""
        self.handshaking -= 1

    def close(self, ip: str, admitted: bool) -> None:
        """A connection ``open`` let in has ended."""
        if ip not in self.per_ip:
            return  # never opened
        self.connections -= 1
        if not admitted:
            self.handshaking -= 1
        count = self.per_ip[ip] - 1
        if count:
            self.per_ip[ip] = count
        else:
            del self.per_ip[ip]

    def hello(self, messages: list[Any], ip: str, now: float) -> tuple[Hello, Role, str]:
        """The hello that opens a connection, what it may do, and the identity it proved
        (``ROLE:NAME``; "" for a shared token or none); ``ProtocolError`` says why it is
        refused."""
        hello = messages[0] if len(messages) == 1 else None
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.UNEXPECTED, "the first message must be a hello")
        role, identity = self._role(hello, ip, now)
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.VERSION,
                f"this reflector speaks protocol version {PROTOCOL_VERSION}, not {hello.version}",
            )
        return hello, role, identity

    def _role(self, hello: Hello, ip: str, now: float) -> tuple[Role, str]:
        config = self.config
        if not config.secured:
            return Role.MEMBER, ""
        failures = self._failures.get(ip)
        while failures and now - failures[0] > AUTH_WINDOW:
            failures.popleft()
        if failures is not None and len(failures) >= config.max_auth_failures:
            raise _limit("auth_failures", f"too many wrong tokens from {ip}: try again in a minute")
        given = (hello.token or "").encode()
        if config.token is not None and hmac.compare_digest(given, config.token.encode()):
            return Role.MEMBER, ""
        if config.view_token is not None and hmac.compare_digest(given, config.view_token.encode()):
            return Role.VIEWER, ""
        matches = [i for i in config.identities if hmac.compare_digest(given, i.token.encode())]
        if matches:
            return (Role.VIEWER if matches[0].role == "viewer" else Role.MEMBER), matches[0].stamp
        self._failures.setdefault(ip, deque()).append(now)
        if len(self._failures) > 10_000:  # forget the oldest addresses, not grow without bound
            del self._failures[next(iter(self._failures))]
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong token")


class Refused(ProtocolError):
    """A limit refused something; ``limit`` names it (docs/security.md)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(ErrorCode.LIMIT, message)
        self.limit = limit


def _limit(limit: str, message: str) -> Refused:
    return Refused(limit, message)
