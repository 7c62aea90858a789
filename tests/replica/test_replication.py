"""Replication over a real reflector on 127.0.0.1: order, digests, late joiners, presence."""

from __future__ import annotations

from functools import partial
from typing import Any

import attrs
import pytest
import trio

import million
from helpers import start_participant, start_reflector
from million.relay.config import ReflectorConfig
from million.wire import codec
from models import DigestOnTarget, Ledger, Publisher, Tagged, Tally


class Publish50(Publisher):
    count = 50


async def test_two_participants_apply_the_same_events_in_the_same_order(reflector):
    async with (
        million.open_client(reflector.url) as one,
        million.open_client(reflector.url) as two,
        million.join(one, "order", Ledger, DigestOnTarget, {"target": 100}) as a,
        million.join(two, "order", Ledger, DigestOnTarget, {"target": 100}) as b,
    ):
        for i in range(50):
            a.publish("add", ("a", i))
            b.publish("add", ("b", i))
        with trio.fail_after(10):
            await a.view.reached.wait()
            await b.view.reached.wait()
        assert a.view.digest == b.view.digest
        assert a.model.entries[:100] == b.model.entries[:100]
        from_a = [value for value, *_ in a.model.entries if value[0] == "a"]
        assert from_a == [["a", i] for i in range(50)]
        assert a.model.by_sender == {a.view_id: 50, b.view_id: 50}


