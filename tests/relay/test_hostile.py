"""Hostile input against a live reflector, over real sockets: whatever one connection
sends, the session goes on with consecutive seqs and one digest on every replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import million
from million.compute.computation import Computation
from million.compute.pages import RUNS_PAGE
from million.compute.progress import Progress
from million.compute.status import status_with_runs
from million.relay.config import ReflectorConfig
from million.relay.store import StoreError
from million.replica.model import Replica
from million.replica.state import dump_state
from million.wire import codec, transport
from million.wire.protocol import (
    PROTOCOL_VERSION,
    Digest,
    DigestRequest,
    Error,
    ErrorCode,
    Event,
    Hello,
    Join,
    Ping,
    Pong,
    SnapshotRequest,
    Sync,
    state_digest,
)
from models import Ledger

MAX_2_64 = 2**64 - 1


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[transport.Channel]:
    """A connection that speaks the protocol by hand, after its hello."""
    async with transport.connect(url) as channel:
        await channel.send(codec.encode(Hello(PROTOCOL_VERSION, None, "hostile")))
        await channel.receive()
        yield channel


async def join_raw(channel: transport.Channel, session: str, model: str, options: Any) -> str:
    """Join by hand; the view id the reflector gave."""
    await channel.send(codec.encode(Join(1, session, model, options, create=options is not None)))
    with trio.fail_after(10):
        while True:
            for message in codec.decode_reflector(await channel.receive()):
                if isinstance(message, Sync):
                    return message.view
                assert not isinstance(message, Error), message


def publish_raw(session: str, view: str, topic: str, data: bytes) -> bytes:
    return b'{"type":"publish","session":"%s","view":"%s","topic":"%s","data":%s}' % (
        session.encode(),
        view.encode(),
        topic.encode(),
        data,
    )


async def errors_until_quiet(channel: transport.Channel) -> list[str]:
    """The error codes the channel gets until nothing comes for a moment (a ping marks the end)."""
    await channel.send(b'{"type":"ping","ref":77}')
    codes = []
    with trio.fail_after(10):
        while True:
            for message in codec.decode_reflector(await channel.receive()):
                if isinstance(message, Error):
                    codes.append(message.code)
                elif type(message).__name__ == "Pong":
                    return codes


async def same_everywhere(
    reflector: million.Reflector, name: str, model: type[million.Model], *sessions: Any
) -> None:
    """A newcomer joins ``name``; every replica, its own included, reaches one seq and one
    digest, and the reflector's stream of the session has no gap."""
    async with (
        million.open_client(reflector.url) as late,
        million.join(late, name, model, create=False) as newcomer,
    ):
        target = newcomer.replica.seq
        replicas = [newcomer, *sessions]
        with trio.fail_after(10):
            for session in replicas:
                await session.wait_for(lambda _, s=session: s.replica.seq >= target)
        assert {s.replica.seq for s in replicas} == {target}
        assert len({s.replica.digest() for s in replicas}) == 1
        stream = reflector.core.sessions[name]
        seqs = [codec.loads(event)["seq"] for event in stream.tail]
        assert seqs == list(range(stream.snapshot_seq + 1, stream.seq + 1))


@pytest.fixture
async def served() -> AsyncIterator[million.Reflector]:
    async with million.open_reflector(ReflectorConfig(port=0)) as reflector:
        yield reflector


async def test_deep_json_and_huge_integers_break_no_session(served):
    url = served.url
    async with (
        million.open_client(url) as honest,
        million.join(honest, "ledger", Ledger, options={"target": 0}) as ledger,
        raw(url) as hostile,
    ):
        view = await join_raw(hostile, "ledger", Ledger.model_name, None)
        await hostile.send(publish_raw("ledger", view, "add", b"[" * 300 + b"]" * 300))
        assert await errors_until_quiet(hostile) == [ErrorCode.MALFORMED]
        await same_everywhere(served, "ledger", Ledger, ledger)
        await hostile.send(publish_raw("ledger", view, "add", b"123456789012345678901234567890"))
        await hostile.send(publish_raw("ledger", view, "add", b'{"deep": ' + b"[" * 200 + b"]" * 200 + b"}"))
        assert await errors_until_quiet(hostile) == []
        ledger.publish("add", "after")
        await same_everywhere(served, "ledger", Ledger, ledger)
        assert ledger.model.entries[-1][0] == "after"


