"""Channels: one websocket connection each, and the opening handshakes that make them.

Both ends see a ``Channel``: send one frame, receive one frame, close with a code and
a reason. A closed channel raises ``Closed`` from ``send`` and ``receive``.

``SansIOChannel`` drives ``websockets``' sans-IO protocol directly from the
connection's own tasks: no reader task and queue between the socket and its user, which
saves a few scheduler rounds per frame on the hot path. ``accept_sansio`` and
``connect_sansio`` are its opening handshakes, server and client side; the server's
refuses, with HTTP 403, an ``Origin`` header its ``OriginCheck`` does not allow.
``WebsocketChannel`` wraps a trio-websocket connection. Serving and connecting are
``million.wire.transport``'s.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeAlias

import trio
import trio_websocket
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol as WebsocketProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

__all__ = [
    "CLOSE_TIMEOUT",
    "FORBIDDEN_ORIGIN",
    "GOING_AWAY",
    "MAX_PONGS",
    "NORMAL",
    "POLICY",
    "RECEIVE_BUFFER",
    "TOO_BIG",
    "Channel",
    "Closed",
    "OriginCheck",
    "SansIOChannel",
    "WebsocketChannel",
    "accept_sansio",
    "connect_sansio",
    "origin_allowed",
    "peer_address",
]

RECEIVE_BUFFER = 1 << 16
CLOSE_TIMEOUT = 2.0

#: Close codes (RFC 6455) with the meaning the reflector gives them.
NORMAL = 1000
GOING_AWAY = 1001
POLICY = 1008
MAX_PONGS = 64  # pings a peer may send while pongs wait behind a blocked writer
TOO_BIG = 1009

#: Whether a websocket may be opened from a page of this origin (None: no ``Origin`` header).
OriginCheck: TypeAlias = Callable[[str | None], bool]
FORBIDDEN_ORIGIN = "websockets from this origin are not allowed here\n"


class Closed(Exception):
    """The websocket is closed; ``code`` and ``reason`` say why."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed ({code}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason or ""


class Channel(Protocol):
    """One websocket connection carrying binary frames; ``remote`` is the peer's IP address
    ("" if unknown)."""

    remote: str

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def close(self, code: int = NORMAL, reason: str = "") -> None: ...


class WebsocketChannel:
    """A ``Channel`` over a trio-websocket connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, remote: str = "") -> None:
        self._ws = ws
        self.remote = remote

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None
        return message if isinstance(message, bytes) else message.encode()

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(code, reason[:120])


def _closed(exc: trio_websocket.ConnectionClosed) -> Closed:
    reason = exc.reason
    return Closed(getattr(reason, "code", None), getattr(reason, "reason", None))


class SansIOChannel:
    """A ``Channel`` that drives a ``websockets`` protocol object over a trio stream.

    ``receive`` reads and parses in the caller's task; ``send`` writes in the caller's
    task. A lock keeps the two (and automatic pongs and close replies) from
    interleaving their bytes on the stream.
    """

    def __init__(self, stream: trio.abc.Stream, ws: WebsocketProtocol, remote: str = "") -> None:
        self._stream = stream
        self._ws = ws
        self.remote = remote
        self._messages: deque[bytes] = deque()
        self._parts: list[bytes] = []
        self._send_lock = trio.Lock()
        self._receiving = False
        self._pongs = 0  # answers to the peer's pings queued and not yet written

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._ws.state is not State.OPEN:
                raise self._closed()
            self._ws.send_binary(data)
            await self._send_pending()

    async def receive(self) -> bytes:
        while not self._messages:
            if self._ws.state is State.CLOSED or self._ws.close_rcvd is not None:
                raise self._closed()
            self._receiving = True
            try:
                data = await self._stream.receive_some(RECEIVE_BUFFER)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self._receiving = False
            if data:
                self._ws.receive_data(data)
            else:
                self._ws.receive_eof()
            self._take_frames()
            if self._pongs > MAX_PONGS:  # pings faster than this end can answer: not a client
                self._ws.fail(POLICY, "too many pings")
            # Pongs, close replies, the close of a failed connection. A reader never waits
            # for a sender: two peers each blocked writing while neither reads would hang.
            if not self._send_lock.locked():
                async with self._send_lock:
                    await self._send_pending()
            if self._ws.close_sent is not None and not self._messages:
                raise self._closed()
        return self._messages.popleft()

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(Closed):
                async with self._send_lock:
                    if self._ws.state is State.OPEN:
                        self._ws.send_close(code, reason[:120])
                    await self._send_pending()
                while self._ws.state is not State.CLOSED:  # wait for the peer's close reply
                    await self.receive()

    def _take_frames(self) -> None:
        for frame in self._ws.events_received():
            if isinstance(frame, Frame) and frame.opcode is Opcode.PING:
                self._pongs += 1
            if isinstance(frame, Frame) and frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                self._parts.append(bytes(frame.data))
                if frame.fin:
                    self._messages.append(b"".join(self._parts))
                    self._parts = []

    async def _send_pending(self) -> None:
        """Write what the protocol has queued; the caller holds the send lock."""
        data = b"".join(self._ws.data_to_send())
        self._pongs = 0
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise await self._lost() from None

    async def _lost(self) -> Closed:
        """Sending failed: the peer may have closed with a reason that is still unread
        (unless another task is reading: it will see the reason itself)."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            while self._ws.close_rcvd is None and not self._receiving:
                try:
                    data = await self._stream.receive_some(RECEIVE_BUFFER)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                self._ws.receive_data(data)
        return self._closed()

    def _closed(self) -> Closed:
        close = self._ws.close_rcvd or self._ws.close_sent
        if close is None:
            return Closed(1006, "connection lost")
        return Closed(close.code, close.reason)