async def test_participants_in_processes_with_different_hash_seeds_reach_one_digest(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"))
    participants = [start_participant(url, "processes", 200, 400, hash_seed) for hash_seed in ("1", "2")]
    try:
        digests = [await p.line("digest") for p in participants]
    finally:
        for p in participants:
            p.stop()
        reflector.stop()
    seq, _ = digests[0].split()
    assert digests[0] == digests[1]
    assert int(seq) >= 402  # two joins and 400 additions at least


async def test_late_joiner_replays_only_the_tail_after_the_latest_snapshot(reflector, client):
    async with (
        million.join(client, "late", Ledger, options={"target": 5000}) as first,
        million.open_client(reflector.url) as witness,  # another identity: snapshots are agreed
        million.join(witness, "late", Ledger, options={"target": 5000}),
    ):
        for i in range(5000):
            first.publish("add", i)
        with trio.fail_after(30):
            await first.wait_for(lambda model: model.total == 5000)
            while await snapshot_seq(client, "late") < 4000:
                await first.wait_changed()
        async with (
            million.open_client(reflector.url) as other,
            million.join(other, "late", Ledger, options={"target": 5000}) as late,
        ):
            info = late.sync_info()
            assert info.synced_from >= 4000
            assert info.replayed < 1000
            seq = late.replica.seq
            with trio.fail_after(10):
                await first.wait_for(lambda _: first.replica.seq >= seq)
            assert first.replica.seq == seq
            assert late.replica.digest() == first.replica.digest()
            assert late.model.entries == first.model.entries


async def snapshot_seq(client: million.Client, name: str) -> int:
    info = await client.status()
    return next(s["snapshot_seq"] for s in info["sessions"] if s["name"] == name)


async def test_an_empty_session_keeps_its_state_and_its_clock_stops(reflector, mock_clock):
    mock_clock.rate = 1  # real speed, but it can jump
    options = {"ring_ms": 2000}
    async with million.open_client(reflector.url) as client:
        async with million.join(client, "empty", Ledger, options=options) as first:
            first.publish("add", "kept")
            await first.wait_for(lambda model: model.total == 1)
            left_at = first.model.now
        await client.settle()  # the reflector has seen the leave
        mock_clock.jump(3600)
        async with million.join(client, "empty", Ledger, options=options) as again:
            assert again.model.entries[0][0] == "kept"
            assert again.model.rang_at is None
            exit_time = again.model.presence[-2][2]
            join_time = again.model.presence[-1][2]
            assert again.model.presence[-2][0] == "exit"
            assert join_time - exit_time < 3_600_000
            assert exit_time >= left_at
            with trio.fail_after(10):
                await again.wait_for(lambda model: model.rang_at is not None)
            assert again.model.rang_at == 2000


async def test_presence_events_arrive_in_order_even_when_a_connection_is_cut(tmp_path):
    reflector, url = await start_reflector(str(tmp_path / "store.db"))
    try:
        options = {"target": 1}
        async with (
            million.open_client(url) as client,
            million.join(client, "presence", Ledger, options=options) as watcher,
        ):
            async with million.join(client, "presence", Ledger, options=options) as leaver:
                left = leaver.view_id
            cut = start_participant(url, "presence", 0, 1)
            cut_view = await cut.line("joined")
            with trio.fail_after(10):
                await watcher.wait_for(lambda model: cut_view in model.present)
            cut.kill()
            with trio.fail_after(10):
                await watcher.wait_for(lambda model: cut_view not in model.present)
            log = [(kind, view) for kind, view, _ in watcher.model.presence]
            assert log == [
                ("join", watcher.view_id),
                ("join", left),
                ("exit", left),
                ("join", cut_view),
                ("exit", cut_view),
            ]
            assert watcher.model.present == [watcher.view_id]
    finally:
        reflector.stop()


async def test_one_connection_in_200_sessions_keeps_their_events_apart(client):
    sessions: dict[int, million.Session] = {}

    async def member(index: int, joined: trio.Event, done: trio.Event) -> None:
        async with million.join(client, f"many-{index}", Tagged, options={"index": index}) as session:
            sessions[index] = session
            joined.set()
            for _ in range(5):
                session.publish("value", index)
            await done.wait()

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        joins = []
        for index in range(200):
            joined = trio.Event()
            joins.append(joined)
            nursery.start_soon(member, index, joined, done)
        with trio.fail_after(30):
            for joined in joins:
                await joined.wait()
            for session in sessions.values():
                await session.wait_for(lambda model: len(model.values) >= 5)
        for index, session in sessions.items():
            assert session.model.index == index
            assert session.model.values == [index] * 5
        assert client.statistics().connections == 1
        done.set()


async def test_views_in_one_process_share_a_replica_and_see_model_events(client):
    seen: list[int] = []
    async with (
        million.join(client, "shared", Ledger, options={"target": 50}) as a,
        million.join(client, "shared", Ledger, Publish50, {"target": 50}) as b,
    ):
        a.subscribe("reached", seen.append)
        with trio.fail_after(10):
            await a.wait_for(lambda model: model.total == 50)
        assert a.replica is b.replica
        assert seen == [50]
        assert a.model.by_sender == {b.view_id: 50}


async def test_a_join_naming_another_model_or_options_is_refused(client):
    async with million.join(client, "mismatch", Ledger, options={"target": 1}):
        try:
            async with million.join(client, "mismatch", Tagged, options={"index": 1}):
                raise AssertionError("joined with another model")
        except million.JoinError as exc:
            assert exc.code == "model-mismatch"
            assert "test-ledger" in str(exc)
        try:
            async with million.join(client, "mismatch", Ledger, options={"target": 2}):
                raise AssertionError("joined with other options")
        except million.JoinError as exc:
            assert exc.code == "model-mismatch"


async def test_nested_joins_from_inside_a_view(client):
    class Parent(million.View):
        async def run(self) -> None:
            async with million.join(self.session.client, "nested-child", Ledger, Publish50) as child:
                await child.wait_for(lambda model: model.total == 50)
                self.publish("add", child.model.total)

    async with million.join(client, "nested-parent", Ledger, Parent) as parent:
        with trio.fail_after(10):
            await parent.wait_for(lambda model: model.total == 1)
        assert parent.model.entries[0][0] == 50


async def test_snapshots_are_taken_and_checked_for_divergence(reflector):
    every = ReflectorConfig().snapshot_every
    async with (
        million.open_client(reflector.url) as one,
        million.open_client(reflector.url) as two,
        million.join(one, "snap", Ledger) as a,
        million.join(two, "snap", Ledger) as b,
    ):
        for i in range(every + 10):
            a.publish("add", i)
        with trio.fail_after(20):
            await b.wait_for(lambda model: model.total == every + 10)
            while await snapshot_seq(one, "snap") < every:
                await a.wait_changed()
    assert reflector.statistics().divergences == 0


_replicas_built = 0


@attrs.define
class Careless(million.Model, name="test-careless"):
    """Breaks the rules: its state depends on how many replicas this process built."""

    built: int = 0
    count: int = 0

    def init(self, options: object) -> None:
        global _replicas_built
        _replicas_built += 1
        self.built = _replicas_built
        self.subscribe("add", self.add)

    def add(self, _: object) -> None:
        self.count += 1


async def test_a_diverging_replica_is_detected_and_counted(reflector):
    every = ReflectorConfig().snapshot_every
    async with (
        million.open_client(reflector.url) as one,
        million.open_client(reflector.url) as two,
        million.join(one, "careless", Careless) as a,
        million.join(two, "careless", Careless) as b,
    ):
        for i in range(every):
            a.publish("add", i)
        with trio.fail_after(20):
            await b.wait_for(lambda model: model.count == every)
            while reflector.statistics().divergences == 0:
                await a.wait_changed()
        info = await one.status()
    (session,) = [s for s in info["sessions"] if s["name"] == "careless"]
    assert session["divergences"] == 1


async def test_a_participant_that_leaves_one_identity_behind_leaves_a_snapshot(reflector):
    async with (
        million.open_client(reflector.url) as client,
        million.open_client(reflector.url) as other,
    ):
        async with million.join(other, "tidy", Ledger) as stays:
            async with million.join(client, "tidy", Ledger) as session:
                for i in range(70):  # a tail longer than ReflectorConfig.leave_snapshot_after
                    session.publish("add", i)
                await session.wait_for(lambda model: model.total == 70)
            await client.settle()  # its leave confirmed: its answer is sent
            with trio.fail_after(10):
                await stays.wait_for(lambda _: stays.replica.seq == 73)  # two joins, 70 additions, exit
            await client.ping()  # the reflector has what each sent before
            await other.ping()
            assert reflector.core.sessions["tidy"].snapshot_seq == 73
        await other.settle()  # the last leave: it is asked nothing
    stored = await reflector.store.load("tidy")
    assert stored is not None and stored.snapshot_seq == 73
    assert [codec.loads(event)["seq"] for event in stored.events] == [74]
    assert "tidy" not in [s["name"] for s in reflector.describe()["sessions"]]


async def test_joining_without_creating_takes_the_recorded_options(client):
    with pytest.raises(million.JoinError) as missing:
        async with million.join(client, "absent", Ledger, create=False):
            pass
    assert missing.value.code == "not-found"
    async with (
        million.join(client, "recorded", Ledger, options={"target": 3}),
        million.join(client, "recorded", Ledger, create=False) as second,
    ):
        assert second.options == {"target": 3}
        assert second.model.target == 3


async def test_a_participant_that_comes_back_gets_only_what_it_missed(reflector):
    async with (
        million.open_client(reflector.url) as client,
        million.open_client(reflector.url) as other,
        million.join(other, "back", Ledger) as stayer,
    ):
        async with million.join(client, "back", Ledger) as first:
            first.publish("add", "before")
            await first.wait_for(lambda model: model.total == 1)
        await client.settle()  # the reflector has seen the leave
        for i in range(3):
            stayer.publish("add", i)
        await stayer.wait_for(lambda model: model.total == 4)
        async with million.join(client, "back", Ledger) as again:
            assert again.sync_info().replayed == 3  # the additions: it had seen its own exit
            assert [value for value, *_ in again.model.entries] == ["before", 0, 1, 2]
            await again.wait_seen()
            await stayer.wait_for(lambda _: stayer.replica.seq == again.replica.seq)
            assert again.replica.digest() == stayer.replica.digest()


async def test_a_join_given_up_on_the_way_leaves_no_participant_behind(reflector):
    async with million.open_client(reflector.url) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            async with million.join(client, "ghost", Ledger):  # the join is sent, then cancelled
                pass
        await client.ping()  # the sync has come back: the client has sent a leave for it
        await client.ping()  # and the reflector has handled that leave
        info = await client.status()
    assert "ghost" not in [session["name"] for session in info["sessions"]]


class GivesUp(million.View):
    """A view that gives up a join in flight (``scope``) when a reconnect resyncs it."""

    def __init__(self, session: million.Session, scope: trio.CancelScope) -> None:
        super().__init__(session)
        self.scope = scope

    def resynced(self) -> None:
        self.scope.cancel()


async def test_a_join_given_up_after_its_sync_came_leaves_no_participant_behind(tmp_path):
    # After a reflector restart, the joins again of a process's memberships and its joins
    # in flight are answered in one frame: the resync of one view gives up another join
    # (as a worker gives up the child it was joining), whose sync is then applied before
    # the joiner sees its cancellation. That membership must be left, or it stays a ghost
    # (a child's preparer that never prepares, and the run never ends).
    store = str(tmp_path / "store.db")
    reflector, url = await start_reflector(store)
    try:
        async with million.open_client(url) as client:
            scope = trio.CancelScope()
            async with million.join(client, "parent", Ledger, partial(GivesUp, scope=scope)):
                reflector.kill()
                with trio.fail_after(10):
                    while client.connected:  # noqa: ASYNC110
                        await trio.sleep(0.01)  # nothing wakes a waiter when the connection drops
                reflector, _ = await start_reflector(store, int(url.rsplit(":", 1)[1]))
                with trio.fail_after(10), scope:
                    async with million.join(client, "child", Ledger):  # sent once reconnected
                        raise AssertionError("the join was given up")
                assert scope.cancelled_caught
                await client.ping()  # the client has sent a leave for the child
                await client.ping()  # and the reflector has handled that leave
                info = await client.status()
        assert [session["name"] for session in info["sessions"]] == ["parent"]
    finally:
        reflector.stop()


async def test_a_participant_sending_big_events_while_their_echoes_come_back_does_not_stall(reflector):
    async with million.open_client(reflector.url) as client, million.join(client, "big", Tally) as session:
        for _ in range(20):
            session.publish("blob", "y" * 200_000)  # both ways' socket buffers fill at once
        with trio.fail_after(20):
            await session.wait_for(lambda model: model.count == 20)


async def test_waits_for_conditions_end_as_each_holds_raise_in_their_task_and_stop_when_given_up(client):
    seen: dict[int, int] = {}
    calls: list[int] = []

    def broken(model: Any) -> bool:
        if model.count >= 3:
            raise ValueError("three")
        return False

    def abandoned(model: Any) -> bool:
        calls.append(model.count)
        return False

    async with million.join(client, "waits", Tally) as session:

        async def until(at_least: int) -> None:
            await session.wait_for(lambda model: model.count >= at_least)
            seen[at_least] = session.model.count

        async def fails() -> None:
            with pytest.raises(ValueError, match="three"):
                await session.wait_for(broken)
            seen[0] = session.model.count

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for at_least in range(1, 11):
                    nursery.start_soon(until, at_least)
                nursery.start_soon(fails)
                with trio.CancelScope() as given_up:
                    given_up.cancel()  # cancelled at its first wait
                    await session.wait_for(abandoned)
                for _ in range(10):
                    session.publish("blob")
        assert sorted(seen) == list(range(11)) and all(count >= at_least for at_least, count in seen.items())
        assert seen[0] >= 3 and set(calls) == {0}  # the wait given up is not checked again
