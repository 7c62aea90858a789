"""Websocket transport: serving and connecting, over either websocket library.

Both ends see a ``Channel`` (``million.wire.channels``, whose names are importable
from here too): send one frame, receive one frame, close with a code and a reason.
``serve`` and ``connect`` use trio-websocket or, by default, ``websockets``' sans-IO
protocol driven directly from the connection's own tasks. These two modules are the
only ones that know which websocket libraries are used.

A server refuses, with HTTP 403, an opening handshake whose ``Origin`` header its
``OriginCheck`` does not allow: a browser sends the origin of the page that opens a
websocket, so no other site's page can talk to a reflector through its visitor's browser.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from million.wire import protocol, tasks
from million.wire.channels import (
    CLOSE_TIMEOUT,
    FORBIDDEN_ORIGIN,
    GOING_AWAY,
    MAX_PONGS,
    NORMAL,
    POLICY,
    RECEIVE_BUFFER,
    TOO_BIG,
    Channel,
    Closed,
    OriginCheck,
    SansIOChannel,
    WebsocketChannel,
    accept_sansio,
    connect_sansio,
    origin_allowed,
    peer_address,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_MAX_FRAME",
    "ENGINES",
    "FORBIDDEN_ORIGIN",
    "GOING_AWAY",
    "HANDSHAKE_TIMEOUT",
    "MAX_PONGS",
    "NORMAL",
    "POLICY",
    "QUEUE",
    "RECEIVE_BUFFER",
    "TOO_BIG",
    "Channel",
    "Closed",
    "OriginCheck",
    "SansIOChannel",
    "WebsocketChannel",
    "address",
    "connect",
    "listen",
    "origin_allowed",
    "peer_address",
    "port_of",
    "serve",
]

DEFAULT_MAX_FRAME = protocol.DEFAULT_MAX_FRAME
QUEUE = 64  # frames buffered by the websocket reader task
HANDSHAKE_TIMEOUT = 10.0

ENGINES = ("sansio", "trio-websocket")


def _origin_headers(request: trio_websocket.WebSocketRequest) -> list[str]:
    return [value.decode("latin-1") for name, value in request.headers if name.lower() == b"origin"]


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
            channel = await accept_sansio(stream, max_frame, origins)
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
            channel = await connect_sansio(stream, url, max_frame)
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