def peer_address(stream: trio.abc.Stream) -> str:
    """The IP address of the other end of ``stream`` (under its TLS layer, if any); "" if unknown."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return ""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else ""


def origin_allowed(origins: OriginCheck | None, values: list[str]) -> bool:
    """Whether a handshake with these ``Origin`` header values may open a websocket."""
    if origins is None:
        return True
    if len(values) > 1:
        return False  # a browser sends one
    return origins(values[0] if values else None)


def _origin_headers(request: trio_websocket.WebSocketRequest) -> list[str]:
    return [value.decode("latin-1") for name, value in request.headers if name.lower() == b"origin"]


async def accept_sansio(
    stream: trio.abc.Stream, max_frame: int, origins: OriginCheck | None = None
) -> SansIOChannel | None:
    """The server side of the opening handshake; None if the peer is no websocket client,
    or comes from an origin that ``origins`` refuses (it gets a 403)."""
    ws = ServerProtocol(max_size=max_frame)
    while True:
        data = await stream.receive_some(RECEIVE_BUFFER)
        if not data:
            return None
        ws.receive_data(data)
        events = ws.events_received()
        refused = False
        if events and isinstance(events[0], Request):
            refused = not origin_allowed(origins, events[0].headers.get_all("Origin"))
            ws.send_response(ws.reject(403, FORBIDDEN_ORIGIN) if refused else ws.accept(events[0]))
        reply = b"".join(ws.data_to_send())
        if reply:
            await stream.send_all(reply)
        if ws.handshake_exc is not None or refused:
            return None
        if events:
            channel = SansIOChannel(stream, ws, peer_address(stream))
            ws.events.extend(events[1:])  # frames that came with the request
            channel._take_frames()
            return channel


async def connect_sansio(stream: trio.abc.Stream, url: str, max_frame: int) -> SansIOChannel:
    """The client side of the opening handshake."""
    ws = ClientProtocol(parse_uri(url), max_size=max_frame)
    ws.send_request(ws.connect())
    await stream.send_all(b"".join(ws.data_to_send()))
    while True:
        data = await stream.receive_some(RECEIVE_BUFFER)
        if not data:
            raise OSError(f"websocket handshake with {url} failed: the connection closed")
        ws.receive_data(data)
        events = ws.events_received()
        if ws.handshake_exc is not None:
            raise OSError(f"websocket handshake with {url} failed: {ws.handshake_exc}")
        if events:
            channel = SansIOChannel(stream, ws, peer_address(stream))
            ws.events.extend(events[1:])  # frames that came with the response
            channel._take_frames()
            return channel