async def test_counts_of_2_to_the_64_break_no_progress_model(served):
    url = served.url
    options = {"root": "run", "partitions": 100, "fanout": 10}
    async with (
        million.open_client(url) as honest,
        million.join(honest, "run:progress", Progress, options=options) as progress,
        raw(url) as hostile,
    ):
        view = await join_raw(hostile, "run:progress", Progress.model_name, None)
        told = b'{"leaves":{"run-1":%d},"computed":%d,"bots":3}' % (MAX_2_64, MAX_2_64)
        for _ in range(2):
            await hostile.send(publish_raw("run:progress", view, "bots", b"%d" % MAX_2_64))
            await hostile.send(publish_raw("run:progress", view, "bots", b"3"))
            await hostile.send(publish_raw("run:progress", view, "progress", told))
        assert await errors_until_quiet(hostile) == []
        progress.publish("bots", 1)
        progress.publish("progress", {"leaves": {"run-2": 10}, "computed": 10, "bots": 1})
        await same_everywhere(served, "run:progress", Progress, progress)
        assert progress.model.done == 10
        codec.dumps(progress.replica.snapshot())  # still encodes: it can be snapshotted


async def test_a_run_created_with_empty_options_is_inert_and_a_worker_declines_it(served):
    url = served.url
    async with raw(url) as hostile:
        await join_raw(hostile, "empty", Computation.model_name, {})
        async with (
            million.open_client(url) as honest,
            million.join(honest, "empty", Computation, create=False) as session,
        ):
            assert session.model.count == 0 and not session.model.done
            await same_everywhere(served, "empty", Computation, session)


async def lie(
    channel: transport.Channel, session: str, last: int, told: list[tuple[str, int]], done: trio.Event
) -> None:
    """Answer every snapshot and digest request of ``session`` with a forged Ledger, well
    formed and with the right digest of its bytes, until the answer about event ``last``
    is known to have reached the reflector (a ping after it is answered)."""
    forged = Replica.create(Ledger, session, None)
    while True:
        for message in codec.decode_reflector(await channel.receive()):
            if isinstance(message, Pong) and message.ref == last:
                done.set()
            if not isinstance(message, SnapshotRequest | DigestRequest) or message.session != session:
                continue
            while forged.seq < message.seq:  # a history that never happened
                forged.apply(Event(session, forged.seq + 1, 0, "v2", "add", "forged"))
            state = dump_state(forged.snapshot())
            if isinstance(message, SnapshotRequest):
                told.append(("snapshot", message.seq))
                await channel.send(codec.encode_snapshot(session, message.seq, state, state_digest(state)))
            else:
                told.append(("digest", message.seq))
                await channel.send(codec.encode(Digest(session, message.seq, state_digest(state))))
            await channel.send(codec.encode(Ping(message.seq)))


async def test_a_snapshot_sent_by_a_lone_liar_is_not_used_by_a_later_joiner():
    async with (
        million.open_reflector(ReflectorConfig(port=0, snapshot_every=3)) as reflector,
        million.open_client(reflector.url) as honest_client,
        million.join(honest_client, "lied", Ledger) as honest,  # event 1
        raw(reflector.url) as liar,
        trio.open_nursery() as nursery,
    ):
        await join_raw(liar, "lied", Ledger.model_name, None)  # event 2
        told: list[tuple[str, int]] = []
        answered = trio.Event()
        nursery.start_soon(lie, liar, "lied", 9, told, answered)
        for i in range(7):  # events 3 to 9: a snapshot is asked of events 3, 6 and 9
            honest.publish("add", i)
            await honest.wait_for(lambda model, i=i: model.total == i + 1)
        with trio.fail_after(10):
            await answered.wait()
            await honest_client.ping()  # the reflector has the honest answers too
        assert told == [("snapshot", 3), ("digest", 6), ("snapshot", 9)]  # the latest snapshot: a lie
        assert reflector.statistics().divergences == 3
        assert reflector.core.sessions["lied"].snapshot_seq == 0  # no snapshot agreed: all events kept
        async with (
            million.open_client(reflector.url) as late_client,
            million.join(late_client, "lied", Ledger, create=False) as late,
        ):
            assert late.sync_info().synced_from == 0  # it replays the events, not the forged snapshot
            with trio.fail_after(10):
                await honest.wait_for(lambda _: honest.replica.seq >= late.replica.seq)
            assert late.replica.digest() == honest.replica.digest()
            assert [entry[0] for entry in late.model.entries] == list(range(7))
        nursery.cancel_scope.cancel()


