"""Bad input gets a documented error and never disturbs anyone else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psutil
import pytest
import trio
import trio_websocket

import million
from helpers import start_reflector
from million.wire import codec, protocol, transport
from million.wire.protocol import ErrorCode, Hello, Join, Publish
from models import Ledger, Tally

HELLO = Hello(protocol.PROTOCOL_VERSION)


@asynccontextmanager
async def raw(url: str, hello: Hello | None = HELLO) -> AsyncIterator[transport.Channel]:
    """A bare websocket to the reflector, past the handshake unless told otherwise."""
    async with transport.connect(url) as channel:
        if hello is not None:
            await channel.send(codec.encode(hello))
            (welcome,) = codec.decode_reflector(await channel.receive())
            assert isinstance(welcome, protocol.Welcome)
        yield channel


async def next_message(channel: transport.Channel) -> object:
    with trio.fail_after(5):
        (message,) = codec.decode_reflector(await channel.receive())
    return message


@pytest.fixture
async def bystander(client):
    """A participant in another session who must notice nothing."""
    async with million.join(client, "bystander", Ledger) as session:
        yield session


async def still_served(bystander: million.Session) -> None:
    total = bystander.model.total
    bystander.publish("add", total)
    with trio.fail_after(5):
        await bystander.wait_for(lambda model: model.total == total + 1)


# Each error code is tested where it arises (tests/test_codec.py, the relay core's tests);
# over a real socket, one error of each path: refused by the codec, refused by the core.
@pytest.mark.parametrize(
    ("frame", "code", "problem"),
    [
        (b"{not json", ErrorCode.MALFORMED, "frame is not valid JSON"),
        (
            codec.encode(Publish("elsewhere", "v1", "add", 1)),
            ErrorCode.NOT_JOINED,
            "view 'v1' has not joined session 'elsewhere'",
        ),
    ],
    ids=["codec", "core"],
)
async def test_a_bad_message_gets_an_error_and_the_connection_goes_on(
    reflector, bystander, frame, code, problem
):
    async with raw(reflector.url) as channel:
        await channel.send(frame)
        error = await next_message(channel)
        assert isinstance(error, protocol.Error)
        assert error.code == code
        assert problem in error.message
        await channel.send(codec.encode(protocol.Ping(5)))
        assert await next_message(channel) == protocol.Pong(5)
    await still_served(bystander)


async def test_an_error_names_the_request_it_answers(reflector):
    async with raw(reflector.url) as channel:
        await channel.send(codec.encode(Join(42, "x" * 300, "m")))
        error = await next_message(channel)
        assert isinstance(error, protocol.Error)
        assert (error.code, error.ref, error.session) == (ErrorCode.BAD_NAME, 42, "x" * 300)


async def test_a_frame_over_the_size_limit_closes_that_connection_only(reflector, bystander):
    async with raw(reflector.url) as channel:
        with pytest.raises(transport.Closed) as closed, trio.fail_after(5):
            await channel.send(b"[" + b" " * reflector.config.max_frame + b"]")
            await channel.receive()
        assert closed.value.code == transport.TOO_BIG
    await still_served(bystander)


@pytest.mark.parametrize(
    ("hello", "code", "problem"),
    [
        (codec.encode(Hello(protocol.PROTOCOL_VERSION + 1)), ErrorCode.VERSION, "speaks protocol version"),
        (codec.encode(Join(1, "s", "m")), ErrorCode.UNEXPECTED, "the first message must be a hello"),
        (b"hello?", ErrorCode.MALFORMED, "frame is not valid JSON"),
    ],
)
async def test_a_bad_handshake_is_refused_with_a_reason(reflector, bystander, hello, code, problem):
    async with raw(reflector.url, hello=None) as channel:
        await channel.send(hello)
        error = await next_message(channel)
        assert isinstance(error, protocol.Error)
        assert error.code == code
        assert problem in error.message
        with pytest.raises(transport.Closed) as closed, trio.fail_after(5):
            await channel.receive()
        assert closed.value.code == transport.POLICY
        assert code in closed.value.reason
    await still_served(bystander)


async def test_a_client_of_another_version_gets_a_clear_error(reflector, monkeypatch):
    monkeypatch.setattr(million.replica.core, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)
    with pytest.raises(million.ClientError, match="protocol version"):
        async with million.open_client(reflector.url):
            pass


async def test_a_client_that_stops_reading_is_dropped_and_memory_stays_bounded(tmp_path):
    limit = 1 << 20
    process, url = await start_reflector(str(tmp_path / "store.db"), 0, "--max-queue", str(limit))
    reflector = psutil.Process(process.proc.pid)
    try:
        async with (
            million.open_client(url) as client,
            million.join(client, "firehose", Tally) as publisher,
            million.open_client(url) as other,  # another identity: snapshots are agreed, the tail trimmed
            million.join(other, "firehose", Tally),
            trio_websocket.open_websocket_url(url, message_queue_size=1) as sleeper,
        ):
            await sleeper.send_message(codec.encode(Hello(protocol.PROTOCOL_VERSION)))
            await sleeper.get_message()
            await sleeper.send_message(codec.encode(Join(1, "firehose", Tally.model_name)))
            with trio.fail_after(5):
                await publisher.wait_for(lambda model: model.count == 0 and publisher.replica.seq >= 3)
            baseline = reflector.memory_info().rss
            blob = "x" * 10_000
            sent = 0
            with trio.fail_after(60):
                while sent < 15_000:  # 150 MB through the reflector, most of it meant for the sleeper
                    for _ in range(20):  # a burst well under the queue limit of a reader
                        publisher.publish("blob", blob)
                    sent += 20
                    await publisher.wait_for(lambda model, sent=sent: model.count == sent)
            grown = reflector.memory_info().rss - baseline
            log = await client.status()
            (session,) = [s for s in log["sessions"] if s["name"] == "firehose"]
            assert session["participants"] == 2  # the sleeper was dropped
            assert grown < 64 << 20, f"reflector grew by {grown >> 20} MiB"
    finally:
        process.stop()


async def test_a_reflector_with_a_token_refuses_clients_without_it():
    config = million.ReflectorConfig(port=0, token="open sesame, please")
    async with million.open_reflector(config) as reflector:
        for token in (None, "open sesame!"):
            with pytest.raises(million.ClientError, match="missing or wrong token"):
                async with million.open_client(reflector.url, token=token):
                    pass
        async with million.open_client(reflector.url, token="open sesame, please") as client:
            await client.ping()


async def test_a_flooding_connection_is_slowed_and_others_are_served_meanwhile():
    config = million.ReflectorConfig(port=0, max_messages_per_s=200)
    async with (
        million.open_reflector(config) as reflector,
        million.open_client(reflector.url) as flooder,
        million.open_client(reflector.url) as bystander,
        million.join(flooder, "flood", Tally) as session,
    ):
        for _ in range(1000):  # five seconds' worth at the limit, sent at once
            session.publish("blob", "x")
        with trio.fail_after(10):
            while reflector.statistics().throttled == 0:
                await session.wait_changed()
            await bystander.ping()
        assert session.model.count < 1000  # answered while the flood was still held back
        with trio.fail_after(30):
            await session.wait_for(lambda model: model.count == 1000)  # nothing lost


async def test_a_summary_over_the_limit_is_refused_and_the_last_good_one_kept(reflector, client):
    async with million.join(client, "summed", Ledger) as session:
        session.summarize({"state": "working", "completed": 1})
        session.summarize({"blob": "x" * reflector.config.max_summary})
        await client.ping()  # answered after both: the error is in
        assert client.errors[-1].code == ErrorCode.LIMIT
        assert "a summary may have at most 16384 bytes" in client.errors[-1].message
        info = await client.status(["summed"])
        assert info["summaries"] == {"summed": {"state": "working", "completed": 1}}


async def test_memberships_beyond_the_limit_are_refused_and_the_connection_stays():
    config = million.ReflectorConfig(port=0, max_sessions_per_connection=2)
    async with (
        million.open_reflector(config) as reflector,
        million.open_client(reflector.url) as client,
        million.join(client, "one", Ledger),
        million.join(client, "two", Ledger),
    ):
        with pytest.raises(million.JoinError) as refused:
            async with million.join(client, "three", Ledger):
                pass
        assert refused.value.code == ErrorCode.LIMIT
        assert "at most 2 memberships" in str(refused.value)
        await client.ping()
