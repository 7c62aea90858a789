"""The websocket server of both engines: which origins may open a websocket, the peer's
address, and the deadline for the opening handshake."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trustme
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from million.wire import transport
from million.wire.transport import ENGINES

ALLOWED = "http://good.example:8766"
UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def allow_good(origin: str | None) -> bool:
    return origin is None or origin == ALLOWED


async def welcome(channel: transport.Channel) -> None:
    """A trivial handler: greet with the peer's address, then wait for the peer to go."""
    with contextlib.suppress(transport.Closed):  # a handler must not raise
        await channel.send(b"welcome " + channel.remote.encode())
        await channel.receive()


@asynccontextmanager
async def serving(engine: str, **options: Any) -> AsyncIterator[int]:
    """``transport.serve`` with ``welcome`` on a free port of 127.0.0.1; yields the port."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(transport.serve, welcome, "127.0.0.1", 0, engine=engine, **options)
        )
        yield port
        nursery.cancel_scope.cancel()


async def handshake(port: int, headers: str = "") -> tuple[int, bytes]:
    """Open a websocket by hand; the response's status and what came until the welcome or
    the end of the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{UPGRADE}{headers}\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while b"welcome" not in data and (chunk := await stream.receive_some(65536)):
                data += chunk
    return int(data.split()[1]), data


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_page_of_a_foreign_origin_is_refused_before_any_welcome(engine):
    async with serving(engine, origins=allow_good) as port:
        status, data = await handshake(port, "Origin: http://evil.example\r\n")
        assert status == 403
        assert b"welcome" not in data
        assert b"not allowed" in data


@pytest.mark.parametrize("engine", ENGINES)
async def test_no_origin_and_an_allowed_origin_are_welcome(engine):
    async with serving(engine, origins=allow_good) as port:
        status, data = await handshake(port, f"Origin: {ALLOWED}\r\n")
        assert status == 101 and b"welcome 127.0.0.1" in data
        async with transport.connect(f"ws://127.0.0.1:{port}", engine=engine) as channel:  # sends no Origin
            assert await channel.receive() == b"welcome 127.0.0.1"


@pytest.mark.parametrize("engine", ENGINES)
async def test_two_origins_are_refused(engine):
    async with serving(engine, origins=allow_good) as port:
        status, data = await handshake(port, f"Origin: {ALLOWED}\r\nOrigin: http://evil.example\r\n")
        assert status == 403 and b"welcome" not in data


@pytest.mark.parametrize("engine", ENGINES)
async def test_without_a_check_any_origin_is_welcome(engine):
    async with serving(engine) as port:
        status, data = await handshake(port, "Origin: http://evil.example\r\n")
        assert status == 101 and b"welcome" in data


@pytest.mark.parametrize("engine", ENGINES)
async def test_the_handler_sees_the_peers_address_through_tls(engine):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        serving(engine, ssl_context=server_context, origins=allow_good) as port,
        transport.connect(f"wss://127.0.0.1:{port}", ssl_context=client_context, engine=engine) as channel,
    ):
        assert await channel.receive() == b"welcome 127.0.0.1"
        assert channel.remote == "127.0.0.1"  # the client's channel knows its peer too


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_silent_connection_is_closed_after_the_handshake_timeout(engine, autojump_clock):
    async with serving(engine, handshake_timeout=3.0) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()
            assert await stream.receive_some() == b""
            assert 3.0 <= trio.current_time() - start < 4.0


async def test_a_flood_of_pings_is_refused_and_the_connection_closed():
    async with serving("sansio") as port, await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"))
        client.send_request(client.connect())
        await stream.send_all(b"".join(client.data_to_send()))
        with trio.fail_after(10):
            while not client.events_received() and client.state is not State.OPEN:
                client.receive_data(await stream.receive_some(65536))
            for _ in range(transport.MAX_PONGS + 1):
                client.send_ping(b"hello?")
            await stream.send_all(b"".join(client.data_to_send()))
            while client.close_rcvd is None:
                data = await stream.receive_some(65536)
                if not data:
                    break
                client.receive_data(data)
    assert client.close_rcvd is not None
    assert (client.close_rcvd.code, client.close_rcvd.reason) == (transport.POLICY, "too many pings")
