"""Websocket transport: the only module that knows which websocket libraries are used.

Both ends see a ``Channel``: send one frame, receive one frame, close with a code and
a reason. A closed channel raises ``Closed`` from ``send`` and ``receive``.

Both ends can use trio-websocket or, by default, ``websockets``' sans-IO protocol
driven directly from the connection's own tasks: no reader task and queue between the
socket and its user, which saves a few scheduler rounds per frame on the hot path.

A server refuses, with HTTP 403, an opening handshake whose ``Origin`` header its
``OriginCheck`` does not allow: a browser sends the origin of the page that opens a
websocket, so no other site's page can talk to a reflector through its visitor's browser.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeAlias
from urllib.parse import urlsplit

import trio
import trio_websocket
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol as WebsocketProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from wsproto.utilities import LocalProtocolError

from million.wire import protocol, tasks

DEFAULT_MAX_FRAME = protocol.DEFAULT_MAX_FRAME
RECEIVE_BUFFER = 1 << 16
QUEUE = 64  # frames buffered by the websocket reader task
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0

ENGINES = ("sansio", "trio-websocket")

#: Close codes (RFC 6455) with the meaning the reflector gives them.
NORMAL = 1000
GOING_AWAY = 1001
POLICY = 1008
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
            if isinstance(frame, Frame) and frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT):
                self._parts.append(bytes(frame.data))
                if frame.fin:
                    self._messages.append(b"".join(self._parts))
                    self._parts = []

    async def _send_pending(self) -> None:
        """Write what the protocol has queued; the caller holds the send lock."""
        data = b"".join(self._ws.data_to_send())
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


async def _accept_sansio(
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


async def _connect_sansio(stream: trio.abc.Stream, url: str, max_frame: int) -> SansIOChannel:
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


async def serve(
    handler: Callable[[Channel], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    engine: str = "sansio",
    origins: OriginCheck | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_handshakes: int | None = None,
    on_refused: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve websockets on ``host:port`` until cancelled; ``task_status`` gets the bound port.

    ``engine`` is ``"sansio"`` or ``"trio-websocket"`` (see the module docstring).
    ``origins`` decides which ``Origin`` headers may open a websocket (None: any); a
    refused handshake gets HTTP 403. The opening handshake must end within
    ``handshake_timeout`` seconds, and at most ``max_handshakes`` may be under way at
    once: a connection beyond is closed at once (and ``on_refused`` called).

    ``handler`` must not raise: the caller decides what a failed connection means.
    Each TCP stream is closed when its handler ends, however the peer went away.
    """

    async def handle_trio_websocket(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            ws = None
            with trio.move_on_after(handshake_timeout):
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, QUEUE, max_frame, RECEIVE_BUFFER
                )
                if origin_allowed(origins, _origin_headers(request)):
                    ws = await request.accept()
                else:
                    await request.reject(403, body=FORBIDDEN_ORIGIN.encode())
            shaking.done(stream)
            if ws is not None:
                try:
                    await handler(WebsocketChannel(ws, peer_address(stream)))
                finally:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose()
            nursery.cancel_scope.cancel()

    async def handle_sansio(stream: trio.abc.Stream) -> None:
        channel = None
        with trio.move_on_after(handshake_timeout):
            channel = await _accept_sansio(stream, max_frame, origins)
        shaking.done(stream)
        if channel is not None:
            await handler(channel)

    shaking = _Handshakes(max_handshakes)

    async def handle_stream(stream: trio.abc.Stream) -> None:
        try:
            if not shaking.begin(stream):
                if on_refused is not None:
                    on_refused()
                return
            await (handle_sansio if engine == "sansio" else handle_trio_websocket)(stream)
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, LocalProtocolError, Closed):
            pass  # the peer went away or spoke no websocket: nothing to serve
        finally:
            shaking.done(stream)
            await trio.aclose_forcefully(stream)

    listeners = await listen(host, port, ssl_context)
    task_status.started(port_of(listeners[0]))
    await trio.serve_listeners(handle_stream, listeners)


class _Handshakes:
    """The streams whose opening handshake is under way, at most ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.streams: set[trio.abc.Stream] = set()

    def begin(self, stream: trio.abc.Stream) -> bool:
        if self.limit is not None and len(self.streams) >= self.limit:
            return False
        self.streams.add(stream)
        return True

    def done(self, stream: trio.abc.Stream) -> None:
        self.streams.discard(stream)


async def listen(
    host: str, port: int, ssl_context: ssl.SSLContext | None
) -> list[trio.abc.Listener[trio.abc.Stream]]:
    """TCP listeners on ``host:port`` (TLS with ``ssl_context``); the error names the address."""
    try:
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(
            await trio.open_tcp_listeners(port, host=host)
        )
    except OSError as exc:
        raise OSError(exc.errno, f"{host}:{port}: {exc.strerror or exc}") from None
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners]
    return listeners


def port_of(listener: Any) -> int:
    """The port a listener from ``listen`` is bound to."""
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    port: int = listener.socket.getsockname()[1]
    return port


def address(url: str) -> tuple[str, int, bool]:
    """Host, port and whether TLS is on, of a ``ws://`` or ``wss://`` URL; else ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a websocket URL: {url!r} (expected ws://HOST:PORT or wss://HOST:PORT)")
    secure = parts.scheme == "wss"
    try:
        return parts.hostname, parts.port or (443 if secure else 80), secure
    except ValueError as exc:
        raise ValueError(f"not a websocket URL: {url!r} ({exc})") from None


@asynccontextmanager
async def connect(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = 1 << 26,
    engine: str = "sansio",
) -> AsyncIterator[Channel]:
    """Open a websocket to ``url``; failing to connect or to shake hands raises ``OSError``."""
    try:
        host, port, secure = address(url)
    except ValueError as exc:
        raise OSError(str(exc)) from None
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            if secure:
                context = ssl_context or ssl.create_default_context()
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=context, https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise OSError(f"no answer from {host}:{port} within {HANDSHAKE_TIMEOUT:.0f} s") from None
    try:
        if engine == "sansio":
            async with _sansio_client(stream, url, max_frame) as channel:
                yield channel
        else:
            async with _trio_websocket_client(stream, url, max_frame) as channel:
                yield channel
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _sansio_client(stream: trio.abc.Stream, url: str, max_frame: int) -> AsyncIterator[Channel]:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            channel = await _connect_sansio(stream, url, max_frame)
    except (trio.TooSlowError, trio.BrokenResourceError) as exc:
        reason = exc.__cause__ or exc  # a TLS failure is the cause of a broken stream
        raise OSError(f"websocket handshake with {url} failed: {reason}") from None
    try:
        yield channel
    finally:
        with trio.CancelScope(shield=True):  # a normal close, even when leaving by cancellation
            await channel.close()


@asynccontextmanager
async def _trio_websocket_client(stream: trio.abc.Stream, url: str, max_frame: int) -> AsyncIterator[Channel]:
    parts = urlsplit(url)
    async with tasks.open_nursery() as nursery:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,  # type: ignore[arg-type]  # any trio stream will do
                    parts.netloc,
                    parts.path or "/",
                    message_queue_size=QUEUE,
                    max_message_size=max_frame,
                    receive_buffer_size=RECEIVE_BUFFER,
                )
        except (trio_websocket.HandshakeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise OSError(f"websocket handshake with {url} failed: {exc!r}") from None
        try:
            yield WebsocketChannel(ws, peer_address(stream))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await ws.aclose()
            nursery.cancel_scope.cancel()
