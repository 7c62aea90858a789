"""Websocket transport: the only module that knows which websocket library is used.

Both ends see a ``Channel``: send one frame, receive one frame, close with a code and
a reason. A closed channel raises ``Closed`` from ``send`` and ``receive``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio_websocket

DEFAULT_MAX_FRAME = 1 << 20
RECEIVE_BUFFER = 1 << 16
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
    """Serve websockets on ``host:port`` until cancelled; ``task_status`` gets the bound port."""

    async def accept(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await handler(Channel(ws))

    listeners = await trio.open_tcp_listeners(port, host=host)
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners]
    server = trio_websocket.WebSocketServer(
        accept,
        listeners,
        message_queue_size=64,
        max_message_size=max_frame,
        receive_buffer_size=RECEIVE_BUFFER,
        connect_timeout=10,
        disconnect_timeout=CLOSE_TIMEOUT,
    )
    await server.run(task_status=_PortStatus(task_status))


class _PortStatus:
    """Reports the bound port of a started WebSocketServer to the caller's task_status."""

    def __init__(self, task_status: trio.TaskStatus[int]) -> None:
        self._task_status = task_status

    def started(self, server: trio_websocket.WebSocketServer) -> None:
        self._task_status.started(server.port)


@asynccontextmanager
async def connect(
    url: str, *, ssl_context: ssl.SSLContext | None = None, max_frame: int = 1 << 26
) -> AsyncIterator[Channel]:
    """Open a websocket to ``url``; connection failures raise ``OSError``."""
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context,
            message_queue_size=64,
            max_message_size=max_frame,
            receive_buffer_size=RECEIVE_BUFFER,
            connect_timeout=10,
            disconnect_timeout=CLOSE_TIMEOUT,
        ) as ws:
            yield Channel(ws)
    except trio_websocket.HandshakeError as exc:
        cause = exc.__cause__ or exc.__context__
        raise OSError(str(cause) if cause else f"websocket handshake with {url} failed") from None
