"""Websocket transport: the only module that knows which websocket library is used.

Both ends see a ``Channel``: send one frame, receive one frame, close with a code and
a reason. A closed channel raises ``Closed`` from ``send`` and ``receive``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from million import protocol, tasks

DEFAULT_MAX_FRAME = protocol.DEFAULT_MAX_FRAME
RECEIVE_BUFFER = 1 << 16
QUEUE = 64  # frames buffered by the websocket reader task
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0

#: Close codes (RFC 6455) with the meaning the reflector gives them.
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
POLICY = 1008
TOO_BIG = 1009


class Closed(Exception):
    """The websocket is closed; ``code`` and ``reason`` say why."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed ({code}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason or ""


class Channel:
    """One websocket connection carrying binary frames."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    @property
    def remote(self) -> str:
        remote = self._ws.remote
        return f"{remote.address}:{remote.port}" if hasattr(remote, "port") else str(remote)

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


async def serve(
    handler: Callable[[Channel], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve websockets on ``host:port`` until cancelled; ``task_status`` gets the bound port.

    ``handler`` must not raise: the caller decides what a failed connection means.
    Each TCP stream is closed when its handler ends, however the peer went away.
    """

    async def handle_stream(stream: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                ws = None
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    request = await trio_websocket.wrap_server_stream(
                        nursery, stream, QUEUE, max_frame, RECEIVE_BUFFER
                    )
                    ws = await request.accept()
                if ws is not None:
                    try:
                        await handler(Channel(ws))
                    finally:
                        with trio.move_on_after(CLOSE_TIMEOUT):
                            await ws.aclose()
                nursery.cancel_scope.cancel()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, LocalProtocolError):
            pass  # the peer went away or spoke no websocket: nothing to serve
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners]
    task_status.started(_port(listeners[0]))
    await trio.serve_listeners(handle_stream, listeners)


def _port(listener: trio.SocketListener | trio.SSLListener[trio.SocketStream]) -> int:
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    return listener.socket.getsockname()[1]


@asynccontextmanager
async def connect(
    url: str, *, ssl_context: ssl.SSLContext | None = None, max_frame: int = 1 << 26
) -> AsyncIterator[Channel]:
    """Open a websocket to ``url``; failing to connect or to shake hands raises ``OSError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise OSError(f"not a websocket URL: {url!r} (expected ws://HOST:PORT or wss://HOST:PORT)")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    if secure:
        context = ssl_context or ssl.create_default_context()
        stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
            parts.hostname, port, ssl_context=context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(parts.hostname, port)
    try:
        async with tasks.open_nursery() as nursery:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        parts.netloc,
                        parts.path or "/",
                        message_queue_size=QUEUE,
                        max_message_size=max_frame,
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
            except (trio_websocket.HandshakeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                raise OSError(f"websocket handshake with {url} failed: {exc!r}") from None
            try:
                yield Channel(ws)
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