async def upgrade(port: int, path: str, *headers: str) -> int:
    """The HTTP status a websocket upgrade to ``path`` gets."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        + "".join(f"{header}\r\n" for header in headers)
        + "\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request.encode())
        with trio.fail_after(10):
            head = await stream.receive_some(4096)
    return int(head.split()[1])


@pytest.mark.parametrize("token", [None, "a-token-long-enough"])
async def test_a_page_of_another_site_opens_neither_port(token):
    config = ReflectorConfig(port=0, http_port=0, token=token)
    async with million.open_reflector(config, pages=[RUNS_PAGE]) as reflector:
        for port, path in ((reflector.port, "/"), (reflector.http_port, "/live")):
            assert await upgrade(port, path, "Origin: http://evil.example") == 403
        own = f"Origin: http://127.0.0.1:{reflector.http_port}"
        assert await upgrade(reflector.port, "/", own) == 101
        assert await upgrade(reflector.port, "/") == 101  # no page at all: a program
        assert reflector.statistics().refused["origin"] == 1


async def test_an_allowed_origin_may_connect():
    config = ReflectorConfig(port=0, allow_origins=("https://dashboard.example",))
    async with million.open_reflector(config) as reflector:
        assert await upgrade(reflector.port, "/", "Origin: https://dashboard.example") == 101
        assert await upgrade(reflector.port, "/", "Origin: https://dashboard.example.evil") == 403


async def test_connections_beyond_the_per_address_limit_are_told_and_closed():
    async with million.open_reflector(ReflectorConfig(port=0, max_connections_per_ip=2)) as reflector:
        async with million.open_client(reflector.url) as one, million.open_client(reflector.url) as two:
            await one.ping()
            await two.ping()
            async with transport.connect(reflector.url) as third:
                (error,) = codec.decode_reflector(await third.receive())
                assert isinstance(error, Error) and error.code == ErrorCode.LIMIT
                with pytest.raises(transport.Closed):
                    await third.receive()
            assert reflector.statistics().refused == {"connections_per_ip": 1}
        async with million.open_client(reflector.url) as again:  # the others gone, room again
            await again.ping()


async def test_what_the_store_could_not_keep_is_not_relayed_and_the_session_resumes_from_the_store(
    monkeypatch,
):
    async with (
        million.open_reflector(ReflectorConfig(port=0)) as reflector,
        million.open_client(reflector.url) as client,
        million.join(client, "kept", Ledger) as session,
    ):
        commit = reflector.store.commit

        async def failing(batch: Any) -> None:
            raise StoreError("cannot append to the journal: [Errno 28] No space left on device")

        monkeypatch.setattr(reflector.store, "commit", failing)
        session.publish("add", "lost")
        with trio.fail_after(10):
            while client.connection < 2:  # noqa: ASYNC110 (nothing to wait on: the client is told by a close)
                await trio.sleep(0.01)
        assert session.model.total == 0  # nothing that was not stored was relayed
        monkeypatch.setattr(reflector.store, "commit", commit)
        with trio.fail_after(10):
            while not session.synced:  # noqa: ASYNC110
                await trio.sleep(0.01)
            session.publish("add", "kept")
            await session.wait_for(lambda model: model.total == 1)
        assert session.model.entries[0][0] == "kept"
        stream = reflector.core.sessions["kept"]
        assert [codec.loads(event)["seq"] for event in stream.tail] == list(range(1, stream.seq + 1))


async def test_the_view_token_reads_status_and_runs_but_joins_nothing():
    config = ReflectorConfig(port=0, token="the-writing-token", view_token="the-reading-token")
    options = {"root": "run", "partitions": 4}
    summary = {"run": "run", "state": "open", "partitions": 4, "completed": 1, "rate": 0, "bots": 2}
    async with (
        million.open_reflector(config) as reflector,
        million.open_client(reflector.url, token="the-writing-token") as writer,
        million.join(writer, "run:progress", Progress, options=options) as progress,
        million.open_client(reflector.url, token="the-reading-token") as reader,
    ):
        progress.summarize(summary)
        await writer.ping()
        with pytest.raises(million.JoinError) as refused:
            await reader.join("run:progress", Progress, create=False)
        assert refused.value.code == ErrorCode.READ_ONLY
        info = await status_with_runs(reader)
        assert info["runs"] == [{"name": "run", **summary}]
        assert [s["name"] for s in info["sessions"]] == ["run:progress"]
